"""Plain Vision Transformer (ViT-S/16 of Segmenter, sea.md §5.3) with position-embedding resizing and padding.

Pre-norm blocks (LN -> multi-head self-attention -> residual, LN -> MLP with GELU -> residual), qkv with
bias, one class token, a learned position embedding built for `img_size` (512: 1 + 32 x 32 tokens),
a final LayerNorm, and the 1000-class ImageNet ``head`` that Segmenter keeps but never uses (frozen
here: it holds no gradient, so distributed training needs no unused-parameter search). Drop path rises
linearly from 0 to `drop_path` over the blocks. LayerNorms use PyTorch's default eps 1e-5, as
Segmenter's encoder (timm's own ViT uses 1e-6), so the released weights compute what they were trained with.

Key names follow timm's ``vit_small_patch16_224`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``), which are
also the names under ``encoder.`` in the released Segmenter checkpoint.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .convnext import DropPath, Mlp


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad [B,C,H,W] on the bottom and right so that H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def resize_pos_embed(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                     extra_tokens: int = 1) -> torch.Tensor:
    """Position embedding [1, extra + gh*gw, D] re-sampled bilinearly (align_corners=False) from the
    `old_grid` (gh, gw) to `new_grid`; the class token's entry is kept apart, unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    tok, grid = pos[:, :extra_tokens], pos[:, extra_tokens:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    return torch.cat([tok, grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d)], 1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d_head)) v, with dropout on the attention weights in training
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))


class FeedForward(Mlp):
    """The ConvNeXt MLP (fc1 -> GELU -> fc2) with Segmenter's dropout after the GELU and after fc2."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__(dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block; also the block of Segmenter's mask-transformer decoder."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, hidden, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def init_linear_and_norm(module: nn.Module) -> None:
    """Segmenter's init: Linear weights truncated normal (std 0.02) with zero biases, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT trunk; ``forward(x)`` with H, W multiples of the patch -> (normed patch tokens [B, gh*gw, D], (gh, gw)).

    The class token goes through the blocks and is dropped from the output (Segmenter decodes patches
    only). A grid other than the built one gets a bilinearly resized position embedding at run time.
    """

    def __init__(self, img_size: int = 512, patch_size: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
                 mlp_ratio: float = 4.0, drop_path: float = 0.1, dropout: float = 0.0, num_classes: int = 1000):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.dim = patch_size, dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> drop_path
        self.blocks = nn.ModuleList(Block(dim, heads, int(dim * mlp_ratio), dropout, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)  # ImageNet classifier: kept for the checkpoint layout, unused
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_linear_and_norm(self)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size} (pad it first)")
        grid = (h // self.patch_size, w // self.patch_size)
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = self.pos_drop(tokens + resize_pos_embed(self.pos_embed, self.grid, grid))
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)[:, 1:], grid
