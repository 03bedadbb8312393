"""Two UID checks: the standard's rule where validity matters (pydicom's ``UID.is_valid``), and a
looser digits-and-dots rule where a UID only names a file (a leading zero, which real devices send,
names a file as safely)."""

from __future__ import annotations

import warnings

import pytest

from cxr_deploy.pacs.spool import spool_path
from cxr_deploy.pacs.uids import UidError, is_uid_file_name, is_valid_uid

UNSAFE = ["", "1..2", "1.2.a", ".1.2", "1.2.", "../1", "1.2.3/../x", "1.2 3", "1.2.3\n", "1." + "2" * 63]


@pytest.mark.parametrize("uid", ["1.2.3", "0.1", "1.2.3.0", "2.25." + "9" * 39, "1." + "2" * 62])
def test_valid_uids_are_valid_and_name_files(uid):
    assert is_valid_uid(uid) and is_uid_file_name(uid)


@pytest.mark.parametrize("uid", UNSAFE)
def test_anything_but_digits_and_dots_is_refused_by_both(uid):
    assert not is_uid_file_name(uid)
    if uid != "1.2.3\n":  # pydicom's rule ends in "$", which lets one trailing newline through
        assert not is_valid_uid(uid)


def test_a_leading_zero_names_a_file_but_is_not_a_valid_uid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checking a UID warns nothing, valid or not
        assert not is_valid_uid("1.2.3.0123")
    assert is_uid_file_name("1.2.3.0123")


def test_the_spool_keeps_a_leading_zero_instance_and_refuses_paths(tmp_path):
    assert spool_path(tmp_path, "1.2.3.0123", "1.2.3.0123.4") == tmp_path / "1.2.3.0123" / "1.2.3.0123.4.dcm"
    for bad in UNSAFE:
        with pytest.raises(UidError, match="not a valid DICOM UID"):
            spool_path(tmp_path, "1.2.3", bad)
