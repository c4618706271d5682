"""A training method turns a batch into a loss: ``defense.loss(model, batch) -> (loss, logs)``.

The engine does backward and the optimiser step; a defense never touches the loader or optimiser.
`logs` holds detached scalar tensors (reduced and printed by the engine, no `.item()` here).
A method that needs more declares it: ``steps(model, batch)`` yields several optimisation steps per
iteration (each taken before the next is computed), and ``param_phases(model)`` names the parameters
each phase of the method updates (the engine builds one optimiser and lr schedule per phase).

Adversarial methods set ``default_attack`` (their paper's training attack, config units: eps and
alpha in 1/255); ``train.attack`` overrides any of its options or names another attack from
``attacks/`` (SegPGD-AT, APGD-AT are a config change). ``adversarial(model, x, y, index)`` runs it
the one way every method must: on the unwrapped module (no DDP all-reduce per attack step), in
eval mode with every parameter frozen (no gradient reaches a parameter, BatchNorm statistics do not
move), gradients w.r.t. the input only, random starts seeded by (seed, epoch, image index); the
model is back in train mode afterwards.

On multitask data (batches with ``targets``) every method's clean loss is the weighted multitask loss
of ``train.mtl`` (main tasks 1/|M|, auxiliary tasks lambda/|aux|; defenses/multitask.py) over the
published per-task losses (attacks/multitask.py); the trainer hands the training set to
``set_dataset`` first, so its tasks and class weights are known (and checked) before any step.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attacks import Attack, attack_mode, build_attack
from utils import dist
from utils.errors import SetupError
from utils.metrics import correct_pixels

from .multitask import MultitaskObjective, build_objective


def pixel_accuracy(logits: torch.Tensor, y: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Fraction of valid pixels whose argmax is the label (detached scalar tensor, no host sync)."""
    valid = y != ignore
    correct = correct_pixels(logits.detach(), y, valid)
    return correct.sum().float() / valid.sum().clamp_min(1).float()


def ce_and_logp(logits: torch.Tensor, y: torch.Tensor, ignore: int = 255) -> Tuple[torch.Tensor, torch.Tensor]:
    """(``F.cross_entropy(logits, y, ignore_index=ignore)``, the log-softmax it was computed from).

    cross_entropy is the NLL of the log-softmax over dim 1, so this is it bit for bit, value and
    gradient, for fp32 logits and under autocast (CPU and CUDA autocast run cross_entropy in fp32, but
    CPU autocast would run a bare log_softmax in bf16: hence the explicit fp32). Methods that also log
    per-part losses read them from the returned log-softmax instead of a second one over every class."""
    logp = F.log_softmax(logits.float(), 1)
    return F.nll_loss(logp, y, ignore_index=ignore), logp


