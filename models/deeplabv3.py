"""DeepLabv3 as the "aspp" model of semseg / DDC-AT (ddcat.md §1.3).

ASPP with five 256-channel branches (1x1; 3x3 at dilation 6/12/18; image pooling) concatenated to
1280 channels without a projection layer; the 1x1 projection sits in the main head `cls`
(Conv1x1 -> BN -> ReLU -> Dropout2d -> Conv1x1). The layer3 aux head is 1x1 too. The rates stay
6/12/18 at output stride 8, as in the published models.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .backbones.resnet import ResNet
from .pspnet import ContextSegmentor, check_input_sizes, conv_head, norm_stats
from .registry import register_model
from .segmentor import upsample


class ASPP(nn.Module):
    """``convs``: [1x1, 3x3 d=r for r in rates, (pool, 1x1)], each conv -> BN -> ReLU; concat."""

    def __init__(self, in_dim: int, out_dim: int, rates: Sequence[int]):
        super().__init__()
        branch = lambda k, r: nn.Sequential(  # noqa: E731
            nn.Conv2d(in_dim, out_dim, k, padding=r if k == 3 else 0, dilation=r, bias=False),
            nn.BatchNorm2d(out_dim), nn.ReLU(inplace=True))
        mods = [branch(1, 1)] + [branch(3, r) for r in rates]
        mods.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), *branch(1, 1)))
        self.convs = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = [conv(x) for conv in self.convs[:-1]]
        res.append(upsample(self.convs[-1](x), x.shape[-2:]))
        return torch.cat(res, 1)


class DeepLabV3(ContextSegmentor):
    def __init__(self, classes: int, layers: int = 50, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.1,
                 aux: bool = True, deep_base: bool = True, output_stride: int = 8, width: float = 1.0,
                 mean=None, std=None):
        super().__init__(mean, std)
        self.backbone = ResNet(layers, deep_base, output_stride, width)
        mid = max(1, int(round(256 * width)))
        self.aspp = ASPP(self.backbone.channels[3], mid, rates)
        self.cls = conv_head(mid * (len(rates) + 2), mid, classes, dropout, kernel=1)
        self.aux = conv_head(self.backbone.channels[2], mid, classes, dropout, kernel=1) if aux else None

    def features(self, x: torch.Tensor):
        """(layer3 output for the aux head, ASPP feature for the main head)."""
        c3, c4 = self.backbone(x)[2:]
        return c3, self.aspp(c4)


@register_model("deeplabv3")
def build_deeplabv3(cfg) -> DeepLabV3:
    check_input_sizes(cfg)
    m = cfg.model
    return DeepLabV3(cfg.data.classes, m.layers, m.atrous_rates, m.dropout, m.aux, m.deep_base, m.output_stride,
                     m.width, *norm_stats(m))
