"""Which inputs the model was made for: the one home of the "is this a frontal chest radiograph?" rule.

The model was trained on frontal (PA/AP) chest radiographs. A CT slice, an ultrasound frame, a
lateral film or a hand X-ray run through it still gets a probability, and a number next to a
patient's name is read as a result. So a DICOM is scored only when its header says it is a frontal
chest radiograph; everything else is ``skipped`` with a one-line reason, never scored.

Checked in this order (the first failing check is the reason), on the header only, before any pixel
is decoded (a CT with an exotic codec is skipped, not an error):

1. **Modality** must be one of :data:`RADIOGRAPH_MODALITIES` (``CR``, ``DX``) or one the user added.
2. **SOP class** must be a radiograph storage class (:data:`RADIOGRAPH_SOP_CLASSES`): a Secondary
   Capture, an SR, a DX *For Processing* (raw detector data) is not what the model saw in training.
   A modality the user named (``--modality OT`` for films digitized as Secondary Captures) is
   scored whatever its SOP class: naming it is the user saying these objects are radiographs.
3. **BodyPartExamined**, when present, must be a chest value (:data:`CHEST_BODY_PARTS`) or one the
   user added. Absent is accepted: many CR/DX senders leave it empty.
4. **ViewPosition**, when present, must not be lateral or oblique (:data:`NON_FRONTAL_VIEWS`).

PNG and JPEG files carry no such metadata: they are scored, and the README says so.

**Pixel content** (every format, whatever the header filter; :func:`blank_reason`): an image that is
blank or saturated *as displayed* (after its own VOI window) holds nothing to read, yet the model
still returns a probability for it (a DX uniformly white after its window was scored PNEUMONIA).
Such an image is an ``error`` row, ``blank or saturated image: ...``, never a probability. Measured
on the display image in [0, 1], sampled every k-th pixel to at most :data:`CONTENT_SAMPLE_SIDE` per
side (:func:`cxr_deploy.imaging.reader.display_sample`):

- *near-constant*: standard deviation below :data:`BLANK_STD` (0.01 of the display range: 2.5 of
  255 gray levels);
- *saturated*: at least :data:`SATURATED_FRACTION` of the pixels at exactly black or white (clipped
  by the window, or at the ends of the range).

Real films are far from both: over samples/, the 200 shared Kermany CXRs and the 187 shared adult
CXRs, the smallest standard deviation is 0.093 and the largest black-or-white fraction 0.50 (a
film with wide black borders). Both ends are reached by the blank DX above (std 0, 100 % white).
Checked by :func:`~cxr_deploy.imaging.reader.read_stored` for every image read *to be scored* (an
``eligibility`` given), so the local workers, ``--preprocess-on device`` (its samples are checked
in the worker before they travel), Ray, the API and ``pacs listen`` all refuse the same images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
}
# DICOM PS3.16 Annex L / CID 4031 use CHEST; THORAX and LUNG occur in real exports.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
# ViewPosition (0018,5101) defined terms that are not frontal projections.
NON_FRONTAL_VIEWS = {"LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral",
                     "RLO": "oblique", "LLO": "oblique", "RAO": "oblique", "LAO": "oblique",
                     "RPO": "oblique", "LPO": "oblique"}


@dataclass(frozen=True)
class DicomHeader:
    """The header values the rule looks at (no identifiers)."""

    modality: str | None = None
    sop_class_uid: str | None = None
    body_part: str | None = None
    view_position: str | None = None


def _norm(value: str | None) -> str:
    return re.sub(r"\s+", " ", str(value or "")).strip().upper()


def _terms(values: Iterable[str] | str | None) -> frozenset[str]:
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = values.split(",")
    return frozenset(_norm(v) for v in values if _norm(v))


@dataclass(frozen=True)
class ChestFilter:
    """The eligibility rule with the user's widenings.

    ``extra_modalities`` / ``extra_body_parts`` are *added* to the defaults (``--modality``,
    ``--body-part``); ``any_view`` accepts lateral and oblique films (``--accept-any-view``);
    ``enabled=False`` scores every readable image (``--no-dicom-filter``).
    """

    extra_modalities: frozenset[str] = field(default_factory=frozenset)
    extra_body_parts: frozenset[str] = field(default_factory=frozenset)
    any_view: bool = False
    enabled: bool = True

    @classmethod
    def build(cls, modalities=None, body_parts=None, any_view: bool = False, enabled: bool = True) -> "ChestFilter":
        return cls(_terms(modalities), _terms(body_parts), bool(any_view), bool(enabled))

    @property
    def modalities(self) -> frozenset[str]:
        return RADIOGRAPH_MODALITIES | self.extra_modalities

    @property
    def body_parts(self) -> frozenset[str]:
        return CHEST_BODY_PARTS | self.extra_body_parts

    def reason_to_skip(self, header: DicomHeader) -> str | None:
        """``None`` when the image may be scored, else the one-line reason it is skipped."""
        if not self.enabled:
            return None
        modality = _norm(header.modality)
        if modality not in self.modalities:
            shown = f"Modality {modality}" if modality else "no Modality"
            return f"not a chest radiograph ({shown}; scored: {', '.join(sorted(self.modalities))}; widen with --modality)"
        sop = str(header.sop_class_uid or "").strip()
        if sop not in RADIOGRAPH_SOP_CLASSES and modality not in self.extra_modalities:
            return (f"not a radiograph object ({_sop_name(sop)}); only CR and DX For Presentation images "
                    f"are scored (--modality {modality or 'CODE'} scores this modality whatever its SOP class)")
        body = _norm(header.body_part)
        if body and body not in self.body_parts:
            return f"not a chest radiograph (BodyPartExamined {body}; widen with --body-part)"
        view = _norm(header.view_position)
        if view in NON_FRONTAL_VIEWS and not self.any_view:
            return (f"{NON_FRONTAL_VIEWS[view]} view (ViewPosition {view}): the model was trained on frontal "
                    "films (--accept-any-view scores it anyway)")
        return None


DEFAULT_FILTER = ChestFilter()
NO_FILTER = ChestFilter(enabled=False)


def _sop_name(uid: str) -> str:
    if not uid:
        return "no SOP Class UID"
    try:
        from pydicom.uid import UID

        name = UID(uid).name
    except Exception:  # noqa: BLE001 - a malformed UID is shown as it is
        name = uid
    return f"{name}" if name != uid else f"SOP class {uid}"


# -- pixel content ----------------------------------------------------------------------------------
CONTENT_SAMPLE_SIDE = 512
BLANK_STD = 0.01
SATURATED_FRACTION = 0.98
BLANK_REASON = "blank or saturated image"


def blank_reason(gray) -> str | None:
    """``None`` for an image with something to read, else the one-line reason it is not scored.
    ``gray``: the display image (2-D, [0, 1]), or a sample of it."""
    import numpy as np

    g = np.asarray(gray, dtype=np.float32)
    std = float(g.std())
    if std < BLANK_STD:
        return (f"{BLANK_REASON}: nearly uniform after its display window (standard deviation {std:.4f} "
                f"< {BLANK_STD:g}); not scored")
    extreme = float(np.count_nonzero((g <= 0.0) | (g >= 1.0))) / g.size
    if extreme >= SATURATED_FRACTION:
        return (f"{BLANK_REASON}: {extreme:.1%} of its pixels are pure black or white after its display window "
                f"(>= {SATURATED_FRACTION:.0%}); not scored")
    return None
