"""One resolver for run settings (:mod:`cxr_deploy.run_settings`), one precedence rule (explicit flag
> config file > bundle), honoured by ``batch``, the Python API, ``pacs listen`` and the Ray engine;
the CSV, the report and the SR record the operating point and the threshold used."""

from __future__ import annotations

import shutil

import pytest

from cxr_deploy.batch.results_file import read_results
from cxr_deploy.run_settings import RunSettings, RunSettingsError, merge, resolve_decision
from tests.support import SAMPLES, run_cli, write_old_layout

DICOMS = [SAMPLES / "dicom" / "IM000004", SAMPLES / "dicom" / "normal_dx_16bit_rescale_window.dcm"]


def test_flag_beats_config_beats_bundle(points_bundle):
    from cxr_deploy.bundle import ModelBundle

    manifest = ModelBundle.load(points_bundle, verify=False).manifest
    config = ("pacs.toml [run]", RunSettings(operating_point="sens95", backend="torchscript", dicom_filter=False))

    def decided(*layers):
        d = resolve_decision(manifest, merge(*layers))
        return d.threshold, d.operating_point

    assert decided() == (0.5, "default")
    assert decided(("flags", RunSettings()), config) == (0.25, "sens95")
    assert decided(("flags", RunSettings(operating_point="youden")), config) == (0.45, "youden")
    assert decided(("flags", RunSettings(threshold=0.7)), config) == (0.7, "custom")  # a number beats a name below
    merged = merge(("flags", RunSettings(backend="onnx")), config)
    assert (merged.backend, merged.device, merged.engine, merged.eligibility.enabled) == ("onnx", "auto", "local", False)
    with pytest.raises(RunSettingsError, match="flags: give either a threshold or an operating point"):
        merge(("flags", RunSettings(threshold=0.3, operating_point="sens95")))
    with pytest.raises(RunSettingsError, match="'sens80' is not in this bundle; it has: sens95, youden"):
        resolve_decision(manifest, merge(("flags", RunSettings(operating_point="sens80"))))
    with pytest.raises(RunSettingsError, match="pacs.toml \\[run\\]: device must be one of auto, cpu, cuda"):
        merge(("flags", RunSettings()), ("pacs.toml [run]", RunSettings(device="gpu")))
    import cxr_deploy

    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        cxr_deploy.run_batch([], model=points_bundle, out="never.csv", engine="spark")


def test_api_load_honours_an_operating_point(points_bundle):
    import cxr_deploy

    model = cxr_deploy.load(points_bundle, operating_point="sens95")
    assert (model.threshold, model.operating_point) == (0.25, "sens95")
    records = model.predict(DICOMS)
    assert {(r["threshold"], r["operating_point"]) for r in records} == {(0.25, "sens95")}
    assert all((r["probability"] >= 0.25) == (r["predicted_label"] == "PNEUMONIA") for r in records)
    assert model.predict(DICOMS, threshold=0.9)[0]["operating_point"] == "custom"
    with pytest.raises(RunSettingsError):
        cxr_deploy.load(points_bundle, operating_point="sens80")


def test_batch_records_the_operating_point_in_csv_report_and_sr(points_bundle, tmp_path):
    import pydicom

    out, sr_dir = tmp_path / "r.csv", tmp_path / "sr"
    result = run_cli("batch", *DICOMS, "-m", points_bundle, "-o", out, "-j", "0", "--no-progress",
                     "--operating-point", "sens95", "--dicom-out", sr_dir, "--labels", SAMPLES / "labels.csv")
    assert result.returncode == 0, result.stderr
    assert "decision threshold 0.25 (operating point sens95)" in result.stderr
    rows = read_results(out)
    assert {(r["threshold"], r["operating_point"], r["schema_version"]) for r in rows} == {("0.25", "sens95", "4")}
    html = (tmp_path / "r_report" / "report.html").read_text()
    assert "threshold 0.25 (operating point sens95)" in html
    srs = sorted(sr_dir.glob("*.sr.dcm"))
    assert len(srs) == 2
    for sr in srs:
        texts = {item.TextValue for item in _walk(pydicom.dcmread(sr).ContentSequence) if "TextValue" in item}
        assert {"operating_point=sens95", "threshold=0.25"} <= texts
    both = run_cli("batch", *DICOMS, "-m", points_bundle, "-o", tmp_path / "x.csv", "--operating-point", "sens95",
                   "--threshold", "0.3")
    assert both.returncode == 2 and "not both" in both.stderr and not (tmp_path / "x.csv").exists()


def _walk(sequence):
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_pacs_listen_takes_the_config_then_the_flag(points_bundle, tmp_path):
    from cxr_deploy.pacs.config import load_pacs_config
    from cxr_deploy.pacs.passes import score_and_push

    toml = tmp_path / "pacs.toml"
    toml.write_text('[pacs]\npush = "cstore"\n[listen]\nallowed_ae_titles = ["X"]\n'
                    '[run]\noperating_point = "sens95"\nbackend = "onnx"\n')
    config = load_pacs_config(toml)
    for flags, expected in ((RunSettings(), ("0.25", "sens95")), (RunSettings(operating_point="youden"), ("0.45", "youden"))):
        spool = tmp_path / f"spool-{expected[1]}"
        (spool / "incoming" / "s").mkdir(parents=True)
        for path in DICOMS:
            shutil.copy(path, spool / "incoming" / "s" / f"{path.name}.dcm")
        settings = merge(("flags", flags), (f"{toml} [run]", config.run))
        score_and_push(spool, spool / "incoming", str(points_bundle), None, workers=0, uid_root="2.25",
                       settings=settings)
        rows = read_results(spool / "results.csv")
        assert {(r["threshold"], r["operating_point"]) for r in rows} == {expected}
    # a misspelt key is refused, not ignored (it would silently fall back to the bundle's threshold)
    toml.write_text('[pacs]\npush = "cstore"\n[run]\noperating_piont = "sens95"\n')
    with pytest.raises(Exception, match="unknown key"):
        load_pacs_config(toml)
    # an operating point the bundle lacks: exit 2 at start-up, before listening
    toml.write_text('[pacs]\npush = "cstore"\n[listen]\nallowed_ae_titles = ["X"]\n[run]\noperating_point = "sens80"\n')
    result = run_cli("pacs", "listen", "--config", toml, "--model", points_bundle, timeout=60)
    assert result.returncode == 2 and "sens80" in result.stderr and "listening" not in result.stderr


def test_ray_engine_resolves_the_same_decision(points_bundle, tmp_path):
    import csv

    import numpy as np

    from cxr_deploy.batch.decode import DecodeConfig
    from cxr_deploy.batch.inputs import BatchUsageError
    from cxr_deploy.batch.ray_stages import ModelStage, decode_batch
    from cxr_deploy.batch.results_file import COLUMNS, parse_row
    from cxr_deploy.batch.rows import run_decision
    from cxr_deploy.batch.settings import BatchConfig
    from cxr_deploy.bundle import ModelBundle

    bundle = ModelBundle.load(points_bundle)
    config = BatchConfig(inputs=[str(p) for p in DICOMS], model=points_bundle, out=tmp_path / "r.csv",
                         operating_point="youden")
    decision = run_decision(bundle, config)
    stage = ModelStage(str(points_bundle), bundle.model_id, "onnx", "cpu", 1, decision, COLUMNS)
    decoded = decode_batch({"path": np.array(config.inputs, dtype=object)}, DecodeConfig(spec=bundle.spec))
    rows = [parse_row(r) for r in csv.DictReader("".join(stage(decoded)["line"]).splitlines(), fieldnames=COLUMNS)]
    assert {(r["threshold"], r["operating_point"]) for r in rows} == {("0.45", "youden")}
    if pytest.importorskip("ray"):
        from cxr_deploy.batch.ray_engine import run_batch_ray

        config.operating_point = "sens80"
        with pytest.raises(BatchUsageError, match="sens80"):
            run_batch_ray(config, bundle=bundle)  # refused before any Ray work
        assert not config.out.exists()


@pytest.mark.parametrize("version", [2, 3])
def test_resume_continues_an_older_file_in_its_own_layout(tiny_bundle, tmp_path, version):
    import csv

    from cxr_deploy.api import run_batch
    from cxr_deploy.batch.results_file import LAYOUTS

    columns = LAYOUTS[version]
    full = tmp_path / "full.csv"
    run_batch(DICOMS, model=tiny_bundle, out=full, workers=0)
    old = tmp_path / f"v{version}.csv"
    write_old_layout(full, old, columns, version, rows=1)
    summary = run_batch(DICOMS, model=tiny_bundle, out=old, workers=0, resume=True)
    assert summary.previous["ok"] == 1 and summary.counts["ok"] == 1
    with open(old, newline="") as fh:
        raw = list(csv.reader(fh))
    assert tuple(raw[0]) == columns and all(len(r) == len(columns) for r in raw)
    assert {r[columns.index("schema_version")] for r in raw[1:]} == {str(version)}
