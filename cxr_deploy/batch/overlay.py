"""Grad-CAM overlays from the model's CAM output (no backward pass, so ONNX/INT8 models work too).

The CAM is a ``g x g`` grid over the model's *input* square (``g = S/32``). The input square is the
original image letterboxed (or centre-cropped) by the bundle's :class:`PreprocessSpec`, so the map
is carried back through the same geometry (:meth:`PreprocessSpec.placement`, defined once there): every pixel of the overlay is mapped to original-image
coordinates, then to input coordinates, then bilinearly sampled from the CAM grid. The heatmap
therefore sits on the anatomy it came from, on the *original* image, with no padding band and no
distortion, whatever the aspect ratio.

Colour scale: the heat shown is ``CAM x p(positive)``. The CAM alone is divided by its own maximum
in every image, so a film the model calls NORMAL (p = 0.03) would glow as red as a florid
pneumonia. Weighted by the positive probability, colour means the same on every overlay: red is
"this region drives a confident positive prediction", and a confident negative stays gray. A
colour bar on the right says so.

Every overlay carries the identity of the input it was made for (PNG ``tEXt`` chunk / JPEG comment,
see :func:`identity_text`) and is never written over an overlay made for another input.

This module imports no torch: overlays are rendered in the decode worker processes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..pacs.uids import is_valid_uid
from ..preprocessing import PreprocessSpec
from ..errors import CxrDeployError
from .png import write_png

VIEW_SIZE = 512  # longest side of overlay PNGs: readable on a laptop, ~100 KB per file
ALPHA = 0.5  # heat opacity at CAM = 1; opacity scales with the CAM so cold areas stay plain gray
IDENTITY_KEY = "cxr-deploy:input"  # PNG text key; JPEG comments start with IDENTITY_KEY + "="
SUFFIXES = {"png": ".png", "jpeg": ".jpg"}


class OverlayConflict(CxrDeployError, OSError):
    """Every candidate name already holds an overlay made for another input (or a file that is not
    ours): nothing was written, nothing was replaced."""


# -- names and identity ---------------------------------------------------------------------------
def _path_hash(path: str, size: int = 4) -> str:
    return hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=size).hexdigest()


def overlay_names(path: str, sop_instance_uid: str | None, cam_format: str = "png") -> list[str]:
    """Candidate file names for one input's overlay, preferred first; each stable across runs.

    DICOM: the SOP Instance UID (the image's own identity). Otherwise the readable file stem plus a
    short hash of the absolute input path, so ``d1/IM0001`` and ``d2/IM0001`` never share a name.
    The fallback (used when the first name is taken by another input, e.g. two copies of one SOP
    instance) always carries a longer path hash."""
    suffix = SUFFIXES[cam_format]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path)).strip("._") or "image"
    stem = stem[:80]
    fallback = f"{stem}-{_path_hash(path, 8)}{suffix}"
    uid = (sop_instance_uid or "").strip()
    if is_valid_uid(uid):
        return [f"{uid}{suffix}", f"{uid}-{_path_hash(path, 8)}{suffix}"]
    return [f"{stem}-{_path_hash(path)}{suffix}", fallback]


def identity_text(path: str, sop_instance_uid: str | None) -> str:
    """What an overlay records about its input (ASCII JSON: non-UTF-8 path bytes are escaped)."""
    return json.dumps({"path": path, "sop_instance_uid": sop_instance_uid or ""}, sort_keys=True)


def read_identity(path: str | Path) -> str | None:
    """The identity recorded in an overlay file, or ``None`` (not an image, or not one of ours)."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                # Ours is written ahead of the pixel data, where opening the file already read it;
                # ``image.text`` would decode the whole image first (5 ms an overlay on a rerun).
                return image.info.get(IDENTITY_KEY)
            comment = image.info.get("comment", b"")
            text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
            prefix = IDENTITY_KEY + "="
            return text[len(prefix):] if text.startswith(prefix) else None
    except (OSError, ValueError, SyntaxError):
        return None


def _jet_palette() -> list[int]:
    """The classic 'jet' colormap (blue → cyan → yellow → red) as a 256-entry Pillow palette;
    piecewise linear, so no matplotlib import in the workers."""
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)]  # r, g, b
    return np.round(np.stack(channels, axis=1) * 255).astype(np.uint8).ravel().tolist()


