"""The weighted multitask loss of MTRobust (mtl_fpd.md §A2.3), used by every method on multitask data.

L = sum_{t in M} L_t / |M| + sum_{t in T \\ M} (lambda_t / |T \\ M|) L_t, with T the trained tasks, M
the main tasks and lambda_t = ``train.mtl.task_lambdas[t]`` or ``train.mtl.mt_lambda``; with
``train.mtl.equally`` every task gets 1/|T| (MTRobust's ``--equally``). The per-task losses L_t are the
published ones, defined once in ``attacks/multitask.py`` (the multitask attack ascends the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from attacks.multitask import SEG_TASK, TaskLoss, per_task_losses, published_task_losses, task_targets
from utils.errors import SetupError


def resolve_main(tasks: Sequence[str], main_tasks: Sequence[str]) -> List[str]:
    """The main tasks: ``main_tasks``, or when empty segmentsemantic if trained, else every task."""
    return list(main_tasks) or ([SEG_TASK] if SEG_TASK in tasks else list(tasks))


def task_weights(tasks: Sequence[str], main_tasks: Sequence[str], mt_lambda: float,
                 task_lambdas: Mapping[str, float], equally: bool = False) -> Dict[str, float]:
    """{task: weight}; main tasks [] = segmentsemantic when trained, else every task. SetupError (naming
    the key) for a main task or a lambda of a task that is not trained, or a lambda of a main task."""
    tasks = list(tasks)
    if not tasks:
        raise SetupError("multitask loss: no tasks to train (data.tasks is empty)")
    for t in main_tasks:
        if t not in tasks:
            raise SetupError(f"train.mtl.main_tasks: '{t}' is not a trained task (data.tasks: {tasks})")
    if len(set(main_tasks)) != len(main_tasks):
        raise SetupError(f"train.mtl.main_tasks lists a task twice: {list(main_tasks)}")
    main = resolve_main(tasks, main_tasks)
    for t in task_lambdas:
        if t not in tasks:
            raise SetupError(f"train.mtl.task_lambdas: '{t}' is not a trained task (data.tasks: {tasks})")
        if t in main:
            raise SetupError(f"train.mtl.task_lambdas: '{t}' is a main task (weight 1/|main tasks|); "
                             "lambdas weight auxiliary tasks only")
    if equally:
        if task_lambdas:
            raise SetupError("train.mtl.task_lambdas is set but train.mtl.equally weights every task 1/|tasks|")
        return {t: 1.0 / len(tasks) for t in tasks}
    aux = [t for t in tasks if t not in main]
    return {t: 1.0 / len(main) if t in main else float(task_lambdas.get(t, mt_lambda)) / len(aux) for t in tasks}


@dataclass
class MultitaskObjective:
    """The weighted sum of the per-task losses: ``objective(outputs, targets, masks) -> (loss, {task: L_t})``."""
    tasks: List[str]
    main: List[str]
    weights: Dict[str, float]
    losses: Dict[str, TaskLoss]
    ignore_index: int = 255

    def __call__(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                 masks: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        y = task_targets(targets, masks, self.tasks)
        per_task = per_task_losses(outputs, y, self.tasks, self.losses, self.ignore_index)
        total = torch.stack([self.weights[t] * per_task[t] for t in self.tasks]).sum()
        return total, per_task

    def describe(self) -> str:
        return ", ".join(f"{t} {self.weights[t]:.4g} x {self.losses[t]!r}" for t in self.tasks)


def build_objective(cfg, tasks: Sequence[str], seg_class_weights=None) -> MultitaskObjective:
    """The objective of ``train.mtl`` for `tasks` with the published per-task losses of ``data.name``."""
    settings = cfg.train.mtl
    weights = task_weights(tasks, list(settings.main_tasks), settings.mt_lambda, dict(settings.task_lambdas),
                           settings.equally)
    losses = published_task_losses(cfg.data.name, tasks, seg_class_weights, cfg.model.std)
    return MultitaskObjective(list(tasks), resolve_main(tasks, list(settings.main_tasks)), weights, losses,
                              cfg.data.ignore_label)
