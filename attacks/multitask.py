"""Attacks on multitask models (mtl_fpd.md §A3.2): sign steps on the unweighted sum of chosen task losses.

The model's forward returns ``{task: output}``. Targets come as a dict too:
``y = {task: target, ..., "<task>_mask": mask}``; a mask is optional and multiplies that task's
per-element loss (e.g. Taskonomy's depth mask). Task losses, by name (option ``task_losses``):
  ce    per-pixel CE with ``ignore_index``, mean over non-ignored pixels (long targets; the default)
  l1    |out - target| * mask, mean over all elements (float targets; the default)
  mse   (out - target)^2 * mask, mean over all elements
These are the training losses of MTRobust; the batch-level means keep their relative scales.
``tasks`` selects the attacked subset (default: every task that has a target); the evaluator then
scores the result on all tasks, attacked or not.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from utils.errors import SetupError

from .base import ImageSeeds, PassCounter
from .pgd import sign_steps
from .registry import register_attack

MASK_SUFFIX = "_mask"
TASK_LOSSES = ("ce", "l1", "mse")


def task_loss(name: str, out: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
              ignore_index: int = 255) -> torch.Tensor:
    """Scalar loss of one task (see the module docstring)."""
    if name == "ce":
        valid = (target != ignore_index).sum().clamp_min(1)
        per_pixel = F.cross_entropy(out, target, ignore_index=ignore_index, reduction="none")
        if mask is not None:
            per_pixel = per_pixel * mask
        return per_pixel.sum() / valid
    if name in ("l1", "mse"):
        diff = (out - target).abs() if name == "l1" else (out - target) ** 2
        if mask is not None:
            diff = diff * mask
        return diff.mean()
    raise SetupError(f"unknown task loss '{name}'; valid: {', '.join(TASK_LOSSES)}")


def multitask_loss(outputs: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor], tasks: Sequence[str],
                   task_losses: Optional[Dict[str, str]] = None, ignore_index: int = 255) -> torch.Tensor:
    """Unweighted sum over `tasks` of each task's loss."""
    total = 0.0
    for t in tasks:
        if t not in outputs or t not in y:
            raise SetupError(f"multitask attack: task '{t}' missing from the model outputs or targets; "
                             f"outputs: {', '.join(sorted(outputs))}")
        name = (task_losses or {}).get(t) or ("ce" if not y[t].is_floating_point() else "l1")
        total = total + task_loss(name, outputs[t], y[t], y.get(t + MASK_SUFFIX), ignore_index)
    return total


@register_attack("multitask")
def multitask(forward: Callable, x: torch.Tensor, y: Dict[str, torch.Tensor], *, eps: float, alpha: float,
              steps: int, tasks: Optional[Sequence[str]] = None, task_losses: Optional[Dict[str, str]] = None,
              random_start: bool = True, decay: Optional[float] = None, normalize_grad: bool = True,
              ignore_index: int = 255, counter: Optional[PassCounter] = None,
              rng: Optional[ImageSeeds] = None) -> torch.Tensor:
    """L-inf PGD (MIM with ``decay``; MTRobust: 0.5 and ``normalize_grad=False``) on a multitask loss."""
    if not isinstance(y, dict):
        raise SetupError("multitask attack: targets must be a dict {task: target}")
    tasks = list(tasks) if tasks else [k for k in y if not k.endswith(MASK_SUFFIX)]
    for t, name in (task_losses or {}).items():
        if name not in TASK_LOSSES:
            raise SetupError(f"multitask attack: unknown task loss '{name}' for '{t}'; valid: {', '.join(TASK_LOSSES)}")
    return sign_steps(forward, x, lambda out, t: multitask_loss(out, y, tasks, task_losses, ignore_index),
                      eps=eps, alpha=alpha, steps=steps, random_start=random_start, decay=decay,
                      normalize_grad=normalize_grad, counter=counter, rng=rng)


multitask.multitask = True  # forward returns {task: output} and y is {task: target} (see Attack.multitask)