_PALETTE = _jet_palette()


def _axis_weights(n_out: int, n_orig: int, mapping, grid: int, size: int) -> np.ndarray:
    """(n_out, grid) bilinear weights taking CAM cells to output pixels along one axis.
    ``mapping``: (scale, offset, lo, hi) of this axis, from :meth:`PreprocessSpec.placement`."""
    scale, offset, lo, hi = mapping
    orig = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_orig / n_out)  # output pixel centres
    u = offset + orig * scale  # input-square coordinate
    c = u / (size / grid) - 0.5  # CAM cell-centre coordinate
    c = np.clip(c, 0, grid - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, grid - 1)
    frac = c - i0
    weights = np.zeros((n_out, grid), dtype=np.float32)
    rows = np.arange(n_out)
    weights[rows, i0] += 1 - frac
    weights[rows, i1] += frac
    weights[(u < lo) | (u >= hi)] = 0  # outside what the model saw (centre-crop margins)
    return weights


def cam_to_image(cam: np.ndarray, spec: PreprocessSpec, original_hw: tuple[int, int],
                 out_hw: tuple[int, int]) -> np.ndarray:
    """Resample a CAM grid onto an ``out_hw`` rendering of the original image; values in [0, 1]."""
    cam = np.asarray(cam, dtype=np.float32)
    grid_h, grid_w = cam.shape
    (h, w), (out_h, out_w) = original_hw, out_hw
    where = spec.placement(h, w)  # the spec's own geometry, never re-derived here
    y0, y1, x0, x1 = where.content
    my = (where.scale[0], where.offset[0], y0, y1)
    mx = (where.scale[1], where.offset[1], x0, x1)
    wy = _axis_weights(out_h, h, my, grid_h, spec.input_size)
    wx = _axis_weights(out_w, w, mx, grid_w, spec.input_size)
    return np.clip(wy @ cam @ wx.T, 0.0, 1.0).astype(np.float32)


def view_image(pixels: np.ndarray, view_size: int = VIEW_SIZE) -> np.ndarray:
    """The original [0, 1] image as uint8 with its longest side ``view_size`` (for overlays)."""
    h, w = pixels.shape
    scale = view_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    small = np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)


def decision_caption(label: str, probability: float, threshold: float, positive_name: str) -> str:
    """``PNEUMONIA  p(PNEUMONIA)=0.5471  threshold 0.5470``: probability and threshold with the same
    number of decimals, enough that the printed pair gives the printed label and never prints
    equal when they are not (:func:`cxr_deploy.decision.decision_texts`)."""
    from ..decision import decision_texts

    shown_p, shown_t = decision_texts(probability, threshold)
    return f"{label}  p({positive_name})={shown_p}  threshold {shown_t}"


def render_overlay(view: np.ndarray, cam: np.ndarray, spec: PreprocessSpec, original_hw: tuple[int, int],
                   caption: str = "", footer: str = "", weight: float = 1.0) -> tuple[Image.Image, np.ndarray]:
    """Blend ``CAM x weight`` (jet colormap) over the gray view, add the colour bar and the texts;
    returns (RGB image, heat map in [0, 1]). ``weight`` is the positive-class probability.

    Opacity is ``ALPHA * heat``: where the heat is 0 the pixel is exactly the gray original.
    Done with Pillow's palette and composite (C loops): a 512² overlay costs a few ms.
    """
    heat = cam_to_image(cam, spec, original_hw, view.shape) * np.float32(min(max(float(weight), 0.0), 1.0))
    level = np.round(heat * 255).astype(np.uint8)
    colored = Image.fromarray(level, "P")
    colored.putpalette(_PALETTE)
    mask = Image.fromarray(np.round(level * ALPHA).astype(np.uint8), "L")
    image = Image.composite(colored.convert("RGB"), Image.fromarray(view, "L").convert("RGB"), mask)
    font, pad = _font(image)
    if caption or footer:
        _draw_text(image, caption, footer, font, pad)  # on the film, wrapped to its width
    return _with_colour_bar(image, font, pad), heat


