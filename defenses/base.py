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

    def loss(self, model: nn.Module, batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError
