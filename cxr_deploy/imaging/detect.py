"""Content-based file type detection.

PACS exports routinely have no extension (``IM000123``) or a wrong one, so the format is decided
from the first bytes only.
"""

from __future__ import annotations

import struct
from pathlib import Path

PNG = "png"
JPEG = "jpeg"
DICOM = "dicom"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Groups a DICOM data set without preamble/file meta commonly starts with (file meta, identifying,
# patient, acquisition, relationship, image-pixel module). Element numbers of a first tag are small.
_LEADING_DICOM_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
_EXPLICIT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
}

HEADER_BYTES = 132


def sniff_bytes(head: bytes) -> str | None:
    """Return ``"png"``, ``"jpeg"``, ``"dicom"`` or ``None`` from the first 132 bytes of a file."""
    if head.startswith(_PNG_SIGNATURE):
        return PNG
    if head.startswith(_JPEG_SIGNATURE):
        return JPEG
    if len(head) >= 132 and head[128:132] == b"DICM":
        return DICOM
    if head.startswith(b"DICM"):  # prefix without the 128-byte preamble (seen in the wild)
        return DICOM
    return DICOM if _looks_like_bare_dataset(head) else None


def _looks_like_bare_dataset(head: bytes) -> bool:
    """A data set written without preamble/file meta: a plausible first element, LE or BE."""
    if len(head) < 8:
        return False
    for endian in "<>":
        group, element = struct.unpack(endian + "HH", head[:4])
        if group not in _LEADING_DICOM_GROUPS or element > 0x0020:
            continue
        if head[4:6] in _EXPLICIT_VRS:  # explicit VR
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])  # implicit VR: 4-byte length
        if length < 1024 and (element != 0 or length == 4):
            return True
    return False


def sniff_file(path: str | Path) -> str | None:
    """Detect the format of a file on disk (reads at most 132 bytes)."""
    with open(path, "rb") as fh:
        return sniff_bytes(fh.read(HEADER_BYTES))