class Defense:
    default_attack: Optional[dict] = None  # adversarial methods: {name, eps, ...} in config units
    find_unused_parameters = False         # a method whose loss leaves parameters unused says so (DDP)

    def __init__(self, cfg):
        self.cfg = cfg
        self.ignore = cfg.data.ignore_label
        self.aux_weight = cfg.train.aux_weight
        self.epoch = 0
        self.attack: Optional[Attack] = self.build_train_attack(cfg) if self.default_attack is not None else None
        self.seg_class_weights = None  # Taskonomy's semseg_prior_factor (set_dataset)
        self.objective: Optional[MultitaskObjective] = None  # the multitask loss (set_dataset or first batch)

    def build_train_attack(self, cfg) -> Attack:
        """The method's default attack with ``train.attack`` merged over it (another ``name`` replaces
        the default's options except eps)."""
        given = dict(cfg.train.attack or {})
        opts = dict(self.default_attack)
        if given.get("name", opts["name"]) != opts["name"]:
            opts = {"name": given["name"], "eps": opts["eps"]}
        opts.update(given)
        name = opts.pop("name")
        opts.pop("label", None)
        if "eps" not in opts:
            raise SetupError("train.attack needs eps (in 1/255)")
        return build_attack(name, seed=cfg.seed, label="train", **opts)

    def set_dataset(self, dataset) -> None:
        """Called once with the training set, before `prepare`: a multitask dataset's tasks (and
        segmentation class weights) give the multitask loss, checked here (one-line SetupError)."""
        self.seg_class_weights = getattr(dataset, "seg_class_weights", None)
        tasks = list(getattr(dataset, "tasks", []))
        self.objective = build_objective(self.cfg, tasks, self.seg_class_weights) if tasks else None

    def prepare(self, model: nn.Module) -> None:
        """Called once with the freshly built model, before any weights are loaded: refuse a model the
        method does not fit (one-line SetupError), or initialise what the method initialises."""

    def set_epoch(self, epoch: int) -> None:
        """The epoch about to run (0-based); it seeds the training attack's random draws and sets its
        eps warm-up factor (`train.attack_warmup_epochs`)."""
        self.epoch = epoch
        if self.attack is not None:
            self.attack.set_scale(self.attack_scale(epoch))

    def attack_scale(self, epoch: int) -> float:
        """The training attack's eps (and alpha) factor in `epoch` (0-based): min(1, (e + 1) / (W + 1))
        for W = train.attack_warmup_epochs, so the first W epochs ramp up linearly and epoch W is at
        full strength; 1 without warm-up. A function of the epoch alone, so a resume gets the same."""
        w = int(self.cfg.train.attack_warmup_epochs or 0)
        return min(1.0, (epoch + 1) / (w + 1))

    def adversarial(self, model: nn.Module, x: torch.Tensor, y, index: torch.Tensor,
                    forward=None, clean_forward=None) -> torch.Tensor:
        """x_adv for the batch (detached). `forward(net, x)` picks what the attack differentiates
        (default: the eval-mode output, i.e. the main logits, or the outputs dict of a multitask model).
        `clean_forward(net, x)`, returning the same: the attack calls it instead for its forward of x
        itself when it starts there (``Attack.starts_at_x``), and never otherwise, so a method reads
        what it needs of the clean batch from the attack's own pass."""
        net = dist.unwrap(model)
        keys: Sequence = [(self.epoch, int(i)) for i in index.tolist()]
        with attack_mode(net):
            fwd = net if forward is None else (lambda inp: forward(net, inp))
            clean = None if clean_forward is None else (lambda inp: clean_forward(net, inp))
            x_adv = self.attack(fwd, x, y, keys, clean_forward=clean)
        return x_adv.detach()

    def describe(self) -> str:
        """One line for the training log: the method and its attack."""
        name = self.cfg.train.method
        text = name if self.attack is None else f"{name}, training attack {self.attack}"
        return text + (f"; multitask loss {self.objective.describe()}" if self.objective is not None else "")

    def seg_loss(self, outputs: Dict[str, torch.Tensor], y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """CE(main) + aux_weight * CE(aux) with the ignore label (ddcat.md §1.4)."""
        loss, logs, _ = self.seg_loss_logp(outputs, y)
        return loss, logs

    def seg_loss_logp(self, outputs: Dict[str, torch.Tensor], y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """`seg_loss` and the main output's log-softmax (see `ce_and_logp`)."""
        main, logp = ce_and_logp(outputs["out"], y, self.ignore)
        logs = {"loss_main": main.detach()}
        loss = main
        if "aux" in outputs and self.aux_weight:
            aux = F.cross_entropy(outputs["aux"], y, ignore_index=self.ignore)
            loss = loss + self.aux_weight * aux
            logs["loss_aux"] = aux.detach()
        return loss, logs, logp

    def multitask_loss(self, outputs: Dict[str, torch.Tensor], batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The weighted multitask loss (``train.mtl``, mtl_fpd.md §A2.3) of the published per-task losses
        (the ones the multitask attack ascends); logs each task's loss as ``loss_<task>``."""
        if self.objective is None or sorted(self.objective.tasks) != sorted(batch["targets"]):
            self.objective = build_objective(self.cfg, list(batch["targets"]), self.seg_class_weights)
        loss, per_task = self.objective(outputs, batch["targets"], batch["masks"])
        return loss, {f"loss_{t}": v.detach() for t, v in per_task.items()}

    def task_loss(self, outputs, batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Single-task segmentation loss, or the multitask one when the batch has ``targets``."""
        if "targets" in batch:
            return self.multitask_loss(outputs, batch)
        return self.seg_loss(outputs, batch["label"])

    def loss(self, model: nn.Module, batch: dict) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def steps(self, model: nn.Module, batch: dict) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[str]]]:
        """The optimisation steps of one iteration as (loss, logs, phase): the engine runs backward,
        `train.clip_grad_norm` and the step of `phase`'s optimiser (None: the only one) before it asks
        for the next, so a later step sees the updated weights. Default: one step on `loss`."""
        loss, logs = self.loss(model, batch)
        yield loss, logs, None

    def param_phases(self, model: nn.Module) -> Optional[Dict[str, List[str]]]:
        """{phase: names of the parameters it updates}, each phase with its own optimiser (state,
        lr schedule; all saved in checkpoints), or None: one optimiser for every parameter.
        Called with the bare model (not wrapped for DDP)."""
        return None
