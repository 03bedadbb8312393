"""The verdict store (REVIEWS.csv) and its reading as labels; the table's paging, sorting and
filters; input that is not a results CSV. No server here (see test_review_server.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import ResultsWriter
from cxr_deploy.labels import LabelsError, REVIEW_COLUMNS, labels_from_reviews, latest_reviews, read_labels_csv
from cxr_deploy.review.store import ReviewsError, VerdictStore
from cxr_deploy.review.table import NotResults, Table
from tests.support import run_cli

CLASSES = ("NORMAL", "PNEUMONIA")


def _row(i, p=0.3, status="ok", sop="", model="m1"):
    return {"path": f"/data/x/IM-{i:04d}.png", "status": status, "probability": p if status == "ok" else None,
            "predicted_label": ("PNEUMONIA" if p >= 0.5 else "NORMAL") if status == "ok" else None,
            "threshold": 0.5, "sop_instance_uid": sop, "model_id": model, "operating_point": "default"}


def _lines(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_latest_verdict_wins_and_every_line_stays(tmp_path):
    store = VerdictStore(tmp_path / "reviews.csv")
    row = _row(1, 0.7)
    store.append(row, verdict="agree", reviewer="ab", class_names=CLASSES)
    store.append(_row(2, 0.2), verdict="unsure", class_names=CLASSES)
    store.append(row, verdict="disagree", correct_class="NORMAL", comment="  two\nlines ", class_names=CLASSES)
    lines = _lines(tmp_path / "reviews.csv")
    assert [line["verdict"] for line in lines] == ["agree", "unsure", "disagree"]  # append-only: nothing rewritten
    assert tuple(lines[0]) == REVIEW_COLUMNS
    latest = VerdictStore(tmp_path / "reviews.csv").latest  # a fresh reader: what a restart sees
    assert latest[(row["path"], "", "m1")]["verdict"] == "disagree"
    assert latest[(row["path"], "", "m1")]["correct_class"] == "NORMAL"
    assert latest[(row["path"], "", "m1")]["comment"] == "two lines"
    assert len(latest) == 2


def test_key_is_path_sop_and_model(tmp_path):
    store = VerdictStore(tmp_path / "r.csv")
    store.append(_row(1, 0.7, sop="1.2.3", model="m1"), verdict="agree", class_names=CLASSES)
    store.append(_row(1, 0.7, sop="1.2.3", model="m2"), verdict="disagree", correct_class="NORMAL", class_names=CLASSES)
    store.append(_row(1, 0.7, sop="1.2.4", model="m1"), verdict="unsure", class_names=CLASSES)
    assert len(store.latest) == 3


def test_bad_verdicts_are_refused_and_nothing_is_written(tmp_path):
    store = VerdictStore(tmp_path / "r.csv")
    with pytest.raises(ReviewsError, match="one of agree"):
        store.append(_row(1), verdict="maybe", class_names=CLASSES)
    with pytest.raises(ReviewsError, match="correct class"):
        store.append(_row(1, 0.2), verdict="disagree", correct_class="NORMAL", class_names=CLASSES)  # = decision
    with pytest.raises(ReviewsError, match="scored row"):
        store.append(_row(1, status="error"), verdict="agree", class_names=CLASSES)
    assert not (tmp_path / "r.csv").exists()


def test_formula_cells_are_guarded_and_read_back(tmp_path):
    store = VerdictStore(tmp_path / "r.csv")
    store.append(_row(1), verdict="agree", comment="=HYPERLINK(\"http://x\")", reviewer="+ab", class_names=CLASSES)
    raw = (tmp_path / "r.csv").read_text()
    assert "'=HYPERLINK" in raw and "'+ab" in raw
    entry = VerdictStore(tmp_path / "r.csv").latest[(_row(1)["path"], "", "m1")]
    assert entry["comment"] == '=HYPERLINK("http://x")' and entry["reviewer"] == "+ab"


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "r.csv"
    store = VerdictStore(path)
    store.append(_row(1), verdict="agree", class_names=CLASSES)
    with open(path, "ab") as fh:
        fh.write(b'1,/data/x/IM-0002.png,,m1,agr')  # a crash mid-line
    assert len(latest_reviews(path)) == 1
    store.append(_row(3), verdict="unsure", class_names=CLASSES)
    lines = _lines(path)
    assert [line["path"] for line in lines] == ["/data/x/IM-0001.png", "/data/x/IM-0003.png"]


def test_concurrent_appenders_lose_nothing(tmp_path):
    """Three processes (three reviewers' servers) append 40 verdicts each at once."""
    path = tmp_path / "r.csv"
    code = (
        "import sys; from cxr_deploy.review.store import VerdictStore\n"
        "s = VerdictStore(sys.argv[1]); w = sys.argv[2]\n"
        "for i in range(40):\n"
        "    row = {'path': f'/d/{w}-{i}.png', 'status': 'ok', 'probability': '0.7', 'predicted_label': 'PNEUMONIA',"
        " 'threshold': '0.5', 'model_id': 'm'}\n"
        "    s.append(row, verdict='agree', comment='x' * 300, reviewer=w, class_names=('NORMAL', 'PNEUMONIA'))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"w{k}"]) for k in range(3)]
    for proc in procs:
        assert proc.wait(120) == 0
    lines = _lines(path)
    assert len(lines) == 120 and len({line["path"] for line in lines}) == 120
    assert all(line["comment"] == "x" * 300 and line["verdict"] == "agree" for line in lines)
    assert path.read_bytes().count(b"review_version") == 1  # one header, written by the first appender


def test_an_existing_file_that_is_not_a_reviews_file_is_refused(tmp_path):
    other = tmp_path / "labels.csv"
    other.write_text("path,label\na.png,NORMAL\n")
    with pytest.raises(ReviewsError, match="not a reviews file"):
        VerdictStore(other)


def test_reviews_as_labels(tmp_path):
    path = tmp_path / "r.csv"
    store = VerdictStore(path)
    store.append(_row(1, 0.7), verdict="agree", class_names=CLASSES)  # -> PNEUMONIA (the decision)
    store.append(_row(2, 0.7), verdict="disagree", correct_class="NORMAL", class_names=CLASSES)  # -> NORMAL
    store.append(_row(3, 0.2), verdict="unsure", class_names=CLASSES)  # -> no label
    store.append(_row(4, 0.2), verdict="agree", class_names=CLASSES)
    store.append(_row(4, 0.2), verdict="unsure", class_names=CLASSES)  # latest: unsure -> no label
    store.append(_row(5, 0.2), verdict="unsure", class_names=CLASSES)
    store.append(_row(5, 0.2), verdict="disagree", correct_class="PNEUMONIA", class_names=CLASSES)
    labels = {row.path: row.label for row in read_labels_csv(path, CLASSES, "PNEUMONIA")}  # the one reader
    assert labels == {"/data/x/IM-0001.png": "PNEUMONIA", "/data/x/IM-0002.png": "NORMAL",
                      "/data/x/IM-0005.png": "PNEUMONIA"}
    assert labels == {row.path: row.label for row in labels_from_reviews(path, CLASSES, "PNEUMONIA")}
    only_unsure = tmp_path / "u.csv"
    VerdictStore(only_unsure).append(_row(1), verdict="unsure", class_names=CLASSES)
    with pytest.raises(LabelsError, match="no agree/disagree"):
        read_labels_csv(only_unsure, CLASSES, "PNEUMONIA")


# -- the table: paging, sorting, filters -----------------------------------------------------------
@pytest.fixture()
def table_csv(tmp_path) -> Path:
    rows = [_row(i, p=((i * 37) % 100) / 100) for i in range(300)]
    rows[5] = _row(5, status="error")
    rows[6] = _row(6, status="skipped")
    path = tmp_path / "results.csv"
    with ResultsWriter(path, fsync=False) as writer:
        writer.write_rows(rows)
    return path


def _table(path, labels=None):
    table = Table([path], CLASSES, "PNEUMONIA", labels)
    table.FIRST_CHUNK = table.CHUNK = 64  # several chunks even for 300 rows
    table.load()
    return table


def test_sorting_filtering_and_paging(table_csv):
    table = _table(table_csv)
    assert table.n == 300
    p = table.probability
    ids = table.select({"status": "ok", "pmin": 0.2, "pmax": 0.5}, "probability", descending=True)
    expected = sorted((i for i in range(300) if table.columns["status"][i] == "ok" and 0.2 <= p[i] <= 0.5),
                      key=lambda i: (-p[i], i))
    assert ids.tolist() == expected
    page = table.page(ids, 10, 5)
    assert [r["id"] for r in page] == expected[10:15]
    ascending = table.select({}, "probability")
    finite = [i for i in ascending.tolist() if not math.isnan(p[i])]
    assert finite == sorted(finite, key=lambda i: (p[i], i)) and set(ascending[-2:].tolist()) == {5, 6}  # empties last
    assert table.select({"decision": "PNEUMONIA"}).tolist() == [i for i in range(300) if p[i] >= 0.5]
    assert table.select({"status": "error"}).tolist() == [5]


def test_disagreement_and_unreviewed_filters(table_csv, tmp_path):
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,label\n" + "".join(f"/data/x/IM-{i:04d}.png,PNEUMONIA\n" for i in range(0, 300, 3)))
    from cxr_deploy.reporting.label_match import LabelIndex

    table = _table(table_csv, LabelIndex.from_csv(labels_csv, CLASSES, "PNEUMONIA"))
    p = table.probability
    assert table.select({"disagree": "label"}).tolist() == [i for i in range(0, 300, 3) if p[i] < 0.5 and i not in (5, 6)]
    store = VerdictStore(tmp_path / "r.csv")
    store.append(table.row(1), verdict="disagree", correct_class="PNEUMONIA" if p[1] < 0.5 else "NORMAL",
                 class_names=CLASSES)
    store.append(table.row(2), verdict="agree", class_names=CLASSES)
    table.apply_verdicts(store)
    assert table.select({"disagree": "review"}).tolist() == [1]
    unreviewed = table.select({"unreviewed": True}).tolist()
    assert 1 not in unreviewed and 2 not in unreviewed and 5 not in unreviewed and len(unreviewed) == 300 - 4


def test_population_column_and_filter(tmp_path):
    """A results file with issue 20's ``in_population`` column: shown, and filterable."""
    path = tmp_path / "results.csv"
    rows = [dict(_row(i, 0.6), in_population=("false" if i % 4 == 0 else "true")) for i in range(12)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) + ["schema_version"])
        writer.writeheader()
        writer.writerows(dict(r, schema_version="3") for r in rows)
    table = _table(path)
    assert table.has_population
    assert table.select({"outside": True}).tolist() == [0, 4, 8]
    assert table.page_row(4)["outside"] is True and table.page_row(5)["outside"] is False


def test_input_that_is_not_a_results_csv(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,NORMAL\n")
    with pytest.raises(NotResults, match="not a cxr-deploy results CSV"):
        Table([labels], CLASSES, "PNEUMONIA")
    binary = tmp_path / "x.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    result = run_cli("review", labels, binary)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxr-deploy: error:") and "not a cxr-deploy results CSV" in lines[0]
    assert result.stdout == ""  # no URL: no server was started


def test_evaluate_accepts_reviews_as_labels(review_run, tmp_path):
    """Verdicts recorded in the page feed ``evaluate --labels REVIEWS.csv``."""
    table = _table(review_run["results"])
    reviews = tmp_path / "reviews.csv"
    store = VerdictStore(reviews)
    ok = [i for i in range(table.n) if table.columns["status"][i] == "ok"]
    expected = {}
    for k, i in enumerate(ok[:6]):
        row = table.row(i)
        other = "NORMAL" if row["predicted_label"] == "PNEUMONIA" else "PNEUMONIA"
        verdict = ("agree", "disagree", "unsure")[k % 3]
        store.append(row, verdict=verdict, correct_class=other if verdict == "disagree" else "", class_names=CLASSES)
        if verdict != "unsure":
            expected[row["path"]] = row["predicted_label"] if verdict == "agree" else other
    out = tmp_path / "report"
    result = run_cli("evaluate", review_run["results"], "--labels", reviews, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["n"] == len(expected) == 4
    assert report["metrics"]["n_positive"] == sum(v == "PNEUMONIA" for v in expected.values())


def test_a_path_that_is_not_utf8_is_listed(tmp_path):
    """Paths keep non-UTF-8 bytes (surrogates), as the results CSV does; the API still answers."""
    from cxr_deploy.review.server import JSONResponse

    path = tmp_path / "results.csv"
    odd = "/data/x/" + b"caf\xe9.png".decode("utf-8", "surrogateescape")
    with ResultsWriter(path, fsync=False) as writer:
        writer.write_rows([dict(_row(1), path=odd)])
    table = _table(path)
    body = JSONResponse(table.page(table.select({}), 0, 10)).body
    assert json.loads(body)[0]["path"] == odd
