"""Projected Adam (Halmosi et al., ECCV 2024; field.md §1.5): PAdam-CE and PAdam-Cos.

The perturbation delta starts uniform in [-eps, eps] (then clipped so that x + delta is in the box) and
is optimised by ``torch.optim.Adam(lr, amsgrad=True, maximize=True)``; after every step it is clipped
to the eps ball and the box. The objective is a per-pixel loss from ``attacks.losses`` (``ce`` or
``cos`` = 1 - cos(logits, onehot(y)) on the raw logits), averaged per image and summed over the batch.
The last iterate is returned, as in the published code.

Differences from the published code (rse/attacks.py), both so that an image's result does not depend
on the other images of its batch: the objective is the per-image mean over its H*W pixels summed over
the batch, where theirs is the mean over the whole batch (Adam is invariant to that scale except for
its eps of 1e-8, so the batch size changed their steps slightly); ignored pixels add exactly 0 (their
CE used torch's default ignore index -100, so labels of 255 had to be remapped before the call).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import ImageSeeds, PassCounter, counted, input_grad, uniform_noise
from .losses import get_loss, image_loss, pixel_loss
from .registry import register_attack

DEFAULT_LR = 2.0 / 255  # Halmosi et al.'s step size (lr), in [0,1] units


@register_attack("padam")
def padam(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 200,
          alpha: Optional[float] = None, loss: str = "ce", ignore_index: int = 255,
          counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None) -> torch.Tensor:
    """PAdam: Adam (amsgrad, maximising) on delta, clipped to the eps ball and the box after each step.

    ``alpha`` is Adam's lr (None: 2/255, as published); ``loss`` ``ce`` (PAdam-CE) or ``cos`` (PAdam-Cos).
    Published settings: 200 steps. Cost: `steps` forwards and backwards per image.
    """
    lr = DEFAULT_LR if alpha is None else alpha
    get_loss(loss)  # an unknown name fails before the first forward
    fwd = counted(forward, counter)
    x = x.detach()
    delta = (x + uniform_noise(x, eps, rng)).clamp(0, 1) - x
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr, amsgrad=True, maximize=True)
    for t in range(steps):
        per_pixel = pixel_loss(loss, fwd(x + delta), y, ignore_index, step=t, steps=steps)
        delta.grad = input_grad(image_loss(per_pixel).sum(), delta, counter)
        opt.step()
        with torch.no_grad():
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()
