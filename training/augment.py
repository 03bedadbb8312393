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

Validation and test never pass through here: they use ``spec.apply`` alone.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import AugmentConfig


class Augment:
    def __init__(self, config: AugmentConfig, pad_value: float = 0.0):
        self.config = config
        self.pad_value = float(pad_value)

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from torchvision.transforms.v2 import functional as F
        from torchvision.transforms.v2 import InterpolationMode

        c = self.config
        size = gray.shape[-1]
        # Draw every parameter, used or not, so the random stream does not depend on the settings.
        angle = float(rng.uniform(-c.rotation, c.rotation))
        tx, ty = (float(v) for v in rng.uniform(-c.translate, c.translate, size=2) * size)
        scale = float(rng.uniform(c.scale_min, c.scale_max))
        brightness = float(rng.uniform(-c.brightness, c.brightness))
        contrast = float(rng.uniform(1 - c.contrast, 1 + c.contrast))
        flip = bool(rng.random() < 0.5)

        x = torch.from_numpy(np.array(gray, dtype=np.float32))[None]  # a writable copy
        if angle or tx or ty or scale != 1.0:
            x = F.affine(x, angle=angle, translate=[round(tx), round(ty)], scale=scale, shear=[0.0, 0.0],
                         interpolation=InterpolationMode.BILINEAR, fill=[self.pad_value])
        out = x[0].numpy()
        if c.contrast:
            out = (out - out.mean()) * contrast + out.mean()
        if c.brightness:
            out = out + brightness
        if c.hflip and flip:
            out = out[:, ::-1]
        return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def build_augment(config: AugmentConfig, pad_value: float = 0.0) -> Augment | None:
    return Augment(config, pad_value) if config.enabled else None
