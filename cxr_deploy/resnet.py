"""ResNet50 (v1.5) in plain torch: torchvision's architecture, module names and initialisation.

Why not ``torchvision.models.resnet50``: importing torchvision imports all of it (datasets, ops,
``torch._dynamo`` through ``torchvision.ops``), 2.4 s of CPU and about 160 MB on the 2-core machine
(``import torch``: 2.2 s; ``import torch, torchvision``: 4.6 s). Every process that builds the
eager model paid it: the torch backend of ``batch``, the API and the listener, ``export``,
``calibrate``. This module builds the same network from ``torch.nn`` alone; torchvision stays for
the ImageNet weights' download and training's augmentation.

"The same network" is a contract, checked against torchvision in the tests: the same state-dict
keys and shapes (so ImageNet weights and every existing bundle load unchanged), the same outputs,
and, from the same torch seed, the same random initialisation (modules are created in torchvision's
order and re-initialised by its rule), so a seeded run trains the same model as before.
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = (3, 4, 6, 3)  # bottleneck blocks per stage: ResNet50
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 → 3x3 (carries the stride: "v1.5") → 1x1, plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * EXPANSION))
    first = Bottleneck(inplanes, planes, stride, downsample)
    return nn.Sequential(first, *(Bottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)))


class ResNet50(nn.Module):
    """``conv1 bn1 relu maxpool layer1..layer4 avgpool fc``, as torchvision names them."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(WIDTHS, LAYERS), start=1):
            setattr(self, f"layer{index}", _stage(inplanes, planes, blocks, 1 if index == 1 else 2))
            inplanes = planes * EXPANSION
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        if self.conv1.weight.is_meta:  # built to have weights assigned (ModelBundle.build_model):
            return  # meta tensors hold no values, and normal_ on them imports torch._dynamo (1.1-1.5 s)
        for module in self.modules():  # torchvision's rule, in its order (the torch RNG is drawn alike)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
