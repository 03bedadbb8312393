"""The review page in a real browser: Playwright for Python driving the Debian ``chromium``
package (``executable_path``: nothing is downloaded), one browser for the module, started and
stopped here. Takes the page's screenshot; with ``CXR_DEPLOY_UPDATE_SCREENSHOT=1`` it replaces the
documentation's, docs/images/review.png (otherwise a test run would leave the tree changed)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from cxr_deploy.batch.overlay import IDENTITY_KEY, identity_text
from cxr_deploy.batch.results_file import iter_results

from tests.review.helpers import Server, wilson

CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "review.png"
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed: "
                                         "pip install -e '.[dev]'")
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CXR_CHROMIUM)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def session(review_run, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("browser")
    reviews = cwd / "REVIEWS.csv"
    server = Server([review_run["results"], "--labels", review_run["labels"], "--model", review_run["bundle"],
                     "--reviews", reviews], cwd)
    try:
        yield server, reviews
    finally:
        server.stop()


@pytest.fixture()
def page(browser, session):
    server, _ = session
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        page.goto(server.url)
        page.wait_for_selector("body[data-ready='1'][data-loaded='1']")
        yield page
    finally:
        context.close()


def _until(page, expression: str, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll a JavaScript expression until it is true. (Playwright's wait_for_function compiles the
    predicate with eval, which the page's Content-Security-Policy forbids, as it should: the page
    is tested with its CSP in force.)"""
    import time

    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def _column(page, cls) -> list[str]:
    return page.locator(f"#rows tbody td.{cls}").all_inner_texts()


def _wait_rows(page, before: str) -> None:
    _until(page, f"document.body.dataset.rowsLoaded !== '{before}'")


def _reload_rows(page, action) -> None:
    before = page.evaluate("document.body.dataset.rowsLoaded")
    action()
    _wait_rows(page, before)


def test_sort_and_filter(page, review_run):
    results = list(iter_results(review_run["results"]))
    assert page.locator("#rows tbody tr").count() == len(results)
    assert page.evaluate("location.search") == ""  # the token left the address bar
    _reload_rows(page, lambda: page.click("#rows th[data-sort=probability]"))
    ok = sorted(float(r["probability"]) for r in results if r["status"] == "ok")
    shown = [float(t) for t in _column(page, "probability") if t]
    assert shown == pytest.approx(ok, abs=5e-5) and _column(page, "probability")[-1] == ""  # empties last
    _reload_rows(page, lambda: page.click("#rows th[data-sort=probability]"))  # again: descending
    assert float(_column(page, "probability")[0]) == pytest.approx(ok[-1], abs=5e-5)
    _reload_rows(page, lambda: page.select_option("#filters select[name=status]", "skipped"))
    assert _column(page, "status") == ["skipped"] * sum(r["status"] == "skipped" for r in results)
    _reload_rows(page, lambda: page.select_option("#filters select[name=status]", "ok"))
    decision = results[[r["status"] for r in results].index("ok")]["predicted_label"]
    _reload_rows(page, lambda: page.select_option("#filters select[name=decision]", decision))
    expected = [r for r in results if r["status"] == "ok" and r["predicted_label"] == decision]
    assert _column(page, "decision") == [decision] * len(expected)
    _reload_rows(page, lambda: page.click("#filters button[type=reset]"))
    assert page.locator("#rows tbody tr").count() == len(results)


def test_viewer_shows_the_rows_own_overlay(page, review_run):
    rows = {r["path"]: r for r in iter_results(review_run["results"])}
    dicom = next(p for p, r in rows.items() if r["status"] == "ok" and r["format"] == "dicom" and r["overlay_path"])
    page.locator("#rows tbody tr", has=page.locator(f"td.image[title^='{dicom}']")).click()
    _until(page, "document.querySelector('#overlay').complete && document.querySelector('#overlay').naturalWidth > 0"
                           " && document.querySelector('#original').naturalWidth > 0")
    row_id = int(page.get_attribute("#viewer", "data-row"))
    assert page.get_attribute("#overlay", "src") == f"/overlay/{row_id}"  # ids in URLs, never paths
    # The overlay the browser shows, fetched with the page's own cookie, was made for this row's input.
    image = page.request.get(f"{page.url.rstrip('/')}/overlay/{row_id}")
    assert image.ok
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(image.body())) as shown:
        assert shown.info[IDENTITY_KEY] == identity_text(dicom, rows[dicom]["sop_instance_uid"])
        assert page.inner_text("#caption").strip() == shown.info["Description"].strip()
    assert rows[dicom]["predicted_label"] in page.inner_text("#caption")
    # DICOM: window/level controls; moving the level re-renders through the server
    assert page.is_visible("#window-controls")
    page.evaluate("(() => { const wc = document.querySelector('#wc'); wc.value = Number(wc.value) + 40;"
                  " wc.dispatchEvent(new Event('input')); })()")
    _until(page, "document.querySelector('#original').src.includes('wc=')")
    _until(page, "document.querySelector('#original').complete && document.querySelector('#original').naturalWidth > 0")
    page.keyboard.press("+")
    assert page.inner_text("#zoom-level") == "150%"
    page.keyboard.press("0")


