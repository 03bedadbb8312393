"""Validation is carved by patient: no patient's films on both sides (issue 12, item 1)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pydicom

from cxr_deploy.training.data import assign_validation, load_samples, read_splits, write_splits
from cxr_deploy.training.groups import KERMANY_GROUP_REGEX, group_from_name

from synth_cxr import make_csv_dataset

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def _straddlers(samples) -> set[str]:
    train = {s.group for s in samples if s.split == "train" and s.group}
    return train & {s.group for s in samples if s.split == "val" and s.group}


def test_patient_column_keeps_each_patient_on_one_side(tmp_path, capsys):
    labels = make_csv_dataset(tmp_path, 30)  # 60 images
    rows = list(csv.DictReader(open(labels)))
    with open(labels, "w", newline="") as fh:  # three films per patient
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "patient"])
        writer.writeheader()
        writer.writerows({**r, "patient": f"P{i // 3:03d}"} for i, r in enumerate(rows))
    carved, note = assign_validation(load_samples(labels), val_fraction=0.2, min_val_images=32, seed=0)
    val = [s for s in carved if s.split == "val"]
    assert _straddlers(carved) == set() and 6 <= len(val) <= 18 and {s.label for s in val} == {0, 1}
    assert "by patient (20 groups)" in note and "warning" not in capsys.readouterr().err
    write_splits(carved, tmp_path / "splits.csv")  # recorded, and read back for --resume
    assert [(s.path, s.group, s.split) for s in read_splits(tmp_path / "splits.csv")] == \
        [(s.path, s.group, s.split) for s in carved]


def test_without_patient_information_it_warns(tmp_path, capsys):
    carved, note = assign_validation(load_samples(make_csv_dataset(tmp_path, 10)), val_fraction=0.2,
                                     min_val_images=32, seed=0)
    assert "per image (no patient information)" in note
    assert "warning: no patient information" in capsys.readouterr().err


def test_kermany_regex_reproduces_the_manifest_patients(shared_data):
    rows = list(csv.DictReader(open(shared_data / "kermany224" / "manifest.csv")))
    assert len(rows) == 5216
    regex = re.compile(KERMANY_GROUP_REGEX)
    assert all(group_from_name(r["path"], regex) == r["patient"] for r in rows)


def test_real_kermany_split_has_no_patient_on_both_sides(shared_data):
    samples = load_samples(shared_data / "kermany224" / "manifest.csv")
    carved, note = assign_validation(samples, val_fraction=0.2, min_val_images=32, seed=0)
    val = [s for s in carved if s.split == "val"]
    assert _straddlers(carved) == set()
    assert 0.15 < len(val) / len(carved) < 0.25
    share = sum(s.label for s in val) / len(val)  # PNEUMONIA share in validation vs overall (0.743)
    assert abs(share - sum(s.label for s in carved) / len(carved)) < 0.03
    assert "by patient" in note


def test_dicom_patient_id_groups_without_writing_the_id(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    source = pydicom.dcmread(SAMPLES / "dicom" / "IM000004")
    rows = [["path", "label"]]
    for i in range(12):
        ds = source.copy()
        ds.PatientID = f"MRN-SECRET-{i // 3}"
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"im{i}.dcm", enforce_file_format=True)
        rows.append([f"imgs/im{i}.dcm", "PNEUMONIA" if i % 2 else "NORMAL"])
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    samples = load_samples(tmp_path / "labels.csv")
    groups = [s.group for s in samples]
    assert all(g.startswith("pid-") for g in groups) and len(set(groups)) == 4
    assert len({groups[i] for i in (0, 1, 2)}) == 1  # one patient, one group
    carved, _ = assign_validation(samples, val_fraction=0.25, min_val_images=32, seed=1)
    write_splits(carved, tmp_path / "splits.csv")
    assert "MRN-SECRET" not in (tmp_path / "splits.csv").read_text()
    assert _straddlers(carved) == set()
    # a per-run salt: the recorded group cannot be linked to the patient across runs
    assert {s.group for s in load_samples(tmp_path / "labels.csv")}.isdisjoint(groups)


def test_patient_column_wins_over_group_regex_and_says_so(tmp_path, capsys):
    from click.testing import CliRunner

    from cxr_deploy.cli import main

    labels = make_csv_dataset(tmp_path, 4)
    rows = list(csv.DictReader(open(labels)))
    with open(labels, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "patient"])
        writer.writeheader()
        writer.writerows({**r, "patient": f"P{i // 2}" if i < 6 else ""} for i, r in enumerate(rows))
    samples = load_samples(labels, group_regex=r"img(\d)")
    assert [s.group for s in samples[:6]] == ["P0", "P0", "P1", "P1", "P2", "P2"]  # the column
    assert [s.group for s in samples[6:]] == ["0", "0"]  # no column value: the regex
    err = capsys.readouterr().err
    assert "--group-regex ignored for 6 of 8 images" in err and "'patient'" in err
    assert "warning" not in (load_samples(labels) and capsys.readouterr().err)  # no regex, no warning
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "a 'patient'/'group' column of the labels CSV wins over --group-regex" in help_text


def test_split_does_not_depend_on_group_names(tmp_path):
    """DICOM groups are salted hashes, new each run: renaming every group must not move the split."""
    from dataclasses import replace

    from cxr_deploy.training.groups import carve_by_group

    samples = load_samples(make_csv_dataset(tmp_path, 10))
    named = [replace(s, group=f"g{i // 2}") for i, s in enumerate(samples)]
    renamed = [replace(s, group=f"{(i // 2) * 7919 % 13:x}-{i // 2}") for i, s in enumerate(samples)]
    assert carve_by_group(named, 0.2, seed=0) == carve_by_group(renamed, 0.2, seed=0)