@functools.lru_cache(maxsize=None)
def load_font(size: int):
    """Pillow's default font at ``size`` px (a fixed bitmap font where Pillow lacks FreeType), one
    object per size and process, whose text rendering is memoized (:func:`_memoize_text`)."""
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:
        font = ImageFont.load_default()
    _memoize_text(font)
    return font


def _memoize_text(font) -> None:
    """A glyph mask or a text length is a pure function of (font, text): the footer, the colour
    bar's labels and most wrap trials are the same on every overlay, so each is rendered once per
    worker. Pillow's own ``ImageDraw.text`` still draws every mask, so the pixels are unchanged.
    Measured (benchmarks/overlay_cost.py): rendering a line took 2.3 ms, a ``getlength`` 0.2 ms."""
    for name in ("getmask2", "getlength", "getbbox"):
        method = getattr(font, name, None)
        if method is not None:
            setattr(font, name, functools.lru_cache(maxsize=1024)(method))


def _font(image: Image.Image):
    size = max(10, max(image.height, 360) // 28)
    return load_font(size), max(2, size // 4)


def _with_colour_bar(image: Image.Image, font, pad: int) -> Image.Image:
    """A strip on the right: the colour scale from 0 (bottom) to 1 (top) and what it means. The strip
    depends on the film's size only, so it is drawn once per size (:func:`_colour_bar_strip`)."""
    strip = _colour_bar_strip(image.width, image.height, font, pad)
    out = Image.new("RGB", (image.width + strip.width, image.height), (0, 0, 0))
    out.paste(image, (0, 0))
    out.paste(strip, (image.width, 0))
    return out


@functools.lru_cache(maxsize=64)
def _colour_bar_strip(film_width: int, height: int, font, pad: int) -> Image.Image:
    out = Image.new("RGB", (film_width + max(56, film_width // 7), height), (0, 0, 0))
    draw_colour_bar(out, film_width, font, pad)
    return out.crop((film_width, 0, out.width, height))


def draw_colour_bar(out: Image.Image, film_width: int, font, pad: int) -> None:
    """Draw the strip right of ``film_width`` on ``out`` (nothing is drawn left of it)."""
    width = out.width - film_width
    draw = ImageDraw.Draw(out)
    line = draw.textbbox((0, 0), "Ag", font=font)[3] + pad
    top, bottom = 3 * line + pad, out.height - 3 * line - pad
    if bottom - top >= 16:
        bar_w = max(8, width // 4)
        ramp = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(bar_w, axis=1)
        bar = Image.fromarray(np.round(ramp * 255).astype(np.uint8), "P")
        bar.putpalette(_PALETTE)
        x0 = film_width + pad
        out.paste(bar.convert("RGB"), (x0, top))
        draw.text((x0 + bar_w + 2, top), "1", fill=(255, 255, 255), font=font)
        draw.text((x0 + bar_w + 2, bottom - line), "0", fill=(255, 255, 255), font=font)
        for i, text in enumerate(("heat =", "CAM x", "p(pos)")):
            draw.text((film_width + pad, pad + i * line), text, fill=(255, 255, 255), font=font)
        for i, text in enumerate(("red:", "drives", "positive")):
            draw.text((film_width + pad, bottom + pad + i * line), text, fill=(255, 255, 255), font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + ([current] if current else [])


def _draw_text(image: Image.Image, caption: str, footer: str, font, pad: int) -> None:
    draw = ImageDraw.Draw(image, "RGBA")
    line_h = draw.textbbox((0, 0), "Ag", font=font)[3] + pad // 2
    for text, at_top in ((caption, True), (footer, False)):
        lines = _wrap(draw, text, font, image.width - 2 * pad) if text else []
        if not lines:
            continue
        h = len(lines) * line_h + 2 * pad
        y = 0 if at_top else image.height - h
        draw.rectangle((0, y, image.width, y + h), fill=(0, 0, 0, 160))
        for i, line in enumerate(lines):
            draw.text((pad, y + pad + i * line_h), line, fill=(255, 255, 255, 255), font=font)


def write_overlay(candidates: list[str | Path], identity: str, view: np.ndarray, cam: np.ndarray,
                  spec: PreprocessSpec, original_hw: tuple[int, int], caption: str, footer: str = "",
                  weight: float = 1.0) -> str:
    """Render, then write to the first candidate name that is free or already holds this input's
    own overlay (a rerun replaces it); an overlay made for another input, or any file that is not
    ours, is never replaced (:class:`OverlayConflict` when no candidate is usable).

    Atomic: temp file + link/rename, so a kill never leaves half a file. The format follows the
    suffix: ``.jpg``/``.jpeg`` → JPEG, anything else → PNG. The folder must exist.
    """
    image, _ = render_overlay(view, cam, spec, original_hw, caption, footer, weight=weight)
    return save_overlay(image, candidates, identity, "\n".join(filter(None, (caption, footer))))


def save_overlay(image: Image.Image, candidates: list[str | Path], identity: str, description: str = "") -> str:
    """Write a rendered overlay under the first usable candidate name (see :func:`write_overlay`).
    PNG overlays also keep the caption and footer drawn on them as a ``Description`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    from ..atomic import fsync_path, temp_name

    first = Path(candidates[0])
    tmp = temp_name(first)
    try:
        if first.suffix.lower() in (".jpg", ".jpeg"):
            # Measured on a 512² overlay here: 1.6 ms and ~27 KiB, against 9 ms and ~235 KiB for PNG
            # (benchmarks/overlay_cost.py; deflate dominates the PNG). No chroma subsampling, so the heat
            # map's colours stay put.
            image.save(tmp, format="JPEG", quality=90, subsampling=0, comment=f"{IDENTITY_KEY}={identity}".encode())
        else:
            info = PngInfo()
            info.add_text(IDENTITY_KEY, identity)
            if description:
                info.add_itxt("Description", description)
            write_png(tmp, image, info)  # lossless, 3x faster than Pillow's encoder (see .png)
        # Whole on disk before its name appears (crash-safe, as cxr_deploy.atomic). The folder is
        # fsync'ed once per batch by the runner, before the rows naming these overlays, not once per
        # overlay: measured here (virtio disk, 4 busy agents) a 512² JPEG overlay took 3.5 ms without
        # fsync, 28 ms with file + folder fsync.
        fsync_path(tmp)
        for candidate in map(Path, candidates):
            if _place(tmp, candidate, identity):
                return str(candidate)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    raise OverlayConflict(f"{candidates[0]} and its fallback name hold overlays of other inputs; not replaced")


def _place(tmp: Path, target: Path, identity: str) -> bool:
    """Put ``tmp`` at ``target`` unless ``target`` belongs to something else. True when placed."""
    try:
        os.link(tmp, target)  # atomic create-if-absent: two writers can never both claim a name
        return True
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links (SMB, FAT): check, then rename
        if not os.path.lexists(target):
            os.replace(tmp, target)
            return True
    if os.path.isfile(target) and not os.path.islink(target) and read_identity(target) == identity:
        os.replace(tmp, target)  # this input's own overlay from an earlier run
        return True
    return False
