"""Houdini as MTRobust's test scripts define it (mtl_fpd.md §A3.3): the attack ``houdini`` and its
per-pixel loss ``houdini_loss`` (not an APGD loss: its weight and backward are the attack's own).

Per valid pixel the surrogate is (1 - Phi(s_y - s_yhat)) * w, with s the log-softmax scores, yhat the
argmax class, Phi the standard normal CDF and w the image's mIoU in % of the current prediction
(per-class IoU over all C classes, a class absent from prediction and label counting 0, as their
histogram with its +1e-7 does). Its backward is theirs, not autograd's: phi(s_y - s_yhat) * w on the
predicted channel and -phi(.) * w on the true one, written in that order so that at a correct pixel
(yhat = y, where the exact derivative is 0) only the true channel's -phi(0) * w remains; that push is
what moves the correct pixels at all. The attack is MTRobust's: sign steps with momentum
m = 0.5 m + g (raw gradients), from a random start.

Differences from the original Houdini (Cisse et al., NeurIPS 2017): there the probability term is
multiplied by the task loss of the prediction (e.g. 1 - IoU), here by a goodness (mIoU), so an image
at mIoU 0 gets no gradient; and the exact derivative vanishes at correct pixels, this backward does
not. Normalisation: the per-image mean over its H*W pixels where theirs divides the batch sum by the
batch's valid pixels; a positive per-image constant, so the sign steps (with momentum) are the same.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from utils.metrics import confusion_counts

from .base import ImageSeeds, PassCounter
from .losses import image_loss
from .pgd import sign_steps
from .registry import register_attack, unless_random_start

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def image_miou_percent(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-image mIoU in % of argmax(logits) [B], averaged over all C classes (absent classes count 0)."""
    C = logits.shape[1]
    inter, union, _ = confusion_counts(logits.argmax(1), y, C, ignore_index)
    return 100.0 * (inter.to(logits.dtype) / (union.to(logits.dtype) + 1e-7)).mean(1)


class HoudiniSurrogate(torch.autograd.Function):
    """(1 - Phi(s_y - max_k s_k)) * weight per pixel, with MTRobust's backward (module docstring)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, yv: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        top, top_idx = scores.max(1)
        margin = scores.gather(1, yv.unsqueeze(1)).squeeze(1) - top
        ctx.save_for_backward(margin, top_idx, yv, weight)
        ctx.scores_shape = scores.shape
        return 0.5 * torch.erfc(margin / math.sqrt(2.0)) * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        margin, top_idx, yv, weight = ctx.saved_tensors
        temp = (g * INV_SQRT_2PI * torch.exp(-0.5 * margin * margin) * weight).unsqueeze(1)
        grad = torch.zeros(ctx.scores_shape, dtype=temp.dtype, device=temp.device)
        grad.scatter_(1, top_idx.unsqueeze(1), temp)
        grad.scatter_(1, yv.unsqueeze(1), -temp)   # overwrites the first at correct pixels (as theirs)
        return grad, None, None


def houdini_loss(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """MTRobust's Houdini surrogate per pixel; 0 (value and gradient) at ignored pixels."""
    valid = y != ignore_index
    yv = torch.where(valid, y, torch.zeros_like(y))
    with torch.no_grad():
        w = image_miou_percent(logits.detach(), y, ignore_index)
    weight = valid.to(logits.dtype) * w.view(-1, 1, 1)
    return HoudiniSurrogate.apply(F.log_softmax(logits, 1), yv, weight)


@register_attack("houdini", starts_at_x=unless_random_start)
def houdini(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
            alpha: Optional[float] = None, decay: Optional[float] = 0.5, random_start: bool = True,
            ignore_index: int = 255, counter: Optional[PassCounter] = None,
            rng: Optional[ImageSeeds] = None, clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """MTRobust's Houdini attack: sign steps on the Houdini surrogate with momentum m = decay*m + g
    (raw gradients; ``decay: null`` for plain sign steps); alpha default 2.5 eps / steps."""
    def objective(logits: torch.Tensor, t: int) -> torch.Tensor:
        return image_loss(houdini_loss(logits, y, ignore_index)).sum()
    return sign_steps(forward, x, objective, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                      decay=decay, normalize_grad=False, counter=counter, rng=rng, clean_forward=clean_forward)
