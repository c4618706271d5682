"""ConvNeXt with the convolutional stem "CvSt" of the robust ImageNet models (sea.md §5.1).

Stem: Conv3x3 s2 (3->48) -> LN -> GELU -> Conv3x3 s2 (48->96) -> LN -> GELU (stride 4, convs with
bias), replacing the 4x4 patchify stem. Stages of ConvNeXt blocks (dw 7x7 -> LN -> Linear d->4d ->
GELU -> Linear 4d->d -> layer scale -> drop path -> residual), downsampling LN -> Conv2x2 s2 before
stages 2-4, and one fresh LayerNorm per stage output (strides 4/8/16/32).

Key names follow timm's ConvNeXt (``stages.i.downsample``, ``stages.i.blocks.k.conv_dw``,
``mlp.fc1``...), the naming of the robust ImageNet checkpoints, except that the stem is flat
(``stem.0`` instead of ``stem.stem.0``) and the output norms are ``out_norms.i``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

# name -> (depths, dims, drop-path rate)
VARIANTS = {"convnext_t_cvst": ([3, 3, 9, 3], [96, 192, 384, 768], 0.4),
            "convnext_s_cvst": ([3, 3, 27, 3], [96, 192, 384, 768], 0.3)}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B,C,H,W] tensor (ConvNeXt's "channels_first" LN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with prob p, scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # channels last for LN + Linear
        y = (self.mlp(self.norm(y)) * self.gamma).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class Stage(nn.Module):
    def __init__(self, cin: int, dim: int, depth: int, rates: Sequence[float], layer_scale_init: float,
                 downsample: bool):
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, dim, 2, 2))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*[Block(dim, rates[k], layer_scale_init) for k in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """ConvNeXt-CvSt trunk; forward -> the four normed stage outputs, shallow to deep."""

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path: float = 0.0, layer_scale_init: float = 1e-6, stem_dim: int = 48):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem_dim, 3, 2, 1), LayerNorm2d(stem_dim, eps=1e-6), nn.GELU(),
                                  nn.Conv2d(stem_dim, dims[0], 3, 2, 1), LayerNorm2d(dims[0], eps=1e-6), nn.GELU())
        total = sum(depths)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]  # linear 0 -> drop_path over all blocks
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.ModuleList(
            Stage(dims[max(i - 1, 0)], dims[i], depths[i], rates[starts[i]:starts[i] + depths[i]], layer_scale_init,
                  downsample=i > 0) for i in range(4))
        self.out_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for d in dims)
        self.channels = list(dims)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage, norm in zip(self.stages, self.out_norms):
            x = stage(x)
            outs.append(norm(x))
        return outs


def convnext_cvst(variant: str, drop_path=None, width: float = 1.0) -> ConvNeXt:
    """ConvNeXt-T/S CvSt by name; `drop_path` None = the variant's rate (0.4 T, 0.3 S); `width` scales
    every channel count (1.0 = the published networks; smaller for CPU runs)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ConvNeXt variant '{variant}'; valid: {', '.join(VARIANTS)}")
    depths, dims, dpr = VARIANTS[variant]
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731
    return ConvNeXt(depths, [c(d) for d in dims], dpr if drop_path is None else drop_path, stem_dim=c(48))
