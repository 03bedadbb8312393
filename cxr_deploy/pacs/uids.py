"""Deterministic UIDs for the DICOM objects cxr-deploy writes.

A UID is derived from (source SOP Instance UID, model id, output kind): the same image scored by the
same model always yields the same SR and SC UIDs, so a rerun (or a resumed night) *replaces* its
objects in the PACS instead of adding duplicates, and a new model's results never collide with an
old one's.

Default root: ``2.25``, the UUID-derived arc of ISO/IEC 9834-8 (DICOM PS3.5 B.2): the rest of the UID
is the decimal value of a 128-bit hash, unique without any registered organisation root. A site with
its own root passes ``uid_root="1.2.3.4"``; the hash is then appended as decimal digits, truncated to
the 64-character limit.
"""

from __future__ import annotations

import hashlib
import re

from ..errors import CxrDeployError

DEFAULT_UID_ROOT = "2.25"
# A file name made of a UID: digits and dots only (so never "/", "..", a space or a letter), no empty
# component, at most 64 characters. Deliberately looser than the standard's rule (is_valid_uid): real
# devices send components with a leading zero ("1.2.3.0123"), which PS3.5 forbids and pydicom's
# UID.is_valid rejects, but which name a file just as safely; an instance is not refused for it.
_FILE_NAME_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # fullmatch: not even a trailing newline


class UidError(CxrDeployError, ValueError):
    pass


def is_valid_uid(value: str | None) -> bool:
    """A DICOM UID by the standard's rule (PS3.5 9.1: digits and dots, no leading zero in a
    component, at most 64 characters), as pydicom's :attr:`pydicom.uid.UID.is_valid` decides it:
    where the standard's validity matters (a UID root, a derived UID, an overlay named after its
    image). A source's UID that only names files or seeds a derived UID needs :func:`is_uid_file_name`."""
    if not value:
        return False
    from pydicom.config import IGNORE  # pydicom's import (~0.1 s) only when a UID is checked
    from pydicom.uid import UID

    return UID(str(value), validation_mode=IGNORE).is_valid  # IGNORE: no warning for the invalid ones


def is_uid_file_name(value: str | None) -> bool:
    """``value`` may name a file: a UID of digits and dots, leading zeros allowed (see _FILE_NAME_UID)."""
    return bool(value) and len(value) <= 64 and bool(_FILE_NAME_UID.fullmatch(value))


def check_root(root: str) -> str:
    root = (root or "").strip().rstrip(".")
    if not is_valid_uid(root) or len(root) > 40:
        raise UidError(f"UID root {root!r} is not a valid DICOM UID prefix (digits and dots, at most 40 characters)")
    return root


def derived_uid(source_uid: str, model_id: str, kind: str, root: str = DEFAULT_UID_ROOT) -> str:
    """The UID of output ``kind`` (e.g. ``"sr-instance"``) for ``source_uid`` scored by ``model_id``.

    ``source_uid`` needs only digits and dots (a leading zero, as real devices send, is hashed like
    any other); the UID returned is valid by the standard's rule whatever the source's."""
    if not is_uid_file_name(source_uid):
        raise UidError(f"source UID {source_uid!r} is not a valid DICOM UID")
    root = check_root(root)
    digest = hashlib.sha256(f"cxr-deploy\0{source_uid}\0{model_id}\0{kind}".encode()).digest()
    number = str(int.from_bytes(digest[:16], "big"))  # 128 bits: up to 39 digits
    if root == DEFAULT_UID_ROOT:
        return f"{root}.{number}"
    return f"{root}.{number.lstrip('0') or '1'}"[:64].rstrip(".")
