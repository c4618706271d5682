"""UperNet (PPM + FPN) with an auxiliary FCN head on a ConvNeXt-CvSt backbone (sea.md §5.2).

As in the PIR-AT models: conv modules are Conv(no bias) -> BN -> ReLU; PPM bins 1-2-3-6 on stage 4
(-> 512 each, 3x3 bottleneck to 512); 1x1 laterals on stages 1-3, top-down sum, 3x3 FPN convs,
all levels upsampled to stride 4 and fused by a 3x3 conv module; a 1x1 classifier without dropout.
The aux head is one 3x3 conv module 384->256 and a 1x1 classifier on stage 3. All resizing is
bilinear with align_corners=False (the UperNet convention, unlike semseg's PSPNet).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.convnext import VARIANTS, convnext_cvst
from .pspnet import norm_stats
from .registry import register_model
from .segmentor import Segmentor
from utils.errors import SetupError


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class UperHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], classes: int, channels: int = 512,
                 bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.bins = tuple(bins)
        self.ppm = nn.ModuleList(ConvModule(in_channels[-1], channels) for _ in bins)
        self.bottleneck = ConvModule(in_channels[-1] + len(bins) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [resize(m(F.adaptive_avg_pool2d(top, b)), top.shape[-2:]) for b, m in zip(self.bins, self.ppm)]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat([top] + pooled, 1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    def __init__(self, cin: int, classes: int, channels: int = 256, index: int = 2):
        super().__init__()
        self.index = index
        self.conv = ConvModule(cin, channels, 3)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.conv(feats[self.index]))


class UperNet(Segmentor):
    def __init__(self, classes: int, backbone: str = "convnext_t_cvst", drop_path=None, aux: bool = True,
                 mean=None, std=None, width: float = 1.0):
        super().__init__(mean, std)
        self.backbone = convnext_cvst(backbone, drop_path, width)
        ch = self.backbone.channels
        c = lambda n: max(1, int(round(n * width)))  # noqa: E731
        self.decode_head = UperHead(ch, classes, c(512))
        self.aux_head = FCNHead(ch[2], classes, c(256)) if aux else None
        for head in (self.decode_head, self.aux_head):  # N(0, 0.02) conv init, zero biases (PIR-AT)
            for m in (head.modules() if head is not None else []):
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def aux_heads(self) -> Dict[str, nn.Module]:
        return {} if self.aux_head is None else {"aux_head": self.aux_head}

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = {"out": resize(self.decode_head(feats), size)}
        if self.aux_head is not None and self.training:
            out["aux"] = resize(self.aux_head(feats), size)
        return out


@register_model("upernet_convnext")
def build_upernet_convnext(cfg) -> UperNet:
    m = cfg.model
    if m.backbone not in VARIANTS:
        raise SetupError(f"{cfg.path}: model.backbone '{m.backbone}' is not a ConvNeXt variant for "
                         f"upernet_convnext; valid: {', '.join(VARIANTS)}")
    return UperNet(cfg.data.classes, m.backbone, m.drop_path, m.aux, *norm_stats(m), width=m.width)
