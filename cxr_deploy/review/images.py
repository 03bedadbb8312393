"""What the viewer shows, and the one gate every file goes through before it is read.

- :class:`FileGate`: only files named by the loaded CSVs (inputs and overlays) are ever opened,
  and only when their real location (symlinks resolved) lies in one of the folders those files
  name; anything else is refused (403) and logged. Requests name rows by id, so a URL can never
  name a path in the first place.
- :func:`render_original`: the input rendered by the project's own reader and VOI
  (:func:`cxr_deploy.imaging.reader.read_stored` and its pixel plan), so a DICOM looks as it did
  to ``batch``; for grayscale images a window (centre/width, in the values the plan windows:
  modality-rescaled for DICOM) replaces the file's own VOI on request.
- :func:`overlay_info`: an overlay is shown only if the identity it carries
  (:func:`cxr_deploy.batch.overlay.read_identity`) is this row's input; its caption is the text
  drawn on it (the PNG ``Description`` chunk).
"""

from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import CxrDeployError

log = logging.getLogger("cxr_deploy.review")
MAX_SIDE = 2048  # the original is sent at most this large (zoom stays sharp; a 4k DICOM stays light)


class Refused(CxrDeployError):
    """A request for something that is not served: its HTTP status and the one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class FileGate:
    def __init__(self, named: list[str] = ()):
        """``named``: every input and overlay path the loaded CSVs name (more with :meth:`add`)."""
        self.named: set[str] = set()
        self.roots: set[str] = set()
        self._folders: set[str] = set()
        self.add(named)

    def add(self, named) -> None:
        new = set(named) - self.named - {""}  # as written in the CSVs (the table hands them back so)
        self.named |= new
        folders = {_folder(p) for p in new} - self._folders  # few: realpath once per folder
        self._folders |= folders
        # "/" is never a root: one file named at the top would open every symlink's target
        self.roots |= {os.path.realpath(f) for f in folders} - {"/"}

    def check(self, path: str, what: str) -> Path:
        """``path`` when it may be read; :class:`Refused` (logged) otherwise."""
        path = path or ""
        if not path or path not in self.named:
            raise self._refuse(404 if not path else 403, f"{what}: not a file the results name", path)
        real = os.path.realpath(path)
        if not self._inside(real):
            raise self._refuse(403, f"{what}: {path} resolves to {real}, outside the folders the results name", path)
        if not os.path.isfile(real):
            raise self._refuse(404, f"{what}: {path} is missing", path)
        return Path(real)

    def _inside(self, real: str) -> bool:
        parent = os.path.dirname(real)
        while True:
            if parent in self.roots:
                return True
            up = os.path.dirname(parent)
            if up == parent:
                return False
            parent = up

    @staticmethod
    def _refuse(status: int, reason: str, path: str) -> Refused:
        log.warning("refused (%d): %s", status, reason)
        return Refused(status, reason)


def _folder(path: str) -> str:
    head, sep, _ = path.rpartition("/")  # os.path.dirname, at a third of its cost (100,000 rows)
    return head if head else ("/" if sep else ".")


@functools.lru_cache(maxsize=4)
def _stored(path: str, stamp: tuple):
    from ..imaging.reader import read_stored

    return read_stored(path)


def stored_image(path: Path):
    st = path.stat()
    return _stored(str(path), (st.st_mtime_ns, st.st_size))


def window_info(path: Path) -> dict | None:
    """Default window and value range for a grayscale DICOM (what the W/L controls start at)."""
    image = stored_image(path)
    plan = image.plan
    if image.meta.format != "dicom" or plan.rgb:
        return None
    values = _windowed_values(image)
    with np.errstate(invalid="ignore"):
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # float pixel data with no finite value: no controls
        return None
    if plan.voi == "window":
        centre, width = plan.center, plan.width
    else:
        centre, width = (lo + hi) / 2, max(hi - lo, 1.0)
    return {"center": float(centre), "width": float(width), "min": lo, "max": hi, "voi": image.meta.voi or ""}


def _windowed_values(image) -> np.ndarray:
    from ..imaging import pixel_transforms as px

    rescale = image.plan.rescale if image.plan.voi != "lut" else None
    return px.rescale(image.stored, *rescale) if rescale else image.stored


def render_original(path: Path, center: float | None = None, width: float | None = None) -> bytes:
    """The input as an 8-bit PNG, longest side at most :data:`MAX_SIDE`."""
    from PIL import Image

    from ..imaging.pixel_plan import PixelPlan
    from ..imaging.reader import gray_from_stored

    image = stored_image(path)
    if center is not None and width is not None and not image.plan.rgb and width >= 1:
        plan = image.plan
        rescale = plan.rescale if plan.voi != "lut" else None
        image = replace(image, plan=PixelPlan("window", rescale=rescale, center=center, width=width,
                                              invert=plan.invert))
    gray = gray_from_stored(image, path)
    picture = Image.fromarray(np.round(gray * 255).astype(np.uint8), "L")
    if max(picture.size) > MAX_SIDE:
        scale = MAX_SIDE / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def overlay_info(gate: FileGate, row: dict) -> dict:
    """``{"ok": bool, "reason", "caption"}`` for the row's overlay, without sending it."""
    from ..batch.overlay import identity_text, read_identity

    if not row.get("overlay_path"):
        return {"ok": False, "reason": "no overlay for this row", "caption": ""}
    try:
        path = gate.check(row["overlay_path"], "overlay")
    except Refused as exc:
        return {"ok": False, "reason": exc.reason, "caption": ""}
    if read_identity(path) != identity_text(row["path"], row.get("sop_instance_uid") or None):
        log.warning("refused (403): overlay %s was not made for %s", row["overlay_path"], row["path"])
        return {"ok": False, "reason": "the overlay file was made for another input", "caption": ""}
    return {"ok": True, "reason": "", "caption": _caption(path), "path": path}


def _caption(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return str(image.info.get("Description", "")) if image.format == "PNG" else ""
    except (OSError, ValueError, SyntaxError):
        return ""
