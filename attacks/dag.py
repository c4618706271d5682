"""Dense Adversary Generation (Xie et al., ICCV 2017) in the eps ball, with Halmosi et al.'s settings.

As adversarial-library's ``dense_adversary.dag`` (the version rse uses): at every iteration the loss
is the sum over the still-correct valid pixels of the logit margin z_y - max_{k != y} z_k (relu: a
fooled pixel adds nothing), its input gradient is divided by its per-image L-inf norm and
r <- r - gamma * g. Halmosi et al. run gamma 0.001 and 0.003 for 200 iterations and clip the result
to the eps ball afterwards.

Fixes for a fixed-budget evaluation (the published attack is a minimum-norm one): the perturbation is
projected to the eps ball and the box after every step, not only clipped once at the end (the clipped
end point of an unconstrained run can have lost most of its flips); the point returned per image is
the iterate with the lowest pixel accuracy (the first one reaching it), where adversarial-library
returns the clean image unless at least 99 % of the pixels are fooled. An image at 0 accuracy has a
zero gradient and no longer moves, so it leaves the batch (checked before every
``EARLY_STOP_EVERY``-th iteration) without changing its result.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from utils.errors import SetupError

from .apgd import EARLY_STOP_EVERY
from .base import PassCounter, counted, input_grad, project
from .registry import always, register_attack


def logit_margin(logits: torch.Tensor, yv: torch.Tensor) -> torch.Tensor:
    """z_y - max_{k != y} z_k per pixel [B,H,W] (> 0: pixel classified as y)."""
    zy = logits.gather(1, yv.unsqueeze(1))
    others = logits.scatter(1, yv.unsqueeze(1), float("-inf"))
    return (zy - others.amax(1, keepdim=True)).squeeze(1)


def _check_dag(name: str, options: dict) -> None:
    gamma = options.get("gamma", 0.001)
    if not gamma > 0:
        raise SetupError(f"attack '{name}': gamma must be > 0, got {gamma}")


@register_attack("dag", check=_check_dag, starts_at_x=always)
def dag(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, gamma: float = 0.001,
        steps: int = 200, ignore_index: int = 255, counter: Optional[PassCounter] = None,
        clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """DAG with step `gamma` (L-inf-normalised gradient) for `steps` iterations, projected to the eps
    ball and the box. Cost: at most `steps` forwards and `steps` - 1 backwards per image."""
    fwd = counted(forward, counter)
    first_fwd = fwd if clean_forward is None else counted(clean_forward, counter)  # the first iterate is x
    x = x.detach()
    B = x.shape[0]
    view = (-1,) + (1,) * (x.dim() - 1)
    valid_all = y != ignore_index
    yv_all = torch.where(valid_all, y, torch.zeros_like(y))
    n_valid_all = valid_all.flatten(1).sum(1).clamp_min(1).to(x.dtype)
    best_x, best_acc = x.clone(), torch.full((B,), float("inf"), dtype=x.dtype, device=x.device)
    rows = torch.arange(B, device=x.device)   # original rows still attacked
    xa, acc = x.clone(), None
    for i in range(steps):
        if acc is not None and i % EARLY_STOP_EVERY == 0:
            keep = acc > 0                      # (one host sync per EARLY_STOP_EVERY iterations)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                rows, xa = rows[keep], xa[keep]
        xi, yv, valid, n_valid = x[rows], yv_all[rows], valid_all[rows], n_valid_all[rows]
        xa.requires_grad_(True)
        margin = logit_margin((first_fwd if i == 0 else fwd)(xa), yv)
        with torch.no_grad():
            acc = ((margin > 0) & valid).flatten(1).sum(1).to(x.dtype) / n_valid
            better = acc < best_acc[rows]
            best_acc[rows] = torch.where(better, acc, best_acc[rows])
            best_x[rows] = torch.where(better.view(view), xa.detach(), best_x[rows])
        if i == steps - 1:
            break
        g = input_grad((margin * valid).relu().sum(), xa, counter)
        with torch.no_grad():
            g = g / g.abs().flatten(1).amax(1).clamp_min(1e-8).view(view)
            xa = project(xa.detach() - gamma * g, xi, eps)
    return best_x
