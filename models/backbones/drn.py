"""Dilated Residual Networks (Yu et al., CVPR 2017): the C, D and A variants (mtl_fpd.md §A1.1).

Module and state-dict names follow the published DRN code, so its ImageNet checkpoints load by
name once the classifier (``fc.*``) is dropped:

- C: ``conv1, bn1, relu, layer1 .. layer8`` (residual BasicBlocks in layer1/2, no skip in layer7/8)
- D: ``layer0, layer1 .. layer8`` (plain conv-BN-ReLU stacks in layer0/1/2 and layer7/8)
- A: ``conv1, bn1, relu, maxpool, layer1 .. layer4`` (ResNet with dilated layer3/layer4)

Output stride is 8 for every variant. There is no classifier: segmentation models drop it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)

# name -> (variant, block, blocks per stage)
ARCHS: Dict[str, Tuple[str, str, Sequence[int]]] = {
    "drn_c_26": ("C", "basic", [1, 1, 2, 2, 2, 2, 1, 1]),
    "drn_c_42": ("C", "basic", [1, 1, 3, 4, 6, 3, 1, 1]),
    "drn_c_58": ("C", "bottleneck", [1, 1, 3, 4, 6, 3, 1, 1]),
    "drn_d_22": ("D", "basic", [1, 1, 2, 2, 2, 2, 1, 1]),
    "drn_d_24": ("D", "basic", [1, 1, 2, 2, 2, 2, 2, 2]),
    "drn_d_38": ("D", "basic", [1, 1, 3, 4, 6, 3, 1, 1]),
    "drn_d_40": ("D", "basic", [1, 1, 3, 4, 6, 3, 2, 2]),
    "drn_d_54": ("D", "bottleneck", [1, 1, 3, 4, 6, 3, 1, 1]),
    "drn_d_56": ("D", "bottleneck", [1, 1, 3, 4, 6, 3, 2, 2]),
    "drn_d_105": ("D", "bottleneck", [1, 1, 3, 4, 23, 3, 1, 1]),
    "drn_d_107": ("D", "bottleneck", [1, 1, 3, 4, 23, 3, 2, 2]),
    "drn_a_50": ("A", "bottleneck", [3, 4, 6, 3]),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs, dilation (d1, d2); ``residual=False`` removes the skip (C-variant layer7/8)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: Tuple[int, int] = (1, 1), residual: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation[1])
        self.bn2 = nn.BatchNorm2d(planes)
        # kept even when residual=False (drn_c_58 layer7) so published state dicts match
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (stride, dilation d2) - 1x1 (x4), always residual."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: Tuple[int, int] = (1, 1), residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class DRN(nn.Module):
    """DRN trunk without classifier; ``forward`` returns the stride-8 feature map (``out_dim`` channels).

    ``stage_names`` lists the top-level children in order; ``forward_stages(x, names)`` runs a
    contiguous subset (multitask models split the trunk after layer5).
    """

    def __init__(self, arch: str = "drn_d_22"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown DRN arch '{arch}'; valid: {', '.join(ARCHS)}")
        self.arch = arch
        self.variant, kind, layers = ARCHS[arch]
        block = BLOCKS[kind]
        if self.variant == "A":
            self._build_a(block, layers)
        else:
            self._build_cd(block, layers)
        self.stage_names: List[str] = list(self._modules)
        for m in self.modules():  # N(0, sqrt(2 / (k*k*C_out))), BN (1, 0)
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _build_cd(self, block, layers: Sequence[int]) -> None:
        ch = CHANNELS
        self.inplanes = ch[0]
        if self.variant == "C":
            self.conv1 = nn.Conv2d(3, ch[0], 7, 1, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(ch[0])
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = self._make_layer(BasicBlock, ch[0], layers[0], stride=1)
            self.layer2 = self._make_layer(BasicBlock, ch[1], layers[1], stride=2)
        else:
            self.layer0 = nn.Sequential(nn.Conv2d(3, ch[0], 7, 1, 3, bias=False), nn.BatchNorm2d(ch[0]),
                                        nn.ReLU(inplace=True))
            self.layer1 = self._make_conv_layers(ch[0], layers[0], stride=1)
            self.layer2 = self._make_conv_layers(ch[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, ch[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, ch[3], layers[3], stride=2)
        self.layer5 = self._make_layer(block, ch[4], layers[4], dilation=2, new_level=False)
        self.layer6 = self._make_layer(block, ch[5], layers[5], dilation=4, new_level=False)
        if self.variant == "C":  # de-gridding: BasicBlocks without the skip connection
            self.layer7 = self._make_layer(BasicBlock, ch[6], layers[6], dilation=2, new_level=False, residual=False)
            self.layer8 = self._make_layer(BasicBlock, ch[7], layers[7], dilation=1, new_level=False, residual=False)
        else:
            self.layer7 = self._make_conv_layers(ch[6], layers[6], dilation=2)
            self.layer8 = self._make_conv_layers(ch[7], layers[7], dilation=1)
        self.out_dim = ch[7]

    def _build_a(self, block, layers: Sequence[int]) -> None:
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer_a(block, 64, layers[0])
        self.layer2 = self._make_layer_a(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer_a(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer_a(block, 512, layers[3], dilation=4)
        self.out_dim = 512 * block.expansion

    def _downsample(self, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilation: int = 1,
                    new_level: bool = True, residual: bool = True) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = self._downsample(planes * block.expansion, stride)
        first = (1, 1) if dilation == 1 else (dilation // 2 if new_level else dilation, dilation)
        mods = [block(self.inplanes, planes, stride, downsample, dilation=first, residual=residual)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, residual=residual, dilation=(dilation, dilation))
                 for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _make_layer_a(self, block, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        # As published, the first block of a dilated stage stays undilated (weights are unaffected).
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = self._downsample(planes * block.expansion, stride)
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, dilation=(dilation, dilation)) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _make_conv_layers(self, channels: int, convs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        mods: List[nn.Module] = []
        for i in range(convs):
            mods += [_conv3x3(self.inplanes, channels, stride if i == 0 else 1, dilation),
                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            self.inplanes = channels
        return nn.Sequential(*mods)

    def forward_stages(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        for n in names:
            x = getattr(self, n)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x, self.stage_names)