def test_three_verdicts_persist_after_reload(page, session):
    server, reviews = session
    _reload_rows(page, lambda: page.select_option("#filters select[name=status]", "ok"))
    first = page.locator("#rows tbody tr").first
    first.click()
    page.wait_for_selector("#viewer:not([hidden])")
    marked = {}
    for key, verdict in (("a", "agree"), ("d", "disagree"), ("u", "unsure")):
        row_id = page.get_attribute("#viewer", "data-row")
        page.wait_for_selector("#verdict-state:has-text('not reviewed'), #verdict-state:has-text('saved')")
        page.keyboard.press(key)
        page.wait_for_selector(f"#verdict-box[data-verdict='{verdict}']")
        marked[int(row_id)] = verdict
        page.keyboard.press("j")  # next row
        _until(page, f"document.querySelector('#viewer').dataset.row !== '{row_id}'")
    with open(reviews, newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert [line["verdict"] for line in lines[-3:]] == ["agree", "disagree", "unsure"]
    page.reload()
    page.wait_for_selector("body[data-ready='1'][data-loaded='1']")
    for row_id, verdict in marked.items():
        cell = page.locator(f"#rows tbody tr[data-id='{row_id}'] td.review")
        assert cell.inner_text().startswith(verdict)
    _reload_rows(page, lambda: page.check("#filters input[name=unreviewed]"))
    shown = {int(i) for i in page.locator("#rows tbody tr").evaluate_all("rows => rows.map(r => r.dataset.id)")}
    assert not shown & set(marked)


def _labelled(review_run) -> list[tuple[float, bool]]:
    labels = {}
    with open(review_run["labels"], newline="") as fh:
        for record in csv.DictReader(fh):
            labels[os.path.normpath(review_run["samples"] / record["path"])] = record["label"] == "PNEUMONIA"
    return [(float(r["probability"]), labels[r["path"]]) for r in iter_results(review_run["results"])
            if r["status"] == "ok" and r["path"] in labels]


def _expected(pairs, threshold):
    tp = sum(p >= threshold and y for p, y in pairs)
    fn = sum(p < threshold and y for p, y in pairs)
    tn = sum(p < threshold and not y for p, y in pairs)
    fp = sum(p >= threshold and not y for p, y in pairs)
    return tp, fn, tn, fp


def _check_figures(page, pairs, threshold):
    _until(page, f"Number(document.querySelector('#op').dataset.threshold) === {threshold}")
    tp, fn, tn, fp = _expected(pairs, threshold)
    assert [page.inner_text(f"#{k}") for k in ("tp", "fn", "tn", "fp")] == [str(v) for v in (tp, fn, tn, fp)]
    sens, spec = (tp / (tp + fn) if tp + fn else None), (tn / (tn + fp) if tn + fp else None)
    assert page.inner_text("#sens") == (f"{sens:.3f}" if sens is not None else "—")
    assert page.inner_text("#spec") == (f"{spec:.3f}" if spec is not None else "—")
    lo, hi = wilson(tp, tp + fn)
    assert page.inner_text("#sens-ci") == f"95% CI {lo:.3f}–{hi:.3f}"
    lo, hi = wilson(tn, tn + fp)
    assert page.inner_text("#spec-ci") == f"95% CI {lo:.3f}–{hi:.3f}"


def test_slider_figures_match_an_independent_computation(page, review_run):
    pairs = _labelled(review_run)
    assert len(pairs) == 12
    probabilities = sorted(p for p, _ in pairs)
    middle = round((probabilities[5] + probabilities[6]) / 2, 6)  # splits the images in two
    page.fill("#threshold-value", str(middle))
    _check_figures(page, pairs, middle)
    page.click("#marks button.mark:has-text('sens95')")  # the bundle's named point
    _check_figures(page, pairs, 0.41)
    page.evaluate("(() => { const s = document.querySelector('#threshold'); s.value = 0.9;"
                  " s.dispatchEvent(new Event('input')); })()")  # the slider itself
    _check_figures(page, pairs, 0.9)
    assert page.locator("#marks button.mark").all_inner_texts() == ["sens95 0.410", "youden 0.415", "default 0.500"]


def test_refusals_and_screenshot(browser, page, session, review_run):
    server, _ = session
    stranger = browser.new_context()  # no cookie: no token
    try:
        reply = stranger.request.get(f"{server.base}/api/rows")
        assert reply.status == 403
        reply = stranger.request.get(f"{server.base}/")
        assert reply.status == 403
    finally:
        stranger.close()
    for bad in ("/static/..%2F..%2F..%2Fetc%2Fpasswd", "/image/..%2F..%2Fetc%2Fpasswd", "/overlay/99999"):
        reply = page.request.get(server.base + bad)
        assert reply.status in (403, 404), bad
        assert b"root:" not in reply.body()
    assert "refused (403)" in server.stderr() and "refused (404)" in server.stderr()
    # The documentation's screenshot: a flagged film open beside its overlay, the slider at sens95.
    rows = list(iter_results(review_run["results"]))
    pneumonia = next(r["path"] for r in rows if r["status"] == "ok" and "PNEUMONIA" in r["path"] and r["format"] == "jpeg")
    page.locator("#rows tbody tr", has=page.locator(f"td.image[title^='{pneumonia}']")).click()
    _until(page, "document.querySelector('#overlay').naturalWidth > 0 && document.querySelector('#original').naturalWidth > 0")
    page.click("#marks button.mark:has-text('sens95')")
    _until(page, "Number(document.querySelector('#op').dataset.threshold) === 0.41")
    shot = SCREENSHOT if os.environ.get("CXR_DEPLOY_UPDATE_SCREENSHOT") == "1" else review_run["dir"] / "review.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 20_000
