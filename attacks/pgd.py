"""FGSM and BIM/PGD under L-inf (ddcat.md §2, §5): sign steps on the per-pixel CE, ignore label masked."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import PassCounter, counted, input_grad, pixel_ce, project
from .registry import register_attack


@register_attack("pgd")
def pgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        random_start: bool = True, ignore_index: int = 255,
        counter: Optional[PassCounter] = None) -> torch.Tensor:
    """L-inf PGD maximising the mean CE over valid pixels; BIM when ``random_start=False``.

    The DDC-AT test attack is BIM with eps 0.03, alpha 0.01, 2 steps (config units 7.65, 2.55).
    """
    fwd = counted(forward, counter)
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = project(x_adv + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    valid = (y != ignore_index).sum().clamp_min(1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = pixel_ce(fwd(x_adv), y, ignore_index).sum() / valid
        g = input_grad(loss, x_adv, counter)
        x_adv = project(x_adv.detach() + alpha * g.sign(), x, eps)
    return x_adv.detach()


@register_attack("fgsm")
def fgsm(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, ignore_index: int = 255,
         counter: Optional[PassCounter] = None) -> torch.Tensor:
    """One signed-gradient step of size eps."""
    return pgd(forward, x, y, eps=eps, alpha=eps, steps=1, random_start=False, ignore_index=ignore_index,
               counter=counter)
