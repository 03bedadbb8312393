"""The Grad-CAM overlay as a DICOM Secondary Capture (highdicom), for the PACS viewer.

The overlay image (film, heat map, colour bar, caption and footer, see
:mod:`cxr_deploy.batch.overlay`) gets a banner with "NOT FOR DIAGNOSTIC USE" burned into its
pixels, and ``BurnedInAnnotation`` is YES. Patient and study attributes come from the source image,
in a new series of the same study; its UIDs are derived like the report's (:mod:`.uids`).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw

from .report import MANUFACTURER, SC_SERIES_NUMBER
from .uids import DEFAULT_UID_ROOT, derived_uid

BANNER = "NOT FOR DIAGNOSTIC USE - AI decision support (cxr-deploy)"


def with_banner(rgb: np.ndarray, text: str = BANNER) -> np.ndarray:
    """``rgb`` with a black strip on top carrying ``text`` in white (burned into the pixels)."""
    from ..batch.overlay import load_font

    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB")
    size = max(12, image.width // 40)
    font = load_font(size)
    draw = ImageDraw.Draw(image)
    while draw.textlength(text, font=font) > image.width - 8 and size > 8:
        size -= 1
        font = load_font(size)
    height = draw.textbbox((0, 0), "Ag", font=font)[3] + 8
    out = Image.new("RGB", (image.width, image.height + height), (0, 0, 0))
    out.paste(image, (0, height))
    ImageDraw.Draw(out).text((4, 4), text, fill=(255, 255, 255), font=font)
    return np.asarray(out)


def build_capture(source: pydicom.Dataset, overlay_rgb: np.ndarray, *, model_id: str,
                  uid_root: str = DEFAULT_UID_ROOT) -> hd.sc.SCImage:
    """Secondary Capture of ``overlay_rgb`` (H, W, 3 uint8) in ``source``'s study."""
    uid = source.SOPInstanceUID
    orientation = source.get("PatientOrientation")
    orientation = tuple(orientation) if orientation is not None and len(orientation) == 2 else None
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=with_banner(overlay_rgb), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT" if orientation else None, patient_orientation=orientation,
        series_instance_uid=derived_uid(uid, model_id, "sc-series", uid_root), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid, model_id, "sc-instance", uid_root), instance_number=1,
        manufacturer=MANUFACTURER)
    capture.BurnedInAnnotation = "YES"
    # General Series Laterality is Type 2C, absent for an unpaired body part: saying the body part
    # is the chest lets validators (dciodvfy) see that the condition does not apply.
    capture.BodyPartExamined = "CHEST"
    capture.SeriesDescription = "cxr-deploy Grad-CAM overlay (NOT FOR DIAGNOSTIC USE)"
    capture.ImageComments = "AI decision support only, not a diagnosis"
    _reference_source(capture, source)
    return capture


def _reference_source(capture: pydicom.Dataset, source: pydicom.Dataset) -> None:
    """The radiograph the overlay was made from (General Image module, both Type 3): Source Image
    Sequence says it is derived from it, Referenced Image Sequence is what viewers follow to tie
    an image to another in a study with several. Without them a viewer cannot tell which image of
    the study the overlay belongs to."""
    def reference(purpose: tuple[str, str] | None) -> pydicom.Dataset:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if purpose:
            code = pydicom.Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = purpose[0], "DCM", purpose[1]
            item.PurposeOfReferenceCodeSequence = [code]
        return item

    capture.SourceImageSequence = [reference(("121322", "Source image for image processing operation"))]
    capture.ReferencedImageSequence = [reference(None)]
    capture.DerivationDescription = "Grad-CAM heat map of the model's decision over this image"
