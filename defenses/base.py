"""A training method turns a batch into a loss: ``defense.loss(model, batch) -> (loss, logs)``.

The engine does backward and the optimiser step; a defense never touches the loader or optimiser.
`logs` holds detached scalar tensors (reduced and printed by the engine, no `.item()` here).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Defense:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ignore = cfg.data.ignore_label
        self.aux_weight = cfg.train.aux_weight

    def seg_loss(self, outputs: Dict[str, torch.Tensor], y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """CE(main) + aux_weight * CE(aux) with the ignore label (ddcat.md §1.4)."""
        main = F.cross_entropy(outputs["out"], y, ignore_index=self.ignore)
        logs = {"loss_main": main.detach()}
        loss = main
        if "aux" in outputs and self.aux_weight:
            aux = F.cross_entropy(outputs["aux"], y, ignore_index=self.ignore)
            loss = loss + self.aux_weight * aux
            logs["loss_aux"] = aux.detach()
        return loss, logs

    def multitask_loss(self, outputs: Dict[str, torch.Tensor], batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Mean over tasks (MTRobust's `--equally` weighting, mtl_fpd.md §A2.3) of the per-task losses:
        segmentation CE with the ignore label; dense tasks L1 averaged over the valid pixels.

        The reference averages L1*mask over *all* pixels, so invalid pixels dilute the loss; the
        masked mean used here weights every valid pixel the same whatever the mask covers.
        """
        losses, logs = [], {}
        for task, target in batch["targets"].items():
            out = outputs[task]
            if target.dtype == torch.long:
                loss = F.cross_entropy(out, target, ignore_index=self.ignore)
            else:
                mask = batch["masks"][task].to(out.dtype)
                loss = ((out - target).abs() * mask).sum() / (mask.sum() * out.shape[1]).clamp_min(1)
            losses.append(loss)
            logs[f"loss_{task}"] = loss.detach()
        return torch.stack(losses).mean(), logs

    def task_loss(self, outputs, batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Single-task segmentation loss, or the multitask one when the batch has ``targets``."""
        if "targets" in batch:
            return self.multitask_loss(outputs, batch)
        return self.seg_loss(outputs, batch["label"])

    def loss(self, model: nn.Module, batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError
