"""The per-image out-of-population flag (cxr_deploy.in_population), on real films: adult chest films
against pediatric ones, through every backend, the CLI's CSV, overlays, report and SR, the API, and
the DICOM age check."""

from __future__ import annotations

import csv
import html
import shutil

import numpy as np
import pytest

from cxr_deploy import in_population
from cxr_deploy.bundle import ModelBundle
from tests.support import SAMPLES, adult_images, kermany_images, run_cli


def test_age_in_years_from_dicom_age_strings_and_dates():
    age = in_population.age_years
    assert age("045Y") == 45 and age("018M") == 1.5 and age("026W") == pytest.approx(0.498, abs=1e-3)
    assert age("010D") == pytest.approx(10 / 365.25, abs=1e-3)
    assert age(None, "20200301", "20170301") == pytest.approx(3.0, abs=0.01)  # StudyDate - PatientBirthDate
    assert age("", "20200301", "") is None and age("45") is None and age("abcY") is None
    assert age(None, "20100101", "20200101") is None  # born after the study: not an age
    assert in_population.judge(None, 45.0, None, (1.0, 5.0))[0] == "no"
    assert in_population.judge(None, None, None, (1.0, 5.0)) == ("", "")  # unknown age: not judged
    assert in_population.judge(10.0, 3.0, 20.0, (1.0, 5.0)) == ("yes", "")


def _tensors(bundle, paths):
    from cxr_deploy.imaging import read_image

    return np.stack([bundle.spec.apply(read_image(p).pixels) for p in paths])


def test_adult_films_score_outside_and_every_backend_agrees(population_bundle, shared_data):
    from cxr_deploy.serving.backends import open_backend

    bundle = ModelBundle.load(population_bundle)
    threshold = in_population.load(bundle).threshold
    adult = _tensors(bundle, adult_images(shared_data, 24))
    children = _tensors(bundle, [p for p, _ in kermany_images(shared_data, 12, skip=200)])  # not fitted on
    scores = {}
    for name in ("torch", "torchscript", "onnx", "onnx-int8"):
        backend = open_backend(bundle, name, "cpu", threads=2)
        scores[name] = np.concatenate([backend(adult)[2], backend(children)[2]])
    eager, n = scores["torch"], len(adult)
    assert eager[:n].mean() > 1.3 * eager[n:].mean()
    assert np.mean(eager[:n] > threshold) >= 0.75 and np.mean(eager[n:] > threshold) <= 0.25
    for name in ("torchscript", "onnx"):  # the same graph: float rounding only
        np.testing.assert_allclose(scores[name], eager, rtol=1e-4)
    int8 = scores["onnx-int8"]  # quantized backbone, float score: close, not equal
    assert np.corrcoef(int8, eager)[0, 1] > 0.9
    assert np.mean((int8 > threshold) == (eager > threshold)) >= 0.85


def test_the_parity_gate_compares_the_population_score(population_bundle, tmp_path):
    """An ONNX model whose score differs from the eager model's fails ``export --check``."""
    import onnx
    from onnx import numpy_helper

    directory = tmp_path / "tampered"
    shutil.copytree(population_bundle, directory)
    model = onnx.load(directory / "model.onnx")
    whiten = in_population.load(ModelBundle.load(population_bundle)).whiten
    for i, tensor in enumerate(model.graph.initializer):
        value = numpy_helper.to_array(tensor)
        if value.shape == whiten.shape:  # the whitening matrix, a graph constant
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value * np.float32(1.01), tensor.name))
    (directory / "model.onnx").unlink()
    onnx.save(model, directory / "model.onnx")
    bundle = ModelBundle.load(directory, verify=False)
    for name in ("model.onnx", "model.int8.onnx", "model.ts"):  # only the tampered graph is checked
        if name != "model.onnx":
            bundle.remove_artifact(name)
    bundle.add_artifact("model.onnx", **{k: v for k, v in bundle.manifest.artifacts["model.onnx"].items()
                                         if k not in ("sha256", "bytes")})
    result = run_cli("export", directory, "--check", timeout=300)
    assert result.returncode != 0
    assert "population_score" in result.stdout + result.stderr


