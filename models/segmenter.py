"""Segmenter (Strudel et al. 2021) with a ViT encoder, as the PIR-AT Segmenter-ViT-S (sea.md §5.3).

The input is zero-padded on the bottom / right to a multiple of the patch, encoded by the ViT
(models/backbones/vit.py), decoded into one score map per class on the patch grid, upsampled
bilinearly (align_corners=False) to the padded size and cropped back to the input size.

Mask-transformer decoder: ``proj_dec`` (D_enc -> D) of the patch tokens, concatenated with learned
class embeddings ``cls_emb`` [1, C, D]; ``blocks`` of the encoder's kind, ``decoder_norm``; patch and
class tokens are multiplied by their own D x D matrices (``proj_patch``, ``proj_classes``) and
L2-normalised; masks = patches x classes^T, then ``mask_norm``, a LayerNorm over the C classes.
`decoder: linear` is the paper's linear baseline instead (one Linear D_enc -> C on each patch token).
There is no auxiliary head. Inputs are raw RGB in [0,1] (model.mean/std null), as published.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SetupError

from .backbones.vit import Block, VisionTransformer, init_linear_and_norm, pad_to_multiple
from .pspnet import norm_stats
from .registry import register_model
from .segmentor import Segmentor

DECODERS = ("mask_transformer", "linear")


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder; ``forward(tokens, grid)`` -> masks [B, C, gh, gw]."""

    def __init__(self, classes: int, d_encoder: int, dim: int, heads: int, layers: int = 2,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, drop_path: float = 0.0):
        super().__init__()
        self.classes = classes
        rates = [drop_path * i / max(layers - 1, 1) for i in range(layers)]
        self.blocks = nn.ModuleList(Block(dim, heads, int(dim * mlp_ratio), dropout, r) for r in rates)
        self.cls_emb = nn.Parameter(torch.zeros(1, classes, dim))
        self.proj_dec = nn.Linear(d_encoder, dim)
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(classes)
        init_linear_and_norm(self)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = torch.cat([self.proj_dec(tokens), self.cls_emb.expand(tokens.shape[0], -1, -1)], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :-self.classes] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, -self.classes:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # [B, gh*gw, C]
        return masks.transpose(1, 2).reshape(tokens.shape[0], self.classes, *grid)


class LinearDecoder(nn.Module):
    """The Segmenter paper's linear decoder: class scores of each patch token."""

    def __init__(self, classes: int, d_encoder: int):
        super().__init__()
        self.head = nn.Linear(d_encoder, classes)
        init_linear_and_norm(self)

    def forward(self, tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return self.head(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


class Segmenter(Segmentor):
    """ViT encoder (``backbone``) + mask-transformer or linear decoder (``decode_head``)."""

    def __init__(self, classes: int, img_size: int = 512, patch_size: int = 16, dim: int = 384, depth: int = 12,
                 heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1, decoder: str = "mask_transformer",
                 decoder_layers: int = 2, decoder_dropout: float = 0.1, mean=None, std=None):
        super().__init__(mean, std)
        self.backbone = VisionTransformer(img_size, patch_size, dim, depth, heads, mlp_ratio, drop_path, 0.0)
        if decoder == "mask_transformer":  # width and heads as the encoder (384, 6 = 384 // 64 for ViT-S)
            self.decode_head = MaskTransformer(classes, dim, dim, heads, decoder_layers, mlp_ratio, decoder_dropout)
        elif decoder == "linear":
            self.decode_head = LinearDecoder(classes, dim)
        else:
            raise ValueError(f"unknown Segmenter decoder '{decoder}'; valid: {', '.join(DECODERS)}")

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        padded = pad_to_multiple(x, self.backbone.patch_size)
        masks = self.decode_head(*self.backbone(padded))
        masks = F.interpolate(masks, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": masks[:, :, :x.shape[-2], :x.shape[-1]]}


@register_model("segmenter")
def build_segmenter(cfg) -> Segmenter:
    m, v = cfg.model, cfg.model.vit
    if v.decoder not in DECODERS:
        raise SetupError(f"{cfg.path}: model.vit.decoder '{v.decoder}' unknown; valid: {', '.join(DECODERS)}")
    if v.img_size % v.patch_size or v.embed_dim % v.heads:
        raise SetupError(f"{cfg.path}: model.vit needs img_size a multiple of patch_size and embed_dim a multiple "
                         f"of heads (got {v.img_size}, {v.patch_size}, {v.embed_dim}, {v.heads})")
    drop_path = 0.1 if m.drop_path is None else m.drop_path
    return Segmenter(cfg.data.classes, v.img_size, v.patch_size, v.embed_dim, v.depth, v.heads, v.mlp_ratio,
                     drop_path, v.decoder, v.decoder_layers, m.dropout, *norm_stats(m))
