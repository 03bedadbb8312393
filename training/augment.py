"""Train-time augmentation on the spec's resized gray image, before the spec's normalization.

Resizing and normalizing are defined only by :class:`~cxr_deploy.preprocessing.PreprocessSpec`;
this module never changes the image size. It takes the (S, S) [0, 1] output of
``spec.resize_gray`` and applies, with parameters drawn from the caller's generator:

- a random affine (rotation ±``rotation``°, translation ±``translate`` of the side, zoom in
  [``scale_min``, ``scale_max``]): zooming in > 1 is the random-resized-crop of this pipeline, kept
  mild so costophrenic angles and apices mostly stay in view; uncovered area is filled with the
  spec's pad value, like the letterbox border;
- brightness (additive) and contrast (multiplicative around the mean) jitter, clipped to [0, 1];
- optionally a horizontal flip (off by default: see ``AugmentConfig.hflip``).

The parameters are drawn once, by :func:`draw_params` (the one definition of the family), and applied
either here, one image at a time in the loader's workers (:class:`Augment`), or to a whole batch on
the training device (:func:`augment_batch`, used by :mod:`.device_batches`). Both give the same
image for the same parameters (tested to 1e-5).

Validation and test never pass through here: they use ``spec.apply`` alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import AugmentConfig

# One parameter vector per image: what draw_params returns and both paths apply.
PARAMS = ("angle", "tx", "ty", "scale", "brightness", "contrast", "flip")


def draw_params(config: AugmentConfig, size: int, rng: np.random.Generator) -> np.ndarray:
    """The parameters of one image's augmentation as a float32 vector in :data:`PARAMS` order.
    Every parameter is drawn, used or not, so the random stream does not depend on the settings;
    translations are whole pixels (what torchvision's tensor affine takes)."""
    c = config
    angle = float(rng.uniform(-c.rotation, c.rotation))
    tx, ty = (float(v) for v in rng.uniform(-c.translate, c.translate, size=2) * size)
    scale = float(rng.uniform(c.scale_min, c.scale_max))
    brightness = float(rng.uniform(-c.brightness, c.brightness))
    contrast = float(rng.uniform(1 - c.contrast, 1 + c.contrast))
    flip = bool(rng.random() < 0.5)
    return np.array([angle, round(tx), round(ty), scale, brightness if c.brightness else 0.0,
                     contrast if c.contrast else 1.0, float(flip and c.hflip)], dtype=np.float32)


class Augment:
    """One image at a time, on the CPU (the loader's workers)."""

    def __init__(self, config: AugmentConfig, pad_value: float = 0.0):
        self.config = config
        self.pad_value = float(pad_value)

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.apply(gray, draw_params(self.config, gray.shape[-1], rng))

    def apply(self, gray: np.ndarray, params: np.ndarray) -> np.ndarray:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        angle, tx, ty, scale, brightness, contrast, flip = (float(v) for v in params)
        x = torch.from_numpy(np.array(gray, dtype=np.float32))[None]  # a writable copy
        if angle or tx or ty or scale != 1.0:
            x = F.affine(x, angle=angle, translate=[int(tx), int(ty)], scale=scale, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR, fill=[self.pad_value])
        out = x[0].numpy()
        if contrast != 1.0:
            out = (out - out.mean()) * contrast + out.mean()
        if brightness:
            out = out + brightness
        if flip:
            out = out[:, ::-1]
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def build_augment(config: AugmentConfig, pad_value: float = 0.0) -> Augment | None:
    if not config.enabled:
        return None
    # Imported here, in the process that builds the loaders, so that forked loader workers inherit
    # it instead of each importing torchvision again (2.4 s of CPU apiece on the 2-core machine).
    import torchvision.transforms.v2.functional  # noqa: F401

    return Augment(config, pad_value)


def _inverse_affine(params: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 2, 3) ``affine_grid`` matrices in normalized coordinates that sample each output pixel
    where torchvision's tensor affine (rotation about the centre, scale, whole-pixel translation)
    samples it: the inverse map [R(θ)/s | -R(θ)/s · t], translation divided by half the side."""
    angle = params[:, 0].double() * (math.pi / 180)
    scale = params[:, 3].double()
    t = params[:, 1:3].double()
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    rows = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (N, 2, 2)
    shift = -(rows @ t[:, :, None]) / (size / 2)
    return torch.cat([rows, shift], 2)


def augment_batch(gray: torch.Tensor, params: torch.Tensor, pad_value: float) -> torch.Tensor:
    """(N, S, S) float [0, 1] → augmented (N, S, S), on ``gray``'s device, one kernel per step for
    the whole batch (the GPU path of :class:`Augment`, same parameters → same images)."""
    n, size = gray.shape[0], gray.shape[-1]
    flip = params[:, 6] > 0.5
    any_flip = bool(flip.any())  # decided on the host copy: no device sync per batch
    params = params.to(gray.device)
    flip = flip.to(gray.device)
    theta = _inverse_affine(params, size).to(gray.dtype)
    grid = torch.nn.functional.affine_grid(theta, [n, 2, size, size], align_corners=False)
    # A channel of ones sampled alongside says how much of each output pixel came from inside the
    # image; the rest is the pad value (torchvision's fill rule for bilinear sampling).
    stacked = torch.stack([gray, torch.ones_like(gray)], 1)
    sampled = torch.nn.functional.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)
    image, inside = sampled[:, 0], sampled[:, 1]
    out = (image - pad_value) * inside + pad_value
    mean = out.mean(dim=(1, 2), keepdim=True)
    out = (out - mean) * params[:, 5, None, None] + mean + params[:, 4, None, None]
    if any_flip:
        out = torch.where(flip[:, None, None], out.flip(-1), out)
    return out.clamp_(0.0, 1.0)