def _labelled_folder(folder, shared_data):
    folder.mkdir()
    labels = [("path", "label")]
    for i, path in enumerate(adult_images(shared_data, 3)):
        (folder / f"adult{i}.png").symlink_to(path)
        labels.append((str(folder / f"adult{i}.png"), "PNEUMONIA"))
    for i, (path, y) in enumerate(kermany_images(shared_data, 2, skip=300)):
        (folder / f"child{i}.jpeg").symlink_to(path)
        labels.append((str(folder / f"child{i}.jpeg"), "PNEUMONIA" if y else "NORMAL"))
    with open(folder.parent / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(labels)
    return folder.parent / "labels.csv"


def test_batch_csv_overlays_and_report_carry_the_flag(population_bundle, shared_data, tmp_path):
    from PIL import Image

    from cxr_deploy.batch.results_file import SCHEMA_VERSION, iter_results

    labels = _labelled_folder(tmp_path / "films", shared_data)
    out, cams = tmp_path / "results.csv", tmp_path / "cams"
    cams.mkdir()
    result = run_cli("batch", tmp_path / "films", "-m", population_bundle, "-o", out, "--cam-dir", cams,
                     "--labels", labels, "--workers", "0")
    assert result.returncode == 0, result.stderr
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in iter_results(out)}
    outside = sum(r["in_population"] == "no" for r in rows.values())
    assert f"outside the training population: {outside} of {len(rows)} scored images" in result.stderr
    assert {r["schema_version"] for r in rows.values()} == {str(SCHEMA_VERSION)} == {"4"}
    adults = [r for name, r in rows.items() if name.startswith("adult")]
    children = [r for name, r in rows.items() if name.startswith("child")]
    assert all(r["population_score"] for r in rows.values())
    assert sum(r["in_population"] == "no" for r in adults) >= 2
    assert all(r["in_population"] == "yes" and not r["population_reason"] for r in children)
    flagged = next(r for r in adults if r["in_population"] == "no")
    assert flagged["probability"] and "unlike the training population" in flagged["population_reason"]
    text = Image.open(flagged["overlay_path"]).text  # the overlay's caption and footer, as drawn
    assert any("Outside the model's training population" in v for v in text.values()), text
    child_text = Image.open(children[0]["overlay_path"]).text
    assert not any("Outside the model's training population" in v for v in child_text.values())
    report = html.unescape((tmp_path / "results_report" / "report.html").read_text())
    assert "outside the model's training population" in report


def _aged_dicoms(folder, ages):
    import pydicom
    from pydicom.uid import generate_uid

    source = SAMPLES / "dicom" / "normal_dx_16bit_rescale_window.dcm"  # a Kermany film as a DX chest PA
    folder.mkdir()
    out = []
    for age in ages:
        ds = pydicom.dcmread(source)
        ds.PatientAge = age
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"age{age}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


def test_a_dicom_patient_age_outside_the_training_ages_is_flagged_in_the_row_and_the_sr(
        population_bundle, shared_data, tmp_path):
    import pydicom

    from cxr_deploy.batch.results_file import iter_results

    adult, child = _aged_dicoms(tmp_path / "dicom", ["045Y", "003Y"])
    out, sr_dir = tmp_path / "results.csv", tmp_path / "sr"
    sr_dir.mkdir()
    result = run_cli("batch", adult, child, "-m", population_bundle, "-o", out, "--dicom-out", sr_dir,
                     "--workers", "0", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: r for r in iter_results(out)}
    assert rows[str(adult)]["in_population"] == "no"
    assert "patient age 45 y outside the training ages 1-5 y" in rows[str(adult)]["population_reason"]
    assert "patient age" not in rows[str(child)]["population_reason"]  # 3 years: inside (the film may not be)
    assert "patient_age_years" not in rows[str(adult)]  # the age itself is never a column
    uid = pydicom.dcmread(adult, stop_before_pixels=True).SOPInstanceUID
    sr = pydicom.dcmread(next(sr_dir.glob(f"{uid}.*.sr.dcm")))
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]  # the algorithm's parameters
    assert any(t.startswith("caveat=Outside the model's training population") for t in texts), texts


def test_api_records_and_a_bundle_without_statistics(population_bundle, tiny_bundle, shared_data):
    import cxr_deploy

    adult, child = adult_images(shared_data, 1)[0], kermany_images(shared_data, 1, skip=300)[0][0]
    records = cxr_deploy.load(population_bundle, backend="onnx").predict([adult, child])
    assert records[1]["in_population"] == "yes" and records[1]["population_score"] > 0
    assert records[0]["population_score"] > records[1]["population_score"]
    old = cxr_deploy.load(tiny_bundle, backend="onnx").predict([adult])[0]  # made before the flag
    assert old["status"] == "ok" and old["population_score"] is None and old["in_population"] is None
    said = run_cli("inspect", tiny_bundle).stdout + run_cli("inspect", population_bundle).stdout
    assert "out-of-population flag: none" in said and "training ages 1-5 y" in said


@pytest.mark.parametrize("n", [40, 300])
def test_principal_axes_are_those_of_the_covariance_whichever_way_they_are_computed(n):
    """Fewer images than features: the axes come from the SVD of the data, not the covariance's
    eigh; the variances and the axes (up to sign) must be the covariance's all the same."""
    from cxr_deploy.training.population_fit import principal_axes

    rng = np.random.default_rng(n)
    centred = rng.standard_normal((n, 120)) * np.linspace(0.2, 3, 120)
    centred -= centred.mean(axis=0)
    values, vectors = principal_axes(centred, n - 1)
    expected, axes = np.linalg.eigh(centred.T @ centred / (n - 1))
    expected, axes = expected[::-1], axes[:, ::-1]
    k = min(n - 1, 120)
    assert np.all(np.diff(values[:k]) <= 0)
    np.testing.assert_allclose(values[:k], expected[:k], rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(vectors[:, :k] * axes[:, :k], axis=0)), 1, atol=1e-6)
