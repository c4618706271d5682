"""SEA as a plain function on one batch, for users who drive their own loop (sea.md §1-2).

``sea(forward, x, y, eps=8)`` runs every member of the ensemble (APGD with the mask-ce-bal, mask-ce and
JS losses, ``steps`` iterations each with progressive radius reduction and a random start) on the batch
and keeps, per image, the adversarial image of the member with the lowest pixel accuracy: SEA's per-image
worst case (its aAcc). The pooled worst-case mIoU needs the whole split; test.py and
``engine.evaluator.evaluate_model`` compute it from per-image counts.

Random starts are drawn as test.py draws them: seeded by (`seed`, the run's key
``<ensemble>/<member>@<eps>``, the image's key), so with the images' dataset indices as `keys` and the
same class weights a batch gets test.py's draws.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from utils.errors import SetupError
from utils.metrics import label_counts

from .apgd import apgd_run
from .base import Attack
from .ensemble import ensemble_members, needs_class_weights
from .losses import class_weights_from_counts


def batch_class_weights(y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """mask-ce-bal weights ~ 1/N_c from the batch's own labels (classes up to the largest label present)."""
    valid = y[y != ignore_index]
    classes = int(valid.max()) + 1 if valid.numel() else 1
    return class_weights_from_counts(label_counts(y, classes, ignore_index))


def sea(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8.0, steps: int = 300,
        class_weights: Optional[Sequence[float]] = None, seed: int = 0, keys: Optional[Sequence] = None,
        ensemble: str = "sea", ignore_index: int = 255) -> Tuple[torch.Tensor, Dict[str, object]]:
    """(x_adv, stats) for the batch: per image the worst member's adversarial image (module docstring).

    `forward`: a model (or function) mapping [0,1] images [B,3,H,W] to logits [B,C,H,W]; run it in eval
    mode with frozen parameters (``attacks.attack_mode``). `eps` in 1/255. `class_weights` of mask-ce-bal:
    default 1/N_c of this batch's labels (test.py uses SEA's published vectors or the training split's).
    `keys`: one key per image (default 0..B-1). `ensemble`: "sea" or "sea+".
    stats: ``accuracy`` [B] (the worst case's pixel accuracy per image), ``member`` (its name per image),
    ``member_accuracy`` {member: [B]}, ``forward_passes`` and ``backward_passes`` (totals over the batch).
    """
    keys = list(range(x.shape[0])) if keys is None else list(keys)
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} keys for a batch of {x.shape[0]} images")
    best_x, best_acc, choice = x.detach().clone(), None, torch.zeros(x.shape[0], dtype=torch.long)
    per_member: Dict[str, torch.Tensor] = {}
    passes = [0, 0]
    members = ensemble_members(ensemble)
    for j, (label, name, opts) in enumerate(members):
        if name != "apgd":
            raise SetupError(f"sea(): member '{label}' of '{ensemble}' is not an APGD attack")
        opts = dict(opts, steps=steps, ignore_index=ignore_index)
        if needs_class_weights(opts):
            opts["class_weights"] = (batch_class_weights(y, ignore_index) if class_weights is None
                                     else torch.as_tensor(class_weights, dtype=torch.float32))
        # apgd_run: the registered apgd that also returns each image's accuracy at its result
        attack = Attack(name, apgd_run, seed=seed, label=f"{ensemble}/{label}@{float(eps):g}", eps=eps, **opts)
        x_adv, acc = attack(forward, x, y, keys)
        acc = acc.detach().cpu()
        per_member[label] = acc
        passes[0] += attack.counter.forward
        passes[1] += attack.counter.backward
        worse = torch.ones_like(acc, dtype=torch.bool) if best_acc is None else acc < best_acc  # ties: earlier member
        best_acc = acc if best_acc is None else torch.where(worse, acc, best_acc)
        choice = torch.where(worse, torch.full_like(choice, j), choice)
        best_x = torch.where(worse.to(x.device)[:, None, None, None], x_adv.detach(), best_x)
    return best_x, {"accuracy": best_acc, "member": [members[int(c)][0] for c in choice],
                    "member_accuracy": per_member, "forward_passes": passes[0], "backward_passes": passes[1]}
