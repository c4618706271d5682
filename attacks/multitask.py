"""Per-task losses of multitask models (MTRobust, mtl_fpd.md §A2.1-2.2) and the attack on them (§A3.2).

These are THE per-task losses: training (``defenses/``: every method on multitask data, ``mtl``
included) and the ``multitask`` attack both compute them here, so an attack on a task ascends the
loss that task was trained with.

A task's loss is a :class:`TaskLoss` (or its name). Kinds:
  ce        per-pixel CE with ``ignore_index``, mean over the labelled pixels (Cityscapes:
            nn.CrossEntropyLoss(ignore_index=255))
  prior_ce  per-pixel CE times the class weight of the label (Taskonomy's semseg_prior_factor.npy;
            1 when there are none), mean over ALL pixels, labelled or not, as Taskonomy does
  l1        |out - target| * mask, mean over all elements (masked pixels count in the divisor, as
            in the original; the masks of our datasets are real: Cityscapes' invalid disparity,
            Taskonomy's depth mask)
  mse       (out - target)^2 * mask, mean over all elements
For l1 / mse, ``scale`` divides out - target per channel: the loss is computed in the units the
original regressed, so the published task weights (lambda) keep their meaning whatever units
our datasets use (``published_task_losses``): the reconstruction target here is the [0,1] image
while the original regressed the model input (mean/std-normalised image on Cityscapes, [-1,1] on
Taskonomy): scale = model std; Cityscapes disparity is in pixels here, raw/1000 = 0.256 px in the
original: scale = 1000/256.

Multitask targets come as a dict ``y = {task: target, ..., "<task>_mask": mask}`` (``task_targets``
builds it from a batch's ``targets`` / ``masks``); a mask is optional and multiplies that task's
per-element loss. The ``multitask`` attack ascends the unweighted sum of the losses of ``tasks``
(default: every task that has a target), each the mean over images of the image's own loss, so the
attack on an image does not depend on the images it is batched with; the evaluator then scores the
result on all tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from utils.errors import SetupError

from .base import ImageSeeds, PassCounter
from .pgd import sign_steps
from .registry import register_attack, unless_random_start

MASK_SUFFIX = "_mask"
TASK_LOSSES = ("ce", "prior_ce", "l1", "mse")
SEG_TASK = "segmentsemantic"
AUTOENCODER = "autoencoder"
# the original's Cityscapes disparity target is raw/1000 with raw = 256 * d_px + 1 (mtl_fpd.md §A2.1)
CITYSCAPES_DISPARITY_SCALE = 1000.0 / 256.0


@dataclass(frozen=True)
class TaskLoss:
    """The loss of one task: ``kind`` (TASK_LOSSES), ``class_weights`` (prior_ce: one per class) and
    ``scale`` (l1 / mse: divisor of out - target, one value or one per channel)."""
    kind: str
    class_weights: Optional[Tuple[float, ...]] = None
    scale: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        if self.kind not in TASK_LOSSES:
            raise SetupError(f"unknown task loss '{self.kind}'; valid: {', '.join(TASK_LOSSES)}")

    def __repr__(self) -> str:
        extra = [f"{len(self.class_weights)} class weights"] if self.class_weights is not None and \
            self.kind == "prior_ce" else []
        if self.scale is not None and self.kind in ("l1", "mse"):
            extra.append("scale " + "/".join(f"{s:.4g}" for s in self.scale))
        return self.kind + (f" ({', '.join(extra)})" if extra else "")


LossSpec = Union[str, TaskLoss]


def as_task_loss(spec: LossSpec) -> TaskLoss:
    return spec if isinstance(spec, TaskLoss) else TaskLoss(str(spec))


def task_loss(spec: LossSpec, out: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
              ignore_index: int = 255, per_image: bool = False) -> torch.Tensor:
    """Scalar loss of one task (see the module docstring); computed in float32 under autocast too.

    ``per_image``: ce is each image's mean over its own labelled pixels, averaged over the images
    (the other kinds already are: equal element counts per image), instead of the batch's pooled mean.
    """
    spec = as_task_loss(spec)
    out = out.float()
    if spec.kind in ("ce", "prior_ce"):
        per_pixel = F.cross_entropy(out, target, ignore_index=ignore_index, reduction="none")  # 0 where ignored
        if mask is not None:
            per_pixel = per_pixel * mask.reshape(per_pixel.shape).to(per_pixel.dtype)
        if spec.kind == "ce" and per_image:
            n = (target != ignore_index).flatten(1).sum(1).clamp_min(1)
            return (per_pixel.flatten(1).sum(1) / n).mean()
        if spec.kind == "ce":
            return per_pixel.sum() / (target != ignore_index).sum().clamp_min(1)
        if spec.class_weights is not None:
            w = torch.as_tensor(spec.class_weights, dtype=per_pixel.dtype, device=per_pixel.device)
            per_pixel = per_pixel * w[torch.where(target != ignore_index, target, torch.zeros_like(target))]
        return per_pixel.mean()
    diff = out - target.to(out.dtype)
    if spec.scale is not None:
        diff = diff / torch.as_tensor(spec.scale, dtype=diff.dtype, device=diff.device).view(1, -1, 1, 1)
    err = diff.abs() if spec.kind == "l1" else diff * diff
    if mask is not None:
        err = err * mask.to(err.dtype)
    return err.mean()


def default_task_loss(target: torch.Tensor) -> TaskLoss:
    """A task without a configured loss: CE for label maps, L1 for dense targets."""
    return TaskLoss("ce" if not target.is_floating_point() else "l1")


def published_task_losses(dataset: str, tasks: Sequence[str], seg_class_weights=None,
                          input_std: Optional[Sequence[float]] = None) -> Dict[str, TaskLoss]:
    """MTRobust's loss of each task on `dataset` (mtl_fpd.md §A2.1-2.2), in the original's units.

    taskonomy: segmentation prior_ce with `seg_class_weights` (semseg_prior_factor.npy), every other
    task l1 (the reconstruction in model-input units: scale `input_std`). cityscapes (and the
    synthetic dataset, which has the same tasks): segmentation ce, disparity l1 (in the original's
    raw/1000 units on cityscapes), reconstruction mse in model-input units.
    """
    std = tuple(float(s) for s in input_std) if input_std is not None else None
    weights = None if seg_class_weights is None else tuple(float(w) for w in torch.as_tensor(seg_class_weights).tolist())
    out: Dict[str, TaskLoss] = {}
    for t in tasks:
        if dataset == "taskonomy":
            out[t] = (TaskLoss("prior_ce", class_weights=weights) if t == SEG_TASK
                      else TaskLoss("l1", scale=std if t == AUTOENCODER else None))
        elif t == SEG_TASK:
            out[t] = TaskLoss("ce")
        elif t == AUTOENCODER:
            out[t] = TaskLoss("mse", scale=std)
        elif t == "depth_zbuffer" and dataset == "cityscapes":
            out[t] = TaskLoss("l1", scale=(CITYSCAPES_DISPARITY_SCALE,))
        else:
            out[t] = TaskLoss("l1")
    return out


def merge_task_losses(base: Mapping[str, TaskLoss], given: Optional[Mapping[str, LossSpec]]) -> Dict[str, TaskLoss]:
    """`base` with the losses `given` by name (e.g. a test attack's ``task_losses: {depth_zbuffer: mse}``):
    a name changes the kind and keeps the task's class weights and scale."""
    out = dict(base)
    for t, spec in (given or {}).items():
        if isinstance(spec, TaskLoss):
            out[t] = spec
        elif t in out:
            out[t] = replace(out[t], kind=str(spec))
        else:
            out[t] = as_task_loss(spec)
    return out


def task_targets(targets: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 tasks: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """``y`` of the loss functions from a batch's ``targets`` and ``masks`` (of `tasks`, default all):
    dense targets get their ``<task>_mask``; segmentation is masked by its ignore label."""
    y: Dict[str, torch.Tensor] = {}
    for t in (tasks if tasks is not None else list(targets)):
        y[t] = targets[t]
        if targets[t].is_floating_point() and t in masks:
            y[t + MASK_SUFFIX] = masks[t]
    return y


def per_task_losses(outputs: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], tasks: Sequence[str],
                    task_losses: Optional[Mapping[str, LossSpec]] = None,
                    ignore_index: int = 255, per_image: bool = False) -> Dict[str, torch.Tensor]:
    """{task: scalar loss} for `tasks` (``task_losses`` by task; CE / L1 for a task not listed);
    ``per_image`` as in ``task_loss``."""
    losses = {}
    for t in tasks:
        if t not in outputs or t not in y:
            raise SetupError(f"multitask loss: task '{t}' missing from the model outputs or targets; "
                             f"outputs: {', '.join(sorted(outputs))}")
        spec = (task_losses or {}).get(t) or default_task_loss(y[t])
        losses[t] = task_loss(spec, outputs[t], y[t], y.get(t + MASK_SUFFIX), ignore_index, per_image)
    return losses


def multitask_loss(outputs: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], tasks: Sequence[str],
                   task_losses: Optional[Mapping[str, LossSpec]] = None, ignore_index: int = 255) -> torch.Tensor:
    """Unweighted sum over `tasks` of each task's loss (the multitask attack's objective, §A3.2), every
    term the mean over images of the image's own loss: image b's gradient is 1/B times that of its
    loss alone. The original's attack took the training CE, pooled over the batch's labelled pixels,
    so the weight of segmentation against the other tasks on an image depended on how many pixels the
    other images of its batch had labelled; fixed here."""
    losses = per_task_losses(outputs, y, tasks, task_losses, ignore_index, per_image=True)
    return torch.stack(list(losses.values())).sum()


