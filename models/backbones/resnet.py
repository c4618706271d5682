"""Dilated ResNet as used by semseg / DDC-AT (ddcat.md §1.1).

Deep-base stem (three 3x3 convs) or the torchvision 7x7 stem, bottleneck blocks with the stride on
the 3x3 conv ("v1.5"), and layer3/layer4 dilated instead of strided for output stride 8: every
block of layer3 gets dilation 2 and every block of layer4 dilation 4 (no multi-grid).
Basic blocks (ResNet-18/34) and a width multiplier give small variants for CPU runs.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
          101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ResNet(nn.Module):
    """ResNet trunk: ``layer0`` (stem + maxpool), ``layer1``..``layer4``; forward -> [c1, c2, c3, c4].

    ``layer0`` keeps the module order of semseg's PSPNet (conv1, bn1, relu, conv2, bn2, relu, conv3,
    bn3, relu, maxpool), so published state dicts map onto it by index.
    """

    def __init__(self, layers: int = 50, deep_base: bool = True, output_stride: int = 8, width: float = 1.0):
        super().__init__()
        if layers not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {layers}")
        kind, counts = DEPTHS[layers]
        block = BasicBlock if kind == "basic" else Bottleneck
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        if deep_base:
            stem = [conv3x3(3, c(64), 2), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                    conv3x3(c(64), c(64)), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                    conv3x3(c(64), c(128)), nn.BatchNorm2d(c(128)), nn.ReLU(inplace=True)]
            self.inplanes = c(128)
        else:
            stem = [nn.Conv2d(3, c(64), 7, 2, 3, bias=False), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True)]
            self.inplanes = c(64)
        self.layer0 = nn.Sequential(*stem, nn.MaxPool2d(3, 2, 1))
        strides, dilations = {8: ([1, 2, 1, 1], [1, 1, 2, 4]), 16: ([1, 2, 2, 1], [1, 1, 1, 2]),
                              32: ([1, 2, 2, 2], [1, 1, 1, 1])}[output_stride]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, c(64 * 2 ** i), counts[i], strides[i], dilations[i]) for i in range(4))
        self.channels = [c(64 * 2 ** i) * block.expansion for i in range(4)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        mods = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.layer0(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [c1, c2, c3, self.layer4(c3)]
