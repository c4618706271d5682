"""Multitask training of MTRobust (`train.method: mtl`, mtl_fpd.md §A2-A3.5), optionally adversarial.

The loss is the weighted multitask loss (defenses/multitask.py: main tasks 1/|M|, auxiliary tasks
lambda/|aux|, ``train.mtl.main_tasks`` / ``mt_lambda`` / ``task_lambdas`` / ``equally``) of the published
per-task losses (attacks/multitask.py: the ones the multitask attack ascends).

With ``train.mtl.adversarial`` every batch is attacked first (§A3.5; the adversarial multitask training
code was never released, this follows the single-task loop that was): PGD on the unweighted sum of
the losses of ``train.mtl.attack_tasks`` (default: the main tasks, i.e. the single-task threat model),
through the shared adversarial step (eval mode, frozen parameters, input gradients only, seeded
random start), then the full weighted loss on the adversarial images, every target (the
reconstruction target included) staying the clean one. ``mix_clean`` m mixes in the clean images:
loss = (1 - m) L(x_adv) + m L(x), both halves in one forward (m = 0, the default: adversarial only,
as the single-task loop).

Defects of the original fixed here: the attack's random start is uniform in the eps-ball (the
original's clamp with swapped bounds started every pixel at the ball's upper corner, §A3.1); the
attack runs in eval mode and gives train mode back (the original left the model in eval mode or
let the attack update BatchNorm statistics); eps and alpha are in [0,1] pixel units on every dataset
(the released Cityscapes attack used 2*eps/255 in normalised units).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from attacks import build_attack
from attacks.multitask import SEG_TASK, task_targets
from utils.errors import SetupError

from .base import Defense, pixel_accuracy
from .multitask import build_objective
from .registry import register_defense

# MTRobust's training attack (mtl_fpd.md §A3.5, §A4): eps 8/255, step 2/255, 5 steps (the drn_d_22
# Cityscapes config uses 1), one attack per batch, on the multitask loss of the attacked tasks
MTL_ATTACK = {"name": "multitask", "eps": 8.0, "alpha": 2.0, "steps": 5, "random_start": True}


@register_defense("mtl")
class MultitaskTraining(Defense):
    def __init__(self, cfg):
        settings = cfg.train.mtl
        self.adversarial_training = bool(settings.adversarial)
        self.default_attack = dict(MTL_ATTACK) if self.adversarial_training else None
        given = dict(cfg.train.attack or {})
        if self.adversarial_training and ("tasks" in given or "task_losses" in given):
            key = "tasks" if "tasks" in given else "task_losses"
            raise SetupError(f"train.attack.{key}: the mtl training attack ascends the training losses of "
                             "train.mtl.attack_tasks; set those instead")
        super().__init__(cfg)
        self.mix_clean = float(settings.mix_clean)
        self.attack_tasks: List[str] = []
        if not cfg.data.tasks:
            raise SetupError("train.method mtl: data.tasks is empty; list the trained tasks "
                             "(e.g. data.tasks=[segmentsemantic,depth_zbuffer] and the same model.tasks)")

    def prepare(self, model) -> None:
        """Refuse a single-output model; set up (and check) the weighted loss and the training attack."""
        if not getattr(model, "multitask", False):
            raise SetupError(f"train.method mtl needs a multitask model (model.name drn_multitask or "
                             f"taskonomy_resnet); '{self.cfg.model.name}' has a single segmentation output")
        tasks = self.objective.tasks if self.objective is not None else list(model.tasks)
        self.objective = build_objective(self.cfg, tasks, self.seg_class_weights)
        if self.attack is None:
            return
        self.attack_tasks = list(self.cfg.train.mtl.attack_tasks) or list(self.objective.main)
        bad = [t for t in self.attack_tasks if t not in tasks]
        if bad:
            raise SetupError(f"train.mtl.attack_tasks: {bad} not among the trained tasks {tasks}")
        if self.attack.multitask:  # the attack ascends exactly the training losses of the attacked tasks
            losses = {t: self.objective.losses[t] for t in self.attack_tasks}
            self.attack = build_attack(self.attack.name, seed=self.cfg.seed, label="train",
                                       **dict(self.attack.options, tasks=self.attack_tasks, task_losses=losses))
        elif self.attack_tasks != [SEG_TASK]:
            raise SetupError(f"train.mtl.attack_tasks={self.attack_tasks}: the training attack "
                             f"'{self.attack.name}' attacks the segmentation output only; use "
                             "train.attack={name: multitask, ...} to attack other tasks")

    def adversarial_batch(self, model, batch: dict) -> torch.Tensor:
        """x_adv of the batch (the shared adversarial step on the attacked tasks' training losses)."""
        targets, masks = batch["targets"], batch["masks"]
        if self.attack.multitask:
            return self.adversarial(model, batch["image"], task_targets(targets, masks, self.attack_tasks),
                                    batch["index"])
        return self.adversarial(model, batch["image"], targets[SEG_TASK], batch["index"],
                                forward=lambda net, x: net(x)[SEG_TASK])

    def terms(self, outputs: Dict[str, torch.Tensor], batch: dict, tag: str) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The weighted loss of `outputs` against the batch's (clean) targets; logs loss_<tag>,
        loss_<tag>_<task> and acc_<tag> (segmentation pixel accuracy)."""
        loss, per_task = self.objective(outputs, batch["targets"], batch["masks"])
        logs = {f"loss_{tag}": loss.detach(), **{f"loss_{tag}_{t}": v.detach() for t, v in per_task.items()}}
        if SEG_TASK in per_task:
            logs[f"acc_{tag}"] = pixel_accuracy(outputs[SEG_TASK], batch["targets"][SEG_TASK], self.ignore)
        return loss, logs

    def loss(self, model, batch):
        if self.objective is None or sorted(self.objective.tasks) != sorted(batch["targets"]):
            raise SetupError(f"train.method mtl: the batch's tasks {list(batch['targets'])} are not the trained "
                             f"tasks {self.objective.tasks if self.objective else []} (prepare(model) first)")
        if self.attack is None:
            return self.terms(model(batch["image"]), batch, "clean")
        x, x_adv = batch["image"], self.adversarial_batch(model, batch)
        if self.mix_clean == 0:
            return self.terms(model(x_adv), batch, "adv")
        n = x.shape[0]
        out = model(torch.cat([x_adv, x]))  # one forward: BatchNorm sees both halves, as one batch
        adv, logs = self.terms({t: o[:n] for t, o in out.items()}, batch, "adv")
        clean, clean_logs = self.terms({t: o[n:] for t, o in out.items()}, batch, "clean")
        return (1 - self.mix_clean) * adv + self.mix_clean * clean, {**logs, **clean_logs}

    def describe(self) -> str:
        text = f"mtl, tasks (weight x loss): {self.objective.describe() if self.objective else '?'}"
        if self.attack is None:
            return text + "; clean (train.mtl.adversarial false)"
        share = f"{100 * (1 - self.mix_clean):g}% adversarial (mix_clean {self.mix_clean:g})"
        return text + f"; training attack {self.attack} on {self.attack_tasks}; {share}"
