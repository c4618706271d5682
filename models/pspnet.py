"""PSPNet exactly as in semseg / DDC-AT (ddcat.md §1.2): PPM 1-2-3-6, 3x3 head, layer3 aux head."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from utils.errors import SetupError

from .backbones.resnet import ResNet
from .registry import register_model
from .segmentor import Segmentor, upsample


class PPM(nn.Module):
    """Pyramid pooling: per bin AdaptiveAvgPool -> 1x1 conv -> BN -> ReLU -> upsample; concat with input."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: Sequence[int]):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                          nn.BatchNorm2d(reduction_dim), nn.ReLU(inplace=True)) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [upsample(f(x), size) for f in self.features], 1)


def conv_head(cin: int, mid: int, classes: int, dropout: float, kernel: int = 3) -> nn.Sequential:
    """Conv(k x k) -> BN -> ReLU -> Dropout2d -> Conv1x1 classifier (semseg's `cls` / `aux`)."""
    return nn.Sequential(nn.Conv2d(cin, mid, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(mid),
                         nn.ReLU(inplace=True), nn.Dropout2d(dropout), nn.Conv2d(mid, classes, 1))


class ContextSegmentor(Segmentor):
    """Backbone -> context module -> main head (+ layer3 aux head): the shape PSPNet and DeepLabv3
    share. Subclasses build `backbone`, `cls`, `aux` and implement ``features``."""

    def make_head(self, classes: int) -> nn.Sequential:
        """A fresh main head with `classes` outputs (DDC-AT adds more heads of this shape)."""
        conv = self.cls[0]
        return conv_head(conv.in_channels, conv.out_channels, classes, self.cls[3].p, kernel=conv.kernel_size[0])

    def features(self, x: torch.Tensor):
        """(layer3 output for the aux head, context feature for the main head)."""
        raise NotImplementedError

    def aux_heads(self) -> Dict[str, nn.Module]:
        return {} if self.aux is None else {"aux": self.aux}

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        c3, ctx = self.features(x)
        out = {"out": upsample(self.cls(ctx), size)}
        if self.aux is not None and self.training:
            out["aux"] = upsample(self.aux(c3), size)
        return out


class PSPNet(ContextSegmentor):
    def __init__(self, classes: int, layers: int = 50, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux: bool = True, deep_base: bool = True, output_stride: int = 8, width: float = 1.0,
                 mean=None, std=None):
        super().__init__(mean, std)
        self.backbone = ResNet(layers, deep_base, output_stride, width)
        fea = self.backbone.channels[3]
        self.ppm = PPM(fea, fea // len(bins), bins)
        mid = max(1, int(round(512 * width)))
        self.cls = conv_head(fea * 2, mid, classes, dropout)
        self.aux = conv_head(self.backbone.channels[2], max(1, int(round(256 * width))), classes, dropout) if aux else None

    def features(self, x: torch.Tensor):
        """(layer3 output for the aux head, context feature for the main head)."""
        c3, c4 = self.backbone(x)[2:]
        return c3, self.ppm(c4)


def norm_stats(m):
    """(mean, std) for the model's input normalisation from the model config; null = none (PIR-AT)."""
    return m.mean, m.std


def check_input_sizes(cfg) -> None:
    """The semseg rule of PSPNet / DeepLabv3 and their DDC-AT variants (ddcat.md §1.4): the training crop
    and the sliding window have (h-1) and (w-1) divisible by 8, so the stride-8 feature grid maps back
    onto the input corners (align_corners=True upsampling). Checked when the model is built, before
    anything is trained or written."""
    keys = [("test.crop_size", cfg.test.crop_size)]
    if cfg.data.transform != "none":  # the crop only exists with an augmentation that crops
        keys.insert(0, ("data.crop_size", cfg.data.crop_size))
    for key, size in keys:
        if size is not None and any((int(s) - 1) % 8 for s in size):
            near = [8 * max(round((int(s) - 1) / 8), 1) + 1 for s in size]
            raise SetupError(f"config key '{key}' is {list(size)} but {cfg.model.name} needs (h-1) and (w-1) "
                             f"divisible by 8, e.g. {near}")


@register_model("pspnet")
def build_pspnet(cfg) -> PSPNet:
    check_input_sizes(cfg)
    m = cfg.model
    return PSPNet(cfg.data.classes, m.layers, m.bins, m.dropout, m.aux, m.deep_base, m.output_stride, m.width,
                  *norm_stats(m))
