"""One labels reader (cxr_deploy.labels): the same labels.csv works for batch, train and export."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import SAMPLES

CLASSES = ("NORMAL", "PNEUMONIA")


def _excel_style_labels(folder: Path) -> Path:
    """What a spreadsheet saves: a byte-order mark, odd header case and spaces, 1/0 and mixed-case
    labels, padded paths relative to the file, and an extra column."""
    rows = []
    for i, image in enumerate(sorted((SAMPLES / "images").rglob("*.jpeg"))):
        positive = image.parent.name == "PNEUMONIA"
        label = ["1", "Pneumonia", "yes"][i % 3] if positive else ["0", "normal", "NORMAL"][i % 3]
        rows.append(f"  {image.relative_to(SAMPLES)}  ,{label},train")
    path = folder / "labels.csv"
    path.write_bytes(("\ufeff File , LABEL ,split\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    # the reader resolves paths against the CSV's folder: put it next to the images
    return path


@pytest.fixture()
def labels_file(tmp_path):
    import shutil

    shutil.copytree(SAMPLES / "images", tmp_path / "images")
    return _excel_style_labels(tmp_path)


def test_batch_train_and_export_read_the_same_labels(labels_file):
    from cxr_deploy.reporting.label_match import LabelIndex
    from cxr_deploy.export.inputs import labelled_files
    from cxr_deploy.training.data import load_samples

    expected = {str(p): ("PNEUMONIA" if p.parent.name == "PNEUMONIA" else "NORMAL")
                for p in (labels_file.parent / "images").rglob("*.jpeg")}
    assert len(expected) == 8

    index = LabelIndex.from_csv(labels_file, CLASSES, "PNEUMONIA")  # batch --labels, evaluate
    assert {p: index.lookup(p) for p in expected} == expected
    samples = load_samples(labels_file)  # train --data
    assert {s.path: CLASSES[s.label] for s in samples} == expected and {s.split for s in samples} == {"train"}
    pairs = labelled_files(labels_file, CLASSES, "PNEUMONIA")  # export --int8-eval
    assert {p: CLASSES[y] for p, y in pairs} == expected


def test_batch_cli_accepts_it(labels_file, tiny_bundle_for_labels, tmp_path):
    from click.testing import CliRunner

    from cxr_deploy.batch.cli import batch_command

    result = CliRunner().invoke(batch_command, [str(labels_file.parent / "images"), "--model",
                                                str(tiny_bundle_for_labels), "--out", str(tmp_path / "r.csv"),
                                                "--labels", str(labels_file), "-j", "0", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert "report: 8 labelled images" in result.output


@pytest.fixture(scope="module")
def tiny_bundle_for_labels(tmp_path_factory):
    from cxr_deploy.bundle import save_bundle
    from cxr_deploy.model import build_model
    from cxr_deploy.preprocessing import PreprocessSpec

    directory = tmp_path_factory.mktemp("labels") / "bundle"
    save_bundle(directory, build_model(None), spec=PreprocessSpec(input_size=64))
    return directory


@pytest.mark.parametrize("text, error", [
    ("path,diagnosis\na.png,NORMAL\n", "needs a header with 'path'"),
    ("path,label\na.png,COVID\n", "label 'COVID' is not one of NORMAL, PNEUMONIA"),
    ("path,label\n", "holds no labels"),
])
def test_unusable_labels_get_one_line(tmp_path, text, error):
    from cxr_deploy.labels import LabelsError, read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelsError, match=error) as info:
        read_labels_csv(path, CLASSES, "PNEUMONIA")
    assert "\n" not in str(info.value)
