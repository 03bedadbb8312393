"""Spool retention: only instances whose results were sent (or that had nothing to send) leave the
spool, oldest first, down to the size target or past ``keep_days``; never an unscored, failed or
unsent one. Real files, a real results CSV and a push log as ``pacs push`` writes it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cxr_deploy.batch.results_file import ResultsWriter
from cxr_deploy.pacs.results import result_paths
from cxr_deploy.pacs.retention import Retention, prune
from cxr_deploy.pacs.transfer import PUSH_LOG, _log

MODEL = "0123456789abcdef"
DAY = 86400


def _spool(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Six instances of 1000 bytes, received a (oldest) ... f (newest): a, b ok and sent; c ok with
    only its SR sent; d skipped; e an error row; f not scored yet."""
    spool, now = tmp_path / "spool", time.time()
    study = spool / "incoming" / "1.2.3"
    study.mkdir(parents=True)
    (spool / "results").mkdir()
    files, rows = {}, []
    for i, name in enumerate("abcdef"):
        path = study / f"1.2.3.{i + 1}.dcm"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (now - (6 - i) * DAY, now - (6 - i) * DAY))
        files[name] = path
        status = {"d": "skipped", "e": "error"}.get(name, "ok")
        if name != "f":
            rows.append({"path": str(path), "status": status, "sop_instance_uid": f"1.2.3.{i + 1}", "model_id": MODEL,
                         "format": "dicom"})
        if name in "abc":
            for result in result_paths(spool / "results", f"1.2.3.{i + 1}", MODEL)[: 1 if name == "c" else 2]:
                result.write_bytes(b"r")
                _log(spool / "results" / PUSH_LOG, {"sop_instance_uid": f"2.25.{i}{result.name[-6:-4] == 'sr'}",
                                                    "file": str(result), "status": "stored", "error": ""})
    with ResultsWriter(spool / "results.csv") as writer:
        writer.write_rows(rows)
    return spool, files


def test_the_size_target_deletes_sent_instances_oldest_first_and_nothing_else(tmp_path):
    spool, files = _spool(tmp_path)
    freed = prune(spool, Retention(target_bytes=2500), spool_bytes=6000)
    gone = sorted(name for name, path in files.items() if not path.exists())
    assert gone == ["a", "b", "d"] and freed == 3000  # c unsent, e failed, f unscored: kept, though over target
    for uid in ("1.2.3.1", "1.2.3.2"):  # the sent results go with their instance
        assert not any(p.exists() for p in result_paths(spool / "results", uid, MODEL))
    assert result_paths(spool / "results", "1.2.3.3", MODEL)[0].exists()


def test_the_size_target_stops_once_it_is_met(tmp_path):
    spool, files = _spool(tmp_path)
    assert prune(spool, Retention(target_bytes=5000), spool_bytes=6000) == 1000
    assert not files["a"].exists() and files["b"].exists()
    assert prune(spool, Retention(target_bytes=5000), spool_bytes=5000) == 0


def test_keep_days_deletes_sent_instances_received_before_then(tmp_path):
    spool, files = _spool(tmp_path)
    assert prune(spool, Retention(keep_days=4.5), spool_bytes=6000) == 2000  # a (6 days), b (5 days)
    assert sorted(name for name, path in files.items() if not path.exists()) == ["a", "b"]


@pytest.mark.parametrize("keys, expected", [
    ("", (0.0, None)),
    ("keep_days = 30\nspool_target_gb = 40", (30.0, 40 * 2**30)),
    ("keep_days = -1", "keep_days must be 0"),
    ("spool_target_gb = 60", "spool_target_gb (60) is over max_spool_gb"),
    ("spool_target_gb = 0", "spool_target_gb must be a positive number"),
])
def test_the_retention_keys_of_the_listen_table(tmp_path, keys, expected):
    from cxr_deploy.pacs.config import PacsConfigError, load_pacs_config

    path = tmp_path / "pacs.toml"
    path.write_text(f'[pacs]\npush = "cstore"\n\n[listen]\nallowed_ae_titles = ["CT01"]\nmax_spool_gb = 50\n{keys}\n')
    if isinstance(expected, str):
        with pytest.raises(PacsConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_pacs_config(path)
    else:
        listen = load_pacs_config(path).listen
        assert (listen.keep_days, listen.spool_target_bytes) == expected


def test_start_up_removes_only_our_own_partial_receptions(tmp_path):
    # <spool>/receiving holds data sets a killed listener was receiving; a file someone else put
    # there (a spool pointed at an existing folder) is not ours and stays.
    from cxr_deploy.atomic import TEMP_MARK
    from cxr_deploy.pacs.intake import RECEIVING, Intake

    folder = tmp_path / "spool" / RECEIVING
    folder.mkdir(parents=True)
    ours = folder / f".0123456789abcdef.dcm{TEMP_MARK}4242"
    ours.write_bytes(b"half an instance")
    theirs = folder / "notes.txt"
    theirs.write_text("mine")
    Intake(tmp_path / "spool", 0).clear()
    assert not ours.exists()
    assert theirs.read_text() == "mine"
