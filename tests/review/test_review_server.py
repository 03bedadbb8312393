"""The real ``cxr-deploy review`` server over real HTTP: the token, path safety, the rows API, the
verdict endpoint, the operating-point figures, and a clean stop on SIGTERM."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time

import pytest

from cxr_deploy.batch.results_file import ResultsWriter, iter_results

from tests.review.helpers import readline, wilson


@pytest.fixture(scope="module")
def crafted(review_run, tmp_path_factory) -> dict:
    """A second results CSV whose rows point where they must not be served from: an input that is
    a symlink leading out of every folder the results name, an overlay that is such a symlink, and
    an overlay made for another input."""
    root = review_run["dir"]
    outside = tmp_path_factory.mktemp("outside")
    secret = outside / "secret.jpeg"
    jpegs = sorted((review_run["samples"] / "images").rglob("*.jpeg"))
    shutil.copy(jpegs[0], secret)
    rows = [r for r in iter_results(review_run["results"]) if r["status"] == "ok" and r["format"] == "jpeg"]
    link = review_run["samples"] / "images" / "escape.jpeg"
    if not link.is_symlink():
        os.symlink(secret, link)
    overlays = root / "overlays"
    bad_overlay = overlays / "escape-overlay.png"
    if not bad_overlay.is_symlink():
        os.symlink(secret, bad_overlay)
    crafted_rows = [
        dict(rows[0], path=str(link), overlay_path=""),  # the input escapes
        dict(rows[1], overlay_path=str(bad_overlay)),  # the overlay escapes
        dict(rows[2], overlay_path=rows[3]["overlay_path"]),  # another input's overlay
    ]
    path = root / "crafted.csv"
    with ResultsWriter(path, fsync=False) as writer:
        writer.write_rows(crafted_rows)
    return {"csv": path, "rows": crafted_rows}


@pytest.fixture(scope="module")
def server(review_run, crafted, tmp_path_factory):
    from tests.review.helpers import Server

    cwd = tmp_path_factory.mktemp("server")
    srv = Server([review_run["results"], crafted["csv"], "--labels", review_run["labels"], "--model",
                  review_run["bundle"], "--reviews", cwd / "reviews.csv"], cwd)
    yield srv
    srv.stop()


def test_every_request_needs_the_token(server):
    assert server.get("/api/meta", token=False).status == 403
    assert server.get("/api/meta", token=False, headers={"Authorization": "token wrong"}).status == 403
    assert server.get("/", token=False).status == 403
    assert server.get("/static/app.js", token=False).status == 403
    assert server.get("/image/0", token=False).status == 403
    assert server.post("/api/row/0/verdict", {"verdict": "agree"}, token=False).status == 403
    first = server.get(f"/?token={server.token}", token=False)  # the printed URL
    assert first.status == 303 and first.headers["location"] == "/"  # the token leaves the address bar
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    name_value = cookie.split(";")[0]
    page = server.get("/", token=False, headers={"Cookie": name_value})
    assert page.status == 200 and b"cxr-deploy review" in page.content
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "refused (403): GET /api/meta from 127.0.0.1: no token" in server.stderr()
    assert "invalid token" in server.stderr()


def test_only_files_the_results_name_are_served(server, crafted, review_run):
    rows = server.get("/api/rows?limit=500").json()["rows"]
    ids = {r["path"]: r["id"] for r in rows}
    for bad in ("/static/..%2F..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd", "/static/%2e%2e/app.js",
                "/image/..%2F..%2Fetc%2Fpasswd", "/image/99999", "/overlay/-1"):
        reply = server.get(bad)
        assert reply.status in (400, 403, 404), bad
        assert b"root:" not in reply.content
    assert server.get("/static/app.js").status == 200
    escaped = crafted["rows"][0]["path"]
    reply = server.get(f"/image/{ids[escaped]}")
    assert reply.status == 403 and b"outside the folders" in reply.content
    crafted_ids = [r["id"] for r in rows if r["id"] >= len(rows) - 3]
    reply = server.get(f"/overlay/{crafted_ids[1]}")  # the overlay is a symlink out of the overlay folder
    assert reply.status == 403 and b"outside the folders" in reply.content
    reply = server.get(f"/overlay/{crafted_ids[2]}")  # the overlay of another input
    assert reply.status == 403 and b"another input" in reply.content
    log = server.stderr()
    assert "refused (403): image:" in log and "escape.jpeg resolves to" in log
    assert "was not made for" in log and "refused (404): /static/" in log


def test_no_path_or_uid_in_any_url_the_page_uses(server):
    rows = server.get("/api/rows?limit=5").json()["rows"]
    detail = server.get(f"/api/row/{rows[0]['id']}").json()
    assert detail["path"] and "/image/" not in detail["path"]
    app_js = server.get("/static/app.js").content.decode()
    for url_part in ("/image/${", "/overlay/${", "/api/row/${"):
        assert url_part in app_js  # ids only: every URL the page builds takes a row id
    assert "encodeURIComponent(row.path" not in app_js and "?path=" not in app_js


def test_rows_api_pages_sorts_and_filters(server, review_run):
    results = list(iter_results(review_run["results"]))
    reply = server.get("/api/rows?status=ok&sort=probability&desc=1&limit=4").json()
    ok = sorted((r for r in results if r["status"] == "ok"), key=lambda r: -float(r["probability"]))
    assert reply["total"] == len(ok) + 3  # + the crafted rows (all ok)
    probabilities = [float(r["probability"]) for r in reply["rows"]]
    assert probabilities == sorted(probabilities, reverse=True)
    skipped = server.get("/api/rows?status=skipped").json()
    assert skipped["total"] == sum(r["status"] == "skipped" for r in results) == 3
    assert server.get("/api/rows?status=bogus").status == 400
    assert server.get("/api/rows?sort=path;drop").status == 400
    assert server.get("/api/rows?pmin=nan").status == 400


def test_verdicts_are_appended_and_checked(server):
    rows = server.get("/api/rows?status=ok&limit=3").json()["rows"]
    path = server.get("/api/meta").json()["reviews"]
    assert server.post(f"/api/row/{rows[0]['id']}/verdict", {"verdict": "agree"},
                       headers={"Content-Type": "text/plain"}).status == 415
    assert server.post(f"/api/row/{rows[0]['id']}/verdict", {"verdict": "agree"},
                       headers={"Origin": "http://evil.example"}).status == 403
    assert server.post(f"/api/row/{rows[0]['id']}/verdict", {"verdict": "maybe"}).status == 400
    reply = server.post(f"/api/row/{rows[0]['id']}/verdict", {"verdict": "agree", "reviewer": "ts", "comment": "ok"})
    assert reply.status == 200 and reply.json()["review"] == "agree"
    with open(path, newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert lines[-1]["verdict"] == "agree" and lines[-1]["path"] == rows[0]["path"]
    assert lines[-1]["reviewer"] == "ts" and lines[-1]["model_id"]
    assert server.get(f"/api/row/{rows[0]['id']}").json()["verdict"]["verdict"] == "agree"


def test_operating_point_figures(server, review_run):
    """Sensitivity, specificity, confusion and Wilson intervals, checked against a computation here."""
    labels = {}
    with open(review_run["labels"], newline="") as fh:
        for record in csv.DictReader(fh):
            labels[os.path.normpath(review_run["samples"] / record["path"])] = record["label"]
    rows = [r for r in iter_results(review_run["results"]) if r["status"] == "ok"]
    crafted = [r for r in server.get("/api/rows?limit=500").json()["rows"] if r["id"] >= len(list(iter_results(review_run["results"])))]
    pairs = [(float(r["probability"]), labels[r["path"]] == "PNEUMONIA") for r in rows if r["path"] in labels]
    pairs += [(float(r["probability"]), r["label"] == "PNEUMONIA") for r in crafted if r["label"]]
    for threshold in (0.0, 0.41, 0.415, 0.42, 1.0):
        m = server.get(f"/api/metrics?threshold={threshold}&source=labels").json()
        tp = sum(p >= threshold and y for p, y in pairs)
        fn = sum(p < threshold and y for p, y in pairs)
        tn = sum(p < threshold and not y for p, y in pairs)
        fp = sum(p >= threshold and not y for p, y in pairs)
        assert m["confusion"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
        assert m["n"] == len(pairs)
        assert m["sensitivity_ci"] == pytest.approx(wilson(tp, tp + fn))
        assert m["specificity_ci"] == pytest.approx(wilson(tn, tn + fp))
    points = {p["name"]: p["threshold"] for p in server.get("/api/meta").json()["points"]}
    assert points == {"sens95": 0.41, "youden": 0.415, "default": 0.5}
    assert server.get("/api/metrics?threshold=2").status == 400


def test_sigterm_stops_the_server_cleanly(review_run, start_server, tmp_path):
    srv = start_server([review_run["results"], "--reviews", tmp_path / "r.csv"], tmp_path)
    started = time.monotonic()
    code = srv.stop(signal.SIGTERM)
    assert code == 0 and time.monotonic() - started < 10
    assert "stopping: every verdict saved so far is in" in srv.stderr()
    srv2 = start_server([review_run["results"], "--reviews", tmp_path / "r.csv"], tmp_path)
    assert srv2.stop(signal.SIGINT) == 0


def test_host_other_than_loopback_warns(review_run, tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", "review", str(review_run["results"]),
                             "--host", "0.0.0.0", "--port", "0", "--reviews", str(tmp_path / "r.csv")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = readline(proc, 60)
        assert line.startswith("review: http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert "warning: listening on 0.0.0.0" in err and proc.returncode == 0


def test_the_page_ships_in_the_package_and_fetches_nothing_from_outside():
    import re
    from importlib import resources

    try:
        import tomllib
    except ImportError:  # Python 3.10: the train extra's tomli
        tomllib = pytest.importorskip("tomli")

    from cxr_deploy.review.server import ASSETS
    from tests.support import REPO_ROOT

    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "cxr_deploy.review" in config["packages"]
    assert config["package-data"]["cxr_deploy.review"] == ["static/*"]
    static = resources.files("cxr_deploy.review").joinpath("static")
    for name in ASSETS:
        text = static.joinpath(name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{name} loads from outside"


def test_the_original_is_what_the_reader_gives_and_window_level_is_the_windows(server, review_run):
    """A DICOM is rendered by the project's reader and VOI (as batch saw it); level/window re-render
    it with a linear window over the modality-rescaled values."""
    from io import BytesIO

    import numpy as np
    from PIL import Image

    from cxr_deploy.imaging import pixel_transforms as px
    from cxr_deploy.imaging.reader import read_image, read_stored

    rows = server.get("/api/rows?limit=500&status=ok").json()["rows"]
    for row in rows:
        if not row["path"].endswith((".dcm", "IM000004")):
            continue
        reply = server.get(f"/image/{row['id']}")
        assert reply.status == 200 and reply.headers["content-type"] == "image/png"
        shown = np.asarray(Image.open(BytesIO(reply.content)))
        expected = np.round(read_image(row["path"]).pixels * 255).astype(np.uint8)
        assert shown.shape == expected.shape and np.array_equal(shown, expected), row["path"]
        detail = server.get(f"/api/row/{row['id']}").json()
        window = detail["window"]
        assert window is not None and window["min"] < window["max"]
        stored = read_stored(row["path"])
        if stored.plan.voi == "lut":
            continue
        centre, width = (window["min"] + window["max"]) / 2, (window["max"] - window["min"]) / 3
        reply = server.get(f"/image/{row['id']}?wc={centre}&ww={width}")
        values = px.rescale(stored.stored, *stored.plan.rescale) if stored.plan.rescale else stored.stored
        gray = px.window(values, centre, width, "LINEAR")
        gray = 1 - gray if stored.plan.invert else gray
        assert np.array_equal(np.asarray(Image.open(BytesIO(reply.content))), np.round(gray * 255).astype(np.uint8))
    jpeg = next(r for r in rows if r["path"].endswith(".jpeg"))
    assert server.get(f"/api/row/{jpeg['id']}").json()["window"] is None  # W/L: DICOM only


def test_two_servers_share_one_reviews_file(review_run, start_server, tmp_path):
    reviews = tmp_path / "shared.csv"
    one = start_server([review_run["results"], "--reviews", reviews], tmp_path)
    two = start_server([review_run["results"], "--reviews", reviews], tmp_path)
    ids = [r["id"] for r in one.get("/api/rows?status=ok&limit=2").json()["rows"]]
    assert one.post(f"/api/row/{ids[0]}/verdict", {"verdict": "agree"}).status == 200
    assert two.post(f"/api/row/{ids[1]}/verdict", {"verdict": "unsure"}).status == 200
    assert two.post(f"/api/row/{ids[0]}/verdict", {"verdict": "unsure"}).status == 200  # a second opinion: latest wins
    for srv in (one, two):
        rows = {r["id"]: r["review"] for r in srv.get("/api/rows?status=ok").json()["rows"]}
        assert rows[ids[0]] == "unsure" and rows[ids[1]] == "unsure"
    with open(reviews, newline="") as fh:
        assert [line["verdict"] for line in csv.DictReader(fh)] == ["agree", "unsure", "unsure"]


def test_next_row_keeps_its_place_when_the_current_row_leaves_the_filter(review_run, start_server, tmp_path):
    """Reviewing under "not yet reviewed": the row just reviewed leaves the list, and next is the
    row after it, not the top of the list."""
    srv = start_server([review_run["results"], "--reviews", tmp_path / "r.csv"], tmp_path)
    ids = [r["id"] for r in srv.get("/api/rows?status=ok&unreviewed=1").json()["rows"]]
    assert srv.post(f"/api/row/{ids[2]}/verdict", {"verdict": "unsure"}).status == 200
    following = srv.get(f"/api/row/{ids[2]}/neighbour?status=ok&unreviewed=1&dir=next").json()
    assert following["id"] == ids[3] and following["total"] == len(ids) - 1
    before = srv.get(f"/api/row/{ids[2]}/neighbour?status=ok&unreviewed=1&dir=prev").json()
    assert before["id"] == ids[1]
    assert srv.get(f"/api/row/{ids[3]}/neighbour?status=ok&unreviewed=1&dir=prev").json()["id"] == ids[1]
