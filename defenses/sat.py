"""SAT, standard adversarial training as in DDC-AT (`train.method: sat`, ddcat.md §2).

Every global batch is split: its first images stay clean, the last ``train.sat.adv_fraction``
of them are replaced by their adversarial versions (BIM on the main logits, eps 0.03 = 7.65/255,
3 steps of eps/3, no random start, model in eval mode), and one train-mode forward of the mixed
batch is trained with CE(main) + aux_weight * CE(aux), as published (0.5: the last B//2 images).
Which images are attacked depends on their position in the global batch only, not on the number of
processes (`process_clean_count`); a process may hold only clean or only adversarial images.

Fixed from the published scripts:
- only the images that are used are attacked: the original attacked the whole batch and threw the
  clean half's adversarial images away (ddcat.md §9 item 16);
- no extra forward of the adversarial batch for the training metrics (§9 item 14): clean and
  adversarial loss and accuracy are read from the training forward itself, each logged on its own
  (the original logged the eval-mode accuracy on adversarial images as "train mIoU", §9 item 17);
- the attack runs on the unwrapped model with input gradients only (`Defense.adversarial`), not
  through DDP with parameter gradients zeroed afterwards (§9 item 15).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils import dist
from utils.errors import SetupError

from .base import Defense, pixel_accuracy
from .registry import register_defense

# the published training attack (ddcat.md §2): BIM, eps 0.03, 3 steps of 0.01, no random start
DDCAT_BIM = {"name": "pgd", "eps": 7.65, "alpha": 2.55, "steps": 3, "random_start": False}


def clean_count(batch: int, adv_fraction: float) -> int:
    """Clean images at the front of a batch of `batch`: floor(batch * (1 - adv_fraction)), which is
    the published batch_size // 2 at 0.5 (ddcat.md §2, §3.2 step 6)."""
    return int(math.floor(batch * (1.0 - adv_fraction) + 1e-9))


def process_clean_count(batch: int, adv_fraction: float, rank: Optional[int] = None,
                        world: Optional[int] = None) -> int:
    """Clean images at the front of this process's batch of `batch` when the split is by the global
    batch of ``batch * world`` images: the first ``clean_count(global, adv_fraction)`` positions of
    the global batch stay clean. The sampler deals the global batch out round robin (a
    DistributedSampler: position q goes to process q mod world), so this process holds positions
    rank, rank + world, ...; those below the clean count are a prefix of its batch."""
    world = dist.world_size() if world is None else world
    rank = dist.rank() if rank is None else rank
    n_global = clean_count(batch * world, adv_fraction)
    return min(batch, max(0, -(-(n_global - rank) // world)))


def masked_ce(logp: torch.Tensor, y: torch.Tensor, ignore: int) -> torch.Tensor:
    """Mean CE over the valid pixels from a log-softmax, 0 when there are none (for logs: never
    NaN); detached."""
    with torch.no_grad():
        per_pixel = F.nll_loss(logp.float(), y, ignore_index=ignore, reduction="none")
        return per_pixel.sum() / (y != ignore).sum().clamp_min(1).float()


def part_logs(logits: torch.Tensor, y: torch.Tensor, n_clean: int, ignore: int,
              logp: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """loss_clean / acc_clean over the first n_clean rows, loss_adv / acc_adv over the others (the
    keys of a part that is empty are left out; the split is the same on every process). `logp`:
    the logits' log-softmax where the training loss already computed it, so the logs add no second
    pass over the logits (its cost: docs/performance.md)."""
    logs = {}
    with torch.no_grad():
        if logp is None:
            logp = F.log_softmax(logits.float(), 1)
        for name, rows in (("clean", slice(0, n_clean)), ("adv", slice(n_clean, None))):
            if logits[rows].shape[0]:
                logs[f"loss_{name}"] = masked_ce(logp[rows], y[rows], ignore)
                logs[f"acc_{name}"] = pixel_accuracy(logits[rows], y[rows], ignore)
    return logs


def refuse_multitask(model: nn.Module, method: str) -> None:
    if getattr(model, "multitask", False):
        raise SetupError(f"train.method '{method}' trains single-output segmentation models; model "
                         f"'{type(model).__name__}' is a multitask model")


def describe_split(method: str, attack, adv_fraction: float, batch_size: int) -> str:
    n_adv = batch_size - clean_count(batch_size, adv_fraction)
    return (f"{method}, training attack {attack}, adversarial share {adv_fraction:g}: the last {n_adv} "
            f"of every global batch of {batch_size} images are adversarial (for any number of processes)")


@register_defense("sat")
class SATTraining(Defense):
    default_attack = DDCAT_BIM

    def __init__(self, cfg):
        super().__init__(cfg)
        self.adv_fraction = float(cfg.train.sat.adv_fraction)

    def prepare(self, model: nn.Module) -> None:
        refuse_multitask(model, "sat")
        if hasattr(model, "mask1"):  # its f_a and f_m would never train (and stop DDP)
            raise SetupError(f"train.method 'sat' trains the plain model; model '{type(model).__name__}' has "
                             "DDC-AT heads (use pspnet / deeplabv3, or train.method ddcat)")

    def describe(self) -> str:
        return describe_split("sat", self.attack, self.adv_fraction, self.cfg.train.batch_size)

    def mixed_batch(self, model: nn.Module, batch: dict) -> Tuple[torch.Tensor, int]:
        """(clean images then adversarial images, number of clean ones): only the images replaced
        are attacked."""
        x, y = batch["image"], batch["label"]
        n_clean = process_clean_count(x.shape[0], self.adv_fraction)
        if n_clean == x.shape[0]:
            return x, n_clean
        x_adv = self.adversarial(model, x[n_clean:], y[n_clean:], batch["index"][n_clean:])
        return torch.cat([x[:n_clean], x_adv]), n_clean

    def loss(self, model, batch):
        x, n_clean = self.mixed_batch(model, batch)
        y = batch["label"]
        outputs = model(x)
        loss, logs, logp = self.seg_loss_logp(outputs, y)
        logs.update(part_logs(outputs["out"], y, n_clean, self.ignore, logp))
        return loss, logs
