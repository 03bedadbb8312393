"""Fixtures for the batch tests: small folders of smooth PNGs (the tiny bundle is a session fixture of
``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import write_pngs


@pytest.fixture()
def png_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_pngs(folder / "a", 5)
    write_pngs(folder / "b", 5, start=5)
    return folder


@pytest.fixture(scope="session")
def make_pngs():
    return write_pngs
