"""A blank, near-constant or saturated image (as displayed, after its own window) is an ``error`` row
``blank or saturated image``, never a probability: in the local workers, with ``--preprocess-on
device``, in the Ray decode stage, in the Python API and in ``pacs listen``. Real films are not."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from cxr_deploy.batch.results_file import read_results
from tests.support import SAMPLES, run_cli

BLANK_DX = "pylibjpeg_data/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm"  # DX, all white after its window
FILM = SAMPLES / "dicom" / "IM000004"


@pytest.fixture(scope="module")
def blank_inputs(shared_data, tmp_path_factory):
    """The blank DX, a near-constant PNG, a saturated PNG (99 % white, some detail), and two real films."""
    folder = tmp_path_factory.mktemp("blank")
    rng = np.random.default_rng(0)
    Image.fromarray((128 + rng.integers(-1, 2, (200, 160))).astype(np.uint8)).save(folder / "flat.png")
    saturated = np.full((200, 160), 255, np.uint8)
    saturated[:2] = rng.integers(0, 255, (2, 160))  # 1 % of the pixels carry something
    Image.fromarray(saturated).save(folder / "saturated.png")
    films = [FILM, sorted((SAMPLES / "images" / "PNEUMONIA").iterdir())[0]]
    return [shared_data / "dicom" / BLANK_DX, folder / "flat.png", folder / "saturated.png", *films]


def assert_blank_rows(rows_by_path: dict, inputs) -> None:
    for path in inputs[:3]:
        row = rows_by_path[str(path)]
        assert row["status"] == "error" and row["error"].startswith("blank or saturated image"), row
        assert row["probability"] in ("", None) and row["predicted_label"] in ("", None), row
    for path in inputs[3:]:
        assert rows_by_path[str(path)]["status"] == "ok"


@pytest.mark.parametrize("preprocess_on", ["workers", "device"])
def test_batch_gives_blank_images_an_error_row(tiny_bundle, blank_inputs, tmp_path, preprocess_on):
    out = tmp_path / "r.csv"
    result = run_cli("batch", *blank_inputs, "-m", tiny_bundle, "-o", out, "-j", "1", "--no-progress",
                     "--preprocess-on", preprocess_on)
    assert result.returncode == 3, result.stderr  # error rows: exit 3, a script sees it
    assert_blank_rows({r["path"]: r for r in read_results(out)}, blank_inputs)


def test_api_gives_blank_images_and_arrays_an_error_row(tiny_bundle, blank_inputs):
    import cxr_deploy

    records = cxr_deploy.load(tiny_bundle).predict([*blank_inputs, np.full((64, 64), 0.5, np.float32)])
    assert_blank_rows({r["path"]: r for r in records}, blank_inputs)
    assert records[-1]["status"] == "error" and records[-1]["error"].startswith("blank or saturated image")


def test_ray_decode_stage_gives_blank_images_an_error_row(tiny_bundle, blank_inputs):
    from cxr_deploy.batch.decode import DecodeConfig
    from cxr_deploy.batch.ray_stages import decode_batch
    from cxr_deploy.bundle import ModelBundle

    decoded = decode_batch({"path": np.array([str(p) for p in blank_inputs], dtype=object)},
                           DecodeConfig(spec=ModelBundle.load(tiny_bundle).spec))
    rows = {p: {"status": s, "error": e, "probability": None, "predicted_label": None}
            for p, s, e in zip(decoded["path"], decoded["status"], decoded["error"])}
    assert_blank_rows(rows, blank_inputs)


def test_pacs_listen_scores_no_blank_image_and_sends_no_sr_for_it(tiny_bundle, shared_data, tmp_path):
    from cxr_deploy.pacs.passes import score_and_push

    spool = tmp_path / "spool"
    (spool / "incoming" / "s").mkdir(parents=True)
    shutil.copy(shared_data / "dicom" / BLANK_DX, spool / "incoming" / "s" / "blank.dcm")
    shutil.copy(FILM, spool / "incoming" / "s" / "film.dcm")
    score_and_push(spool, spool / "incoming", str(tiny_bundle), None, workers=0, uid_root="2.25")
    rows = {r["path"].rsplit("/", 1)[1]: r for r in read_results(spool / "results.csv")}
    assert rows["blank.dcm"]["status"] == "error" and rows["blank.dcm"]["error"].startswith("blank or saturated")
    assert rows["film.dcm"]["status"] == "ok"
    assert len(list((spool / "results").glob("*.sr.dcm"))) == 1  # the film's only


def test_real_films_are_not_blank(shared_data):
    from cxr_deploy.eligibility import DEFAULT_FILTER
    from cxr_deploy.imaging.reader import read_stored

    films = [p for p in sorted(SAMPLES.rglob("*")) if p.is_file() and p.suffix not in (".csv", ".md", ".py")]
    films += sorted(p for p in (shared_data / "cxr").rglob("*.jpeg"))[::4]
    films += sorted(p for p in (shared_data / "adult_cxr").rglob("*.png"))[::4]
    assert len(films) > 100
    for path in films:
        read_stored(path, eligibility=DEFAULT_FILTER)  # raises UnreadableImage for a blank one
