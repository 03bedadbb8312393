"""The one gate between a source image's header and the SR and SC built from it.

highdicom copies the patient and study attributes of the source into both results. Real archives
hold values their VR does not allow: an anonymizer's hash in PatientBirthDate (DA), a 56-character
AccessionNumber (SH, at most 16), names in Latin-1 with no SpecificCharacterSet. Before, the first
made highdicom raise (no SR, no SC for a scored image) and the others gave results that dciodvfy
reported 6-7 errors in. :func:`sanitize_source` fixes the source's header in place, before anything
is copied:

- an invalid value (by pydicom's own VR rules: a date that is not a date, a code string with lower
  case ...) is emptied: optional attributes (Type 2 and 3) may be empty, and nothing made up is
  written into a patient's record;
- an over-long value is cut to the VR's maximum where the start of it is still the value (LO, ST,
  LT, PN: a description, a name), emptied where a shorter one would be another value (SH, CS, AE,
  DS, IS: an accession number, a code, a number);
- text without a declared character set is read as UTF-8 when its bytes are UTF-8, else as Latin-1
  (the usual undeclared case); :func:`declare_charset` then declares ``ISO_IR 192`` (UTF-8) on each
  result that holds non-ASCII text.

What was changed is logged once per source (attribute names and reasons, never the values: they are
patient data). UIDs are left alone: they tie the results to the source (see :mod:`.uids`).
"""

from __future__ import annotations

import logging

import pydicom

log = logging.getLogger("cxr_deploy.pacs.sanitize")
TRUNCATED_VRS = {"LO": 64, "ST": 1024, "LT": 10240, "PN": 64}  # a shorter start still says it
TEXT_VRS = ("SH", "LO", "ST", "LT", "UT", "UC", "PN")
CHECKED_VRS = ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "SH", "LO", "ST", "LT", "PN")
UTF8 = "ISO_IR 192"


def sanitize_source(source: pydicom.Dataset, name: str = "source") -> list[str]:
    """Make ``source``'s header safe to copy (see the module docstring); what was changed, one entry
    per attribute (``"PatientBirthDate: not a valid DA, emptied"``), also logged as one line."""
    changes: list[str] = []
    if "SpecificCharacterSet" not in source:
        _decode_undeclared(source)
    _walk(source, changes, "")
    if changes:
        log.warning("%s: %d attribute(s) not copied as they were into the SR and SC: %s", name, len(changes),
                    "; ".join(changes))
    return changes


def declare_charset(result: pydicom.Dataset) -> None:
    """``SpecificCharacterSet = ISO_IR 192`` on ``result`` if any of its text is not ASCII."""
    if any(_non_ascii(item) for item in _text_elements(result)):
        result.SpecificCharacterSet = UTF8


def _decode_undeclared(source: pydicom.Dataset) -> None:
    for tag in list(source.keys()):
        raw = source.get_item(tag)
        if raw is None or raw.VR not in TEXT_VRS or not isinstance(raw.value, bytes) or raw.value.isascii():
            continue
        try:
            text = raw.value.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.value.decode("latin-1")
        values = text.rstrip(" \0").split("\\") if raw.VR not in ("ST", "LT", "UT") else [text.rstrip(" \0")]
        source[tag] = pydicom.DataElement(tag, raw.VR, values if len(values) > 1 else values[0])


def _walk(dataset: pydicom.Dataset, changes: list[str], prefix: str) -> None:
    from pydicom.config import RAISE
    from pydicom.valuerep import validate_value

    for tag in list(dataset.keys()):
        try:
            element = dataset[tag]
        except Exception:  # noqa: BLE001 - a value pydicom cannot even convert is not copied
            dataset[tag] = pydicom.DataElement(tag, dataset.get_item(tag).VR, None)
            changes.append(f"{prefix}{pydicom.datadict.keyword_for_tag(tag) or tag}: unreadable, emptied")
            continue
        where = prefix + (element.keyword or str(element.tag))
        if element.VR == "SQ":
            for item in element.value or []:
                _walk(item, changes, where + ">")
            continue
        if element.VR not in CHECKED_VRS or element.value in (None, "", b""):
            continue
        many = isinstance(element.value, pydicom.multival.MultiValue)
        values = [str(v) for v in (element.value if many else [element.value])]
        kept, change = [], ""
        for value in values:
            try:
                validate_value(element.VR, value, RAISE)
                kept.append(value)
                continue
            except (ValueError, TypeError) as exc:
                too_long = "exceeds the maximum" in str(exc)
            limit = TRUNCATED_VRS.get(element.VR)
            if too_long and limit:
                kept.append(value[:limit].rstrip())
                change = f"{where}: longer than {element.VR} allows, cut to {limit} characters"
            else:
                change = f"{where}: {'too long' if too_long else 'not a valid'} {element.VR}, emptied"
                kept = []
                break
        if change:
            element.value = (kept if many else kept[0]) if kept else None
            changes.append(change)


def _text_elements(dataset: pydicom.Dataset):
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _text_elements(item)
        elif element.VR in TEXT_VRS and element.value not in (None, ""):
            yield element


def _non_ascii(element) -> bool:
    values = element.value if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
    return any(not str(v).isascii() for v in values)