def _check_multitask(name: str, options: dict) -> None:
    for t, spec in (options.get("task_losses") or {}).items():
        if not isinstance(spec, TaskLoss) and spec not in TASK_LOSSES:
            raise SetupError(f"attack '{name}': unknown task loss '{spec}' for '{t}'; valid: {', '.join(TASK_LOSSES)}")


@register_attack("multitask", multitask=True, check=_check_multitask,  # forward returns {task: output}
                 starts_at_x=unless_random_start)
def multitask(forward: Callable, x: torch.Tensor, y: Dict[str, torch.Tensor], *, eps: float, steps: int,
              alpha: Optional[float] = None, tasks: Optional[Sequence[str]] = None,
              task_losses: Optional[Dict[str, object]] = None,
              random_start: bool = True, decay: Optional[float] = None, normalize_grad: bool = True,
              ignore_index: int = 255, counter: Optional[PassCounter] = None,
              rng: Optional[ImageSeeds] = None, clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """L-inf PGD (MIM with ``decay``; MTRobust: 0.5 and ``normalize_grad=False``) on a multitask loss;
    ``alpha`` defaults to 2.5 eps / steps (Madry et al.).

    ``task_losses``: {task: name or TaskLoss}; the evaluator and the training methods pass each task's
    training loss (``published_task_losses``), names given in a config change the kind only.
    """
    if not isinstance(y, dict):
        raise SetupError("multitask attack: targets must be a dict {task: target}")
    tasks = list(tasks) if tasks else [k for k in y if not k.endswith(MASK_SUFFIX)]
    _check_multitask("multitask", {"task_losses": task_losses})
    return sign_steps(forward, x, lambda out, t: multitask_loss(out, y, tasks, task_losses, ignore_index),
                      eps=eps, alpha=alpha, steps=steps, random_start=random_start, decay=decay,
                      normalize_grad=normalize_grad, counter=counter, rng=rng, clean_forward=clean_forward)

