"""Classifier + class-activation map in one forward pass (what every backend runs).

For a ResNet whose head is ``Linear(GAP(A))``, the gradient of the class-``c`` logit with respect to
the ``layer4`` activations ``A`` is ``w_c / (h*w)`` at every position, so Grad-CAM's channel weights
are ``w_c / (h*w)`` and::

    GradCAM_c = ReLU(sum_k w_ck * A_k) / (h*w)

That is the class-activation map (CAM) up to a positive scale, which per-image max normalization
removes. Computing it in the forward pass lets TorchScript, ONNX Runtime and INT8 models produce
Grad-CAM without autograd. It only holds for a linear head on global average pooling, which
:func:`cxr_deploy.model.head_is_linear` checks.

Outputs of :class:`ClassifierWithCAM` (and of every exported artifact, named by
``cxr_deploy.artifacts.INPUT_NAME``/``OUTPUT_NAMES``):

- ``probabilities``: ``(N, num_classes)`` softmax probabilities (not logits);
- ``cam``: ``(N, h, w)`` positive-class map, ReLU'd and scaled so each image's maximum is 1
  (all zeros when nothing is positive); ``h = w = input_size / 32`` (7 for 224);
- ``population_score`` (only when built with the bundle's population statistics,
  :mod:`cxr_deploy.in_population`): ``(N,)`` Mahalanobis distance of the image's features from the
  training population. Computed from the same ``layer4`` activations, after the backbone, so INT8
  keeps it in float32 like the head.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import head_is_linear


class ClassifierWithCAM(nn.Module):
    """``temperature``: the bundle's calibration (logits are divided by it before the softmax, so
    every artifact exported from this module gives calibrated probabilities; the CAM, normalized
    per image, does not change). 1.0 leaves the graph exactly as it was."""

    def __init__(self, model: nn.Module, positive_index: int = 1, temperature: float = 1.0, population=None):
        super().__init__()
        if not head_is_linear(model):
            raise ValueError("forward-pass CAM equals Grad-CAM only for a linear head on global average "
                             "pooling; this model's head is different, refusing to export a CAM output")
        # Two parts, so the population score can read layer3's output too (in_population.FEATURE).
        self.trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                   model.layer1, model.layer2, model.layer3)
        self.layer4 = model.layer4
        self.fc = model.fc
        self.positive_index = int(positive_index)
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.scores_population = population is not None  # a Python flag: traced graphs hold it as a constant
        if population is not None:  # graph constants; not in the state_dict (the bundle's weights.pt)
            self.register_buffer("centres", torch.as_tensor(population.centres, dtype=torch.float32),
                                 persistent=False)
            self.register_buffer("whiten", torch.as_tensor(population.whiten, dtype=torch.float32),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a3 = self.trunk(x)  # (N, 1024, 2h, 2w)
        a = self.layer4(a3)  # (N, 2048, h, w)
        if torch.is_autocast_enabled(a.device.type):
            # Under mixed precision (the torch backend on CUDA), only the backbone runs in fp16:
            # the head and the map stay float32, whose range the softmax and the max-normalization
            # need (1e-12 underflows to 0 in fp16 and an all-zero map would become 0/0).
            # Tracing and ONNX export run without autocast, so exported graphs never see this branch.
            with torch.autocast(a.device.type, enabled=False):
                return self._head(a.float(), a3.float())
        return self._head(a, a3)

    def _head(self, a: torch.Tensor, a3: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = a.mean(dim=(2, 3))
        logits = self.fc(pooled)
        if self.temperature != 1.0:  # a Python-level branch: traced graphs hold it as a constant
            logits = logits / self.temperature
        probabilities = torch.softmax(logits, dim=1)
        weight = self.fc.weight[self.positive_index].to(a.dtype)  # (2048,)
        cam = torch.relu(torch.einsum("k,nkhw->nhw", weight, a))
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
        if self.scores_population:
            return probabilities, cam / peak, self._population_score(pooled_features(a3, a))
        return probabilities, cam / peak

    def population_features(self, x: torch.Tensor) -> torch.Tensor:
        """The features the population score measures (what training fits the statistics on)."""
        a3 = self.trunk(x)
        return pooled_features(a3, self.layer4(a3))

    def _population_score(self, features: torch.Tensor) -> torch.Tensor:
        """Smallest Mahalanobis distance to a class centre (see cxr_deploy.in_population.FEATURE)."""
        diff = features[:, None, :] - self.centres[None]  # (N, C, D)
        squared = torch.matmul(diff, self.whiten).pow(2).sum(dim=2)  # (N, C)
        return torch.sqrt(squared.amin(dim=1))


def pooled_features(a3: torch.Tensor, a4: torch.Tensor) -> torch.Tensor:
    """layer3 and layer4 activations -> the population features (cxr_deploy.in_population.FEATURE):
    both global-average-pooled, side by side, float32 ``(N, 1024 + 2048)``."""
    return torch.cat([a3.float().mean(dim=(2, 3)), a4.float().mean(dim=(2, 3))], dim=1)
