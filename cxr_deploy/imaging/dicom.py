"""DICOM through pydicom (decoders: pylibjpeg-libjpeg/-openjpeg/-rle, pyjpegls where installed).

Grayscale pipeline, in the standard's order (see :mod:`.pixel_transforms`):

1. **Modality LUT**: Modality LUT Sequence if present, else RescaleSlope/RescaleIntercept.
2. **VOI**: VOI LUT Sequence if present, else the *first* WindowCenter/WindowWidth pair (with
   VOILUTFunction). Without either: unsigned data of at most 8 bits with no rescale is scaled by
   its bit depth (a DICOM wrapping of a PNG then reads exactly like the PNG); anything else is
   min–max stretched over the frame. Min–max is deterministic and parameter-free; percentile
   clipping would hide burned-in markers but silently change contrast between files.
3. **MONOCHROME1** is inverted *after* VOI.

Colour (RGB, YBR_* — converted to RGB by pydicom — and PALETTE COLOR through its LUT) becomes
BT.601 luma; VOI does not apply to colour images.

Multi-frame: only frame 0 is decoded and the metadata says ``frames > 1`` (``multi_frame``), so a
batch over a PACS export never fails on a cine loop or a tomosynthesis series and the caller can
still tell.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import NotAnImage, NotEligible, UnreadableImage
from . import pixel_transforms as px
from ..in_population import age_years
from .meta import ImageMeta, check_pixel_limit
from .pixel_plan import PixelPlan, StoredImage

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_IDENTIFIER_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")

# JPEG Baseline/Extended: lossy DCT; 12-bit precision only in Extended (Process 4).
_LOSSY_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})


def read_dicom_stored(path: Path, *, max_pixels: int, include_identifiers: bool = False,
                      eligibility=None) -> StoredImage:
    """The integer half of reading a DICOM: header, decoded first frame (LUT lookups and palette
    expansion done), and the :class:`PixelPlan` of the float half (:func:`.reader.gray_from_stored`)."""
    # pydicom warns about every non-conformant value (UIDs with letters, odd lengths...); real PACS
    # data is full of them and they do not stop us decoding pixels, so they stay out of the log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom(path, max_pixels=max_pixels, include_identifiers=include_identifiers,
                           eligibility=eligibility)


def _read_dicom(path: Path, *, max_pixels: int, include_identifiers: bool, eligibility=None) -> StoredImage:
    ds = _read_dataset(path)
    sop_class = str(getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NotAnImage(path, "DICOMDIR index file, not an image")
    if eligibility is not None:
        _check_eligible(path, ds, sop_class, eligibility)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        kind = UID(sop_class).name if sop_class else "unknown SOP class"
        raise UnreadableImage(path, f"no pixel data in this DICOM object ({kind})")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except AttributeError as exc:
        missing = getattr(exc, "name", None) or "Rows/Columns"
        raise UnreadableImage(path, f"image pixel module incomplete: {missing} missing") from None
    except (TypeError, ValueError) as exc:
        raise UnreadableImage(path, f"image pixel module invalid: {exc}") from None
    check_pixel_limit(path, rows, cols, frames, max_pixels)

    transfer_syntax = _ensure_transfer_syntax(ds)
    stored = _decode_first_frame(path, ds, transfer_syntax, frames)

    original_shape = tuple(int(s) for s in stored.shape)
    try:
        if samples == 3 or photometric.startswith(("RGB", "YBR")):
            if stored.ndim != 3 or stored.shape[-1] != 3:
                raise ValueError(f"expected RGB samples, got array of shape {stored.shape}")
            plan, voi = PixelPlan("scale", rgb=True, factor=1.0 / (2 ** _bits_stored(ds) - 1)), "color_luma"
        elif photometric == "PALETTE COLOR":
            stored = pydicom.pixels.apply_color_lut(stored, ds)  # a lookup: integers in, integers out
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            plan, voi = PixelPlan("scale", rgb=True, factor=1.0 / (2**lut_bits - 1)), "palette_luma"
        else:
            stored, plan, voi = _grayscale_plan(ds, stored)
            if photometric == "MONOCHROME1":
                plan = dataclasses.replace(plan, invert=True)
    except UnreadableImage:
        raise
    except Exception as exc:  # malformed LUTs/windows in real files: report, never crash a batch
        raise UnreadableImage(path, f"cannot convert pixels to gray ({type(exc).__name__}: {exc})") from None

    meta = ImageMeta(
        path=str(path),
        format="dicom",
        original_shape=original_shape,
        photometric=photometric,
        bits_stored=_bits_stored(ds),
        transfer_syntax=f"{transfer_syntax} {transfer_syntax.name}" if transfer_syntax else None,
        voi=voi,
        frames=frames,
        frame_index=0,
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        patient_age_years=age_years(_text(ds, "PatientAge"), _text(ds, "StudyDate"), _text(ds, "PatientBirthDate")),
        identifiers={k: _text(ds, k) or "" for k in _IDENTIFIER_KEYWORDS} if include_identifiers else None,
    )
    return StoredImage(stored, plan, meta)


def _check_eligible(path: Path, ds: pydicom.Dataset, sop_class: str, eligibility) -> None:
    """Header-only decision (no pixel decoded yet): raise :class:`NotEligible` for images the
    model was not made for (see :mod:`cxr_deploy.eligibility`)."""
    from ..eligibility import DicomHeader

    header = DicomHeader(modality=_text(ds, "Modality"), sop_class_uid=str(ds.get("SOPClassUID", "") or sop_class),
                         body_part=_text(ds, "BodyPartExamined"), view_position=_text(ds, "ViewPosition"))
    reason = eligibility.reason_to_skip(header)
    if reason:
        raise NotEligible(path, reason, {
            "modality": header.modality, "body_part": header.body_part, "view_position": header.view_position,
            "study_instance_uid": _text(ds, "StudyInstanceUID"), "series_instance_uid": _text(ds, "SeriesInstanceUID"),
            "sop_instance_uid": _text(ds, "SOPInstanceUID")})


def _read_dataset(path: Path) -> pydicom.Dataset:
    try:
        # force=True: files without preamble/file meta are common in PACS exports; content
        # sniffing has already decided this is DICOM.
        return pydicom.dcmread(path, force=True)
    except InvalidDicomError as exc:
        raise UnreadableImage(path, f"not a valid DICOM file: {exc}") from None
    except (EOFError, OSError) as exc:
        raise UnreadableImage(path, f"truncated or unreadable DICOM header: {exc}") from None
    except Exception as exc:  # pydicom raises assorted errors on corrupt headers
        raise UnreadableImage(path, f"corrupt DICOM header ({type(exc).__name__}: {exc})") from None


def _ensure_transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    """Files without file meta: infer the (uncompressed) transfer syntax pydicom read them with."""
    meta = ds.get("file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if uid:
        return UID(uid)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return None
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _decode_first_frame(path: Path, ds: pydicom.Dataset, transfer_syntax: UID | None, frames: int) -> np.ndarray:
    try:
        return pydicom.pixels.pixel_array(ds, index=0 if frames > 1 else None)
    except Exception as exc:  # decoders raise RuntimeError/ValueError/NotImplementedError/...
        message = " ".join(str(exc).split())[:300]
        ts_label = f"{transfer_syntax.name} ({transfer_syntax})" if transfer_syntax else "unknown transfer syntax"
        if "less than expected" in message or "truncat" in message.lower() or isinstance(exc, EOFError):
            raise UnreadableImage(path, f"truncated pixel data ({ts_label}): {message}") from None
        if _is_compressed(transfer_syntax):
            availability, missing = _decoder_availability(transfer_syntax)
            if availability == "none":
                raise UnreadableImage(path, f"unsupported compression {ts_label}: pydicom has no decoder "
                                            "for this transfer syntax; ask the sender for another one") from None
            if availability == "missing":
                needs = "; ".join(missing) or "a pydicom decoder plugin"
                raise UnreadableImage(path, f"unsupported compression {ts_label}: install one of: {needs}") from None
            if str(transfer_syntax) in _LOSSY_JPEG and _bits_stored(ds) > 8:
                # Valid 12-bit lossy JPEG (e.g. NEMA WG04 sets) that pylibjpeg-libjpeg and Pillow
                # both refuse: saying "corrupt" sent people looking for a broken file.
                raise UnreadableImage(path, f"no installed decoder reads this {_bits_stored(ds)}-bit lossy JPEG "
                                            f"({ts_label}; pylibjpeg-libjpeg and Pillow failed: {message[-120:]}); "
                                            "if the file is intact, decompress it with DCMTK's dcmdjpeg (Debian "
                                            "package dcmtk) or ask the sender for another transfer syntax") from None
            raise UnreadableImage(path, f"corrupt {ts_label} pixel data, decoder failed: {message}") from None
        raise UnreadableImage(path, f"cannot decode pixel data ({ts_label}): {type(exc).__name__}: {message}") from None


def _decoder_availability(uid: UID) -> tuple[str, list[str]]:
    """``("ok", [])``: a plugin is installed; ``("missing", what to install)``: pydicom knows plugins
    for it but none is installed, in pydicom's own words (e.g. ``pylibjpeg - requires pylibjpeg>=2.0
    and pylibjpeg-libjpeg>=2.1``); ``("none", [])``: pydicom has no decoder for it."""
    try:
        decoder = pydicom.pixels.get_decoder(uid)
    except (NotImplementedError, ValueError):
        return "none", []
    return ("ok", []) if decoder.is_available else ("missing", list(decoder.missing_dependencies))


def _is_compressed(uid: UID | None) -> bool:
    try:
        return uid is not None and uid.is_compressed
    except ValueError:  # not a known transfer syntax UID: treat as an unknown compression
        return uid is not None


def _grayscale_plan(ds: pydicom.Dataset, stored: np.ndarray) -> tuple[np.ndarray, PixelPlan, str]:
    """Stored grayscale samples → (samples to send, plan, VOI label). LUT Sequences are looked up
    here (integer gathers); every float operation is left to the plan."""
    if stored.dtype.kind == "f":  # Float/Double Float Pixel Data: no LUTs defined for these here
        return stored, PixelPlan("minmax"), "minmax(float pixel data)"

    # 1. Modality LUT
    if _usable_lut(ds, "ModalityLUTSequence"):
        stored, rescale, modality_applied = pydicom.pixels.apply_modality_lut(stored, ds), (1.0, 0.0), True
    else:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        rescale, modality_applied = (slope, intercept), (slope, intercept) != (1.0, 0.0)

    # 2. VOI
    if _usable_lut(ds, "VOILUTSequence"):
        # The lookup indexes by modality values, so the rescale runs here (rare: VOI LUT files).
        item = ds.VOILUTSequence[0]
        output_bits = int(item.LUTDescriptor[2])
        lut_out = pydicom.pixels.apply_voi(px.rescale(stored, *rescale), ds, index=0)
        return lut_out, PixelPlan("lut", factor=px.lut_full_scale(output_bits, lut_out.max())), "voi_lut"
    center, width = _first_window(ds)
    if center is not None and width is not None and width >= 1:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function not in px.VOI_FUNCTIONS:
            function = "LINEAR"
        plan = PixelPlan("window", rescale=rescale, center=center, width=width, function=function)
        return stored, plan, f"window(c={center:g},w={width:g},{function})"
    bits = _bits_stored(ds)
    if not modality_applied and int(ds.get("PixelRepresentation", 0)) == 0 and bits <= 8:
        return stored, PixelPlan("bits", bits=bits, rescale=rescale), "bit_depth"
    return stored, PixelPlan("minmax", rescale=rescale), "minmax(no window)"


def _usable_lut(ds: pydicom.Dataset, keyword: str) -> bool:
    """A LUT sequence whose first item really holds a descriptor and data (empty ones exist)."""
    seq = ds.get(keyword, None)
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor", None) is not None and item.get("LUTData", None) not in (None, b"", [])


def _first_window(ds: pydicom.Dataset) -> tuple[float | None, float | None]:
    center, width = ds.get("WindowCenter", None), ds.get("WindowWidth", None)
    if center is None or width is None:
        return None, None
    try:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None, None
    return center, width


def _bits_stored(ds: pydicom.Dataset) -> int:
    bits = ds.get("BitsStored", None) or ds.get("BitsAllocated", None) or 8
    return int(bits)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    return str(value).strip() or None
