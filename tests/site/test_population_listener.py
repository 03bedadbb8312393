"""Issue 20: the listener's population metric after a scoring pass, on real chest DICOMs."""

from __future__ import annotations

import json
import logging
import shutil

from cxr_deploy.pacs.passes import score_and_push

CHESTS = ["torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
          "torchxrayvision/Fake_MONOHR1.dcm", "pylibjpeg_data/JPEG2000Lossless/966_fixed.dcm"]


def test_listener_pass_writes_and_logs_the_population_check(shared_data, tiny_bundle, tmp_path, caplog):
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    for i, name in enumerate(CHESTS):
        shutil.copy(shared_data / "dicom" / name, incoming / f"{i}.dcm")
    with caplog.at_level(logging.INFO):
        out = score_and_push(tmp_path / "spool", incoming, tiny_bundle, None, workers=0, uid_root="1.2.826.0.1.3680043.10.999")
    assert out["scored"] == 3
    record = out["population"]
    # the tiny bundle has no reference; a bundle with one says "too few" below 30 images (tests/site/test_site_units.py)
    assert record["status"] == "no_reference"
    assert json.loads((tmp_path / "spool" / "population.json").read_text()) == record
    assert "population:" in caplog.text
