"""Base class of every segmentation model: normalisation inside, logits at input resolution.

Contract: ``model(x)`` takes RGB in [0,1], shape [B,3,H,W]. In eval mode it returns the deployable
logits [B,C,H,W] only; in training mode it returns a dict of named outputs ({"out": main logits,
"aux": auxiliary logits, ...}) so training methods can weight them. ``model.outputs(x)`` returns
that dict in either mode (e.g. for DDC-AT routing at eval time).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=True (the semseg convention)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class Segmentor(nn.Module):
    """Holds the input normalisation; subclasses implement ``forward_features(x_norm, size) -> dict``."""

    main_output = "out"
    multitask = False  # True: every mode returns {task: output} (DRN multitask, Taskonomy ResNet)

    def __init__(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("model.mean and model.std must both be set or both be null")
        self.normalized = mean is not None
        if self.normalized:
            # non-persistent: published checkpoints carry no such buffers
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.normalized else x

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def outputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All named outputs, upsampled to the input size, whatever the mode."""
        return self.forward_features(self.normalize(x), x.shape[-2:])

    def forward(self, x: torch.Tensor):
        out = self.outputs(x)
        return out if self.training else out[self.main_output]

    def aux_heads(self) -> Dict[str, nn.Module]:
        """The auxiliary heads by attribute name: modules that only the "aux" output (the auxiliary
        loss, ``train.aux_weight``) trains; the trainer freezes them when that weight is 0. None here."""
        return {}

    def param_groups(self, head_lr_mult: float) -> List[dict]:
        """Backbone at the base lr, everything else (new modules) at `head_lr_mult` x (ddcat.md §1.6)."""
        backbone = [p for n, p in self.named_parameters() if n.startswith("backbone.")]
        heads = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"params": backbone, "lr_mult": 1.0}, {"params": heads, "lr_mult": head_lr_mult}]
