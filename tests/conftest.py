"""Shared fixtures: paths to the real test data and small helpers.

Real data lives outside the repository in ``../shared/data`` (DICOM test suites and labelled CXRs);
set ``CXR_SHARED_DATA`` to point elsewhere. Tests needing it are skipped with a clear reason when
it is absent, never silently passed.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT / "samples"


def _shared_data() -> Path:
    env = os.environ.get("CXR_SHARED_DATA")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


SHARED_DATA = _shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set CXR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_manifest(shared_data) -> list[dict]:
    with open(shared_data / "dicom" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def cxr_manifest(shared_data) -> list[dict]:
    with open(shared_data / "cxr" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session", autouse=True)
def _small_torch():
    """Tests run on 2 cores: keep torch from oversubscribing them."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(2)
