"""The one training loop: defense loss -> backward -> step -> poly lr; logs, validation, checkpoints."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from datasets import build_dataset
from defenses import build_defense
from models import build_model, load_pretrained
from models.weights import load_model_weights
from utils import dist
from utils.checkpoint import (check_fresh_run, check_init_file, first_sentence, list_checkpoints, recover_model_dir,
                              remove_stale_temporaries, replace_model_dir, save_checkpoint, shared_resume)
from utils.config import save_config
from utils.env import env_record
from utils.errors import SetupError
from utils.logger import get_logger
from utils.metrics import summarize
from utils.rng import get_rng_state, seed_all, seed_layers, set_rng_state

from .common import amp_dtype, channels_last, group_collate, make_loader, per_process_batch, setup_runtime, to_device, train_sampler
from .evaluator import evaluate, regression_tasks
from .results import task_metrics

KEEP_ITER_CHECKPOINTS = 2
# what load_state_dict / set_rng_state raise on a state of another shape or kind
STATE_ERRORS = (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError)


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def decayed_parameters(model: nn.Module) -> set:
    """ids of the parameters that get weight decay under `train.weight_decay_on: matrices` (PIR-AT's
    `get_optimizer`, sea.md §4.1): ndim >= 2 and not in a norm layer, i.e. conv and linear weights.
    Biases, BatchNorm / LayerNorm affine parameters and ConvNeXt layer-scale gammas get none. (PIR-AT
    tests "norm" in the parameter's name; the layer type says the same without relying on names.)"""
    norms = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    return {id(p) for p in model.parameters() if p.ndim >= 2 and id(p) not in norms}


def build_optimizer(cfg, model: nn.Module, only: Optional[Set[int]] = None) -> torch.optim.Optimizer:
    """SGD (semseg) or AdamW (PIR-AT); head groups at `head_lr_mult` x lr (ddcat.md §1.6); with
    `train.weight_decay_on: matrices` each group splits into a decayed and an undecayed part.
    `only`: ids of the parameters of one training phase (`build_optimizers`); the others are left out."""
    t = cfg.train
    groups = model.param_groups(t.head_lr_mult) if hasattr(model, "param_groups") else \
        [{"params": list(model.parameters()), "lr_mult": 1.0}]
    if only is not None:
        groups = [dict(g, params=[p for p in g["params"] if id(p) in only]) for g in groups]
    groups = [dict(g, lr=t.lr * g["lr_mult"]) for g in groups if g["params"]]
    if t.weight_decay_on == "matrices":
        decay = decayed_parameters(model)
        groups = [dict(g, params=ps, weight_decay=wd) for g in groups
                  for wd, ps in ((t.weight_decay, [p for p in g["params"] if id(p) in decay]),
                                 (0.0, [p for p in g["params"] if id(p) not in decay])) if ps]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=t.weight_decay)
    raise SetupError(f"train.optimizer '{t.optimizer}' unknown; valid: sgd, adamw")


def build_optimizers(cfg, model: nn.Module, defense) -> Dict[Optional[str], torch.optim.Optimizer]:
    """{None: the optimiser}, or one optimiser per training phase a method declares
    (`Defense.param_phases`: {phase: parameter names}), each with its own state and lr schedule."""
    phases = defense.param_phases(model)
    if not phases:
        return {None: build_optimizer(cfg, model)}
    params = dict(model.named_parameters())
    return {phase: build_optimizer(cfg, model, only={id(params[n]) for n in names}) for phase, names in phases.items()}


def phase_summary(model: nn.Module, phases: Dict[str, List[str]]) -> List[str]:
    """One log line per phase: how many parameters it updates and the ones it leaves alone."""
    names = [n for n, _ in model.named_parameters()]
    lines = []
    for phase, updated in phases.items():
        kept = set(updated)
        frozen = [n for n in names if n not in kept]
        size = sum(p.numel() for n, p in model.named_parameters() if n in kept)
        lines.append(f"phase {phase}: updates {len(kept)} of {len(names)} parameter tensors ({size:,} values)"
                     + (f"; not: {', '.join(frozen[:8])}{' ...' if len(frozen) > 8 else ''}" if frozen else ""))
    return lines


class PolyWithWarmup:
    """lr factor for 0-based step s (iteration it = s + 1, set before the step as in semseg):
    linear warmup from `ratio` over `warmup` iterations, then (1 - (it - warmup)/(max - warmup))^power."""

    def __init__(self, max_iters: int, power: float, warmup: int = 0, ratio: float = 1e-6):
        self.max_iters, self.power, self.warmup, self.ratio = max_iters, power, warmup, ratio

    def __call__(self, step: int) -> float:
        it = step + 1
        if it <= self.warmup:
            return self.ratio + (1 - self.ratio) * it / self.warmup
        frac = (it - self.warmup) / max(self.max_iters - self.warmup, 1)
        return max(1.0 - frac, 0.0) ** self.power


def warmup_iterations(cfg, iters_per_epoch: int) -> int:
    """`train.warmup_iters`, or `train.warmup_epochs` x iterations per epoch (rounded): PIR-AT gives its
    warmup in epochs (sea.md §4.1, W = WARMUP * iters_per_epoch)."""
    t = cfg.train
    return int(t.warmup_iters) or int(round(t.warmup_epochs * iters_per_epoch))


class StepWithWarmup:
    """lr factor for 0-based step s (iteration s + 1, in epoch s // iters_per_epoch + 1): the linear warmup
    of PolyWithWarmup, then gamma^k with k the number of milestones <= the epochs finished before it
    (MTRobust's `step` and piecewise-constant schedules, mtl_fpd.md §A2.4)."""

    def __init__(self, iters_per_epoch: int, milestones, gamma: float, warmup: int = 0, ratio: float = 1e-6):
        self.iters_per_epoch, self.milestones, self.gamma = max(iters_per_epoch, 1), list(milestones), gamma
        self.warmup, self.ratio = warmup, ratio

    def __call__(self, step: int) -> float:
        it = step + 1
        if it <= self.warmup:
            return self.ratio + (1 - self.ratio) * it / self.warmup
        epochs_done = step // self.iters_per_epoch
        return self.gamma ** sum(1 for m in self.milestones if m <= epochs_done)


def build_scheduler(cfg, optimizer, max_iters: int, iters_per_epoch: Optional[int] = None):
    t = cfg.train
    per_epoch = max_iters // t.epochs if iters_per_epoch is None else iters_per_epoch
    warmup = warmup_iterations(cfg, per_epoch)
    if t.scheduler == "poly":
        factor = PolyWithWarmup(max_iters, t.power, warmup, t.warmup_ratio)
    elif t.scheduler == "step":
        factor = StepWithWarmup(per_epoch, t.lr_milestones, t.lr_gamma, warmup, t.warmup_ratio)
    else:
        raise SetupError(f"train.scheduler '{t.scheduler}' unknown; valid: poly, step")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def phase_states(objs: Dict[Optional[str], object]) -> dict:
    """Checkpoint entry of the optimisers (or schedulers): the one state dict, or {"phases": {phase: state}}."""
    if None in objs:
        return objs[None].state_dict()
    return {"phases": {k: o.state_dict() for k, o in objs.items()}}


def load_phase_states(objs: Dict[Optional[str], object], state: dict, path: str) -> None:
    """Inverse of `phase_states`; a checkpoint of other phases (another method or setting) is an error."""
    saved = list(state["phases"]) if isinstance(state, dict) and "phases" in state else [None]
    if saved != list(objs):
        name = lambda ps: "one optimiser" if ps == [None] else f"phases {ps}"  # noqa: E731
        raise SetupError(f"train.resume: {path} holds {name(saved)}, this run has {name(list(objs))} "
                         "(train.method or its settings changed?)")
    for k, o in objs.items():
        what = type(o).__name__ + ("" if k is None else f" of phase {k}")
        try:
            o.load_state_dict(state if k is None else state["phases"][k])
        except STATE_ERRORS as e:
            raise SetupError(f"train.resume: {path}: the {what} state does not fit this run "
                             f"({first_sentence(e)})") from None
        if isinstance(o, torch.optim.Optimizer):
            check_optimizer_state(o, path)


def check_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Every per-parameter buffer of a restored optimiser (momentum, Adam moments) must have its
    parameter's shape: torch does not check, and the first step would fail or broadcast."""
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise SetupError(f"train.resume: {path}: optimizer state '{name}' of parameter {i} of group {g} "
                                     f"has shape {list(v.shape)}, the parameter {list(p.shape)}")


def check_progress(ckpt: dict, path: str) -> Tuple[int, int, int]:
    """(epoch, iteration, skipped) of a training checkpoint: integers >= 0, or a one-line error."""
    out = []
    for name in ("epoch", "iteration", "skipped"):
        v = ckpt.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SetupError(f"train.resume: {path}: '{name}' must be an integer >= 0, got {v!r}")
        out.append(v)
    return out[0], out[1], out[2]


def check_training_tasks(model: nn.Module, dataset) -> None:
    """Every output of a multitask model must have a training target (an output without one never
    learns, and DDP stops on its unused parameters); a single-output model trains on segmentation only."""
    data_tasks = list(getattr(dataset, "tasks", []))
    if getattr(model, "multitask", False):
        if sorted(data_tasks) != sorted(model.tasks):
            raise SetupError(f"model.tasks {list(model.tasks)} and data.tasks {data_tasks} must list the same tasks: "
                             "every output of a multitask model is trained")
    elif [t for t in data_tasks if t != "segmentsemantic"]:
        raise SetupError(f"data.tasks {data_tasks}: model '{type(model).__name__}' has a single segmentation output; "
                         "use a multitask model (drn_multitask, taskonomy_resnet) or data.tasks: []")


class Trainer:
    """Builds everything from the config, validates the inputs, then runs `fit()`.

    Nothing is written into exp_dir before the first checkpoint (`_open_outputs`): a run that stops
    earlier (bad input, bad label, non-finite loss) leaves the files of an earlier run as they were.
    """

    def __init__(self, cfg):
        self.cfg, self.log = cfg, get_logger()
        t = cfg.train
        self.model_dir = os.path.join(cfg.exp_dir, "model")
        self.device = setup_runtime(cfg)
        if dist.is_main():  # the main process holds exp_dir's lock (engine/cli.py)
            recover_model_dir(cfg.exp_dir)
        dist.barrier()
        # torchrun restarted the job: continue (with train.overwrite, model/ may still hold the replaced
        # run's checkpoints, so such a run starts afresh again)
        if dist.restart_count() and not t.overwrite and list_checkpoints(self.model_dir):
            self.log.info(f"restart {dist.restart_count()} of the job: continuing from the newest checkpoint "
                          f"(train.resume=auto)")
            t.resume = "auto"
        check_fresh_run(cfg.exp_dir, t.resume, t.overwrite)
        check_init_file(cfg.model)  # a missing (robust) ImageNet init file stops the run before the data is read
        seed_all(cfg.seed)  # same init on every process; data order comes from the sampler seed
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "val") if t.eval_freq else None
        self.batch = per_process_batch(t.batch_size, "train.batch_size")
        self.sampler = train_sampler(self.train_set, cfg.seed)
        self.loader = make_loader(self.train_set, self.batch, cfg.data.workers, cfg.seed, self.sampler, drop_last=True)
        self.iters_per_epoch = len(self.loader)
        if self.iters_per_epoch == 0:
            raise SetupError(f"train.batch_size={t.batch_size} exceeds the {len(self.train_set)} training images")
        self.max_iters = t.epochs * self.iters_per_epoch
        self.defense = build_defense(cfg)
        model = build_model(cfg)
        check_training_tasks(model, self.train_set)
        self.defense.set_dataset(self.train_set)
        self.defense.prepare(model)
        if cfg.model.pretrained and not cfg.model.weights:
            load_pretrained(model, cfg.model.pretrained)
        if cfg.model.weights:
            load_model_weights(model, cfg.model.weights, key="model.weights")
        self.model = model.to(self.device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # one optimiser and lr schedule, or one per training phase of the method (`self.optimizer` /
        # `self.scheduler`: the first, whose lr is logged)
        self.optimizers = build_optimizers(cfg, self.model, self.defense)
        self.schedulers = {k: build_scheduler(cfg, o, self.max_iters, self.iters_per_epoch) for k, o in self.optimizers.items()}
        self.optimizer, self.scheduler = next(iter(self.optimizers.values())), next(iter(self.schedulers.values()))
        self.amp_dtype = amp_dtype(t.amp, self.device, "train.amp")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.epoch, self.iteration, self.skipped = 0, 0, 0
        resume = shared_resume(t.resume, cfg.exp_dir, self.iters_per_epoch, self.log)  # rank 0 chooses
        if resume:
            self._restore(*resume)
        self._freeze_unused_aux()
        if dist.world_size() > 1:
            if self.device.type == "cuda" and t.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # a method whose loss leaves some parameters unused says so; the search costs time otherwise
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(getattr(self.defense, "find_unused_parameters", False)))
        if t.compile:
            self.model = torch.compile(self.model)
        self.writer = None  # tensorboard, opened with the first checkpoint; scalars wait in _pending
        self.config_written = False  # config.yaml: written with the first complete checkpoint
        self.replacing = False  # train.overwrite: model.next/ replaces model/ after the first checkpoint
        self._pending: List[Tuple[str, float, int]] = []

    def _freeze_unused_aux(self) -> None:
        """``train.aux_weight: 0``: the auxiliary head gets no gradient, so it is frozen (DDP stops at
        parameters that take part in no backward)."""
        if self.cfg.train.aux_weight:
            return
        aux_heads = getattr(self.model, "aux_heads", None)  # (models/segmentor.py; a model of one's own may have none)
        heads = aux_heads() if callable(aux_heads) else {}
        for head in heads.values():
            head.requires_grad_(False)
        if heads:
            self.log.info(f"train.aux_weight=0: auxiliary head {', '.join(heads)} frozen")

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A tensorboard scalar (main process only)."""
        if not dist.is_main():
            return
        if self.writer is None:
            self._pending.append((tag, value, step))
        else:
            self.writer.add_scalar(tag, value, step)

    def _open_outputs(self) -> None:
        """The first write into exp_dir, just before the first checkpoint: the tensorboard writer,
        which gets the scalars logged so far. A fresh run with train.overwrite writes its checkpoints
        into model.next/ until the first one is complete (`_checkpoint`), so that a run that fails
        before that (bad input, non-finite loss, full disk) leaves the earlier run's files as they were."""
        if self.writer is not None:
            return
        from tensorboardX import SummaryWriter
        cfg = self.cfg
        if cfg.train.overwrite and cfg.train.resume in (None, "", False):
            self.model_dir, self.replacing = replace_model_dir(cfg.exp_dir, start=True), True
        else:
            remove_stale_temporaries(self.model_dir)
        self.writer = SummaryWriter(os.path.join(cfg.exp_dir, "events"))
        for tag, value, step in self._pending:
            self.writer.add_scalar(tag, value, step)
        self._pending = []

    def _checkpoint(self, names: Sequence[str]) -> None:
        """Write the checkpoint files `names` into model/; then, once they are all on disk, replace
        an overwritten run's model/ (`replace_model_dir`) and write config.yaml, which describes them."""
        self._open_outputs()
        state = self.state()
        try:
            for name in names:
                save_checkpoint(state, os.path.join(self.model_dir, name))
        except BaseException:
            if self.replacing:  # the earlier run stays in model/, complete
                shutil.rmtree(self.model_dir, ignore_errors=True)
            raise
        if self.replacing:
            self.model_dir, self.replacing = replace_model_dir(self.cfg.exp_dir), False
        if not self.config_written:
            save_config(self.cfg, os.path.join(self.cfg.exp_dir, "config.yaml"))
            self.config_written = True

    def _restore(self, path: str, ckpt: dict) -> None:
        """Every field is checked before training starts (a wrong one is a one-line error naming it)."""
        from models.weights import load_strict
        epoch, iteration, skipped = check_progress(ckpt, path)
        load_strict(self.model, ckpt["model"], path)
        load_phase_states(self.optimizers, ckpt["optimizer"], path)
        load_phase_states(self.schedulers, ckpt["scheduler"], path)
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.iteration, self.skipped = epoch, iteration, skipped
        done = self.iteration - self.epoch * self.iters_per_epoch
        if not 0 <= done < self.iters_per_epoch:
            raise SetupError(f"{path}: iteration {self.iteration} does not fall in epoch {self.epoch + 1} at "
                             f"{self.iters_per_epoch} iterations per epoch (train.batch_size or data changed?)")
        try:
            set_rng_state(ckpt["rng"])
        except STATE_ERRORS as e:
            raise SetupError(f"train.resume: {path}: 'rng' is not a random-number state saved by this project "
                             f"({first_sentence(e)})") from None
        self.log.info(f"resumed from {path} at epoch {self.epoch}, iteration {self.iteration}"
                      + (f" ({done} iterations into epoch {self.epoch + 1})" if done else ""))

    def state(self) -> dict:
        state = {"model": dist.unwrap(self.model).state_dict(), "optimizer": phase_states(self.optimizers),
                 "scheduler": phase_states(self.schedulers), "epoch": self.epoch, "iteration": self.iteration,
                 "skipped": self.skipped, "rng": get_rng_state(), "config": self.cfg.to_dict(), "env": env_record()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self) -> None:
        """Epoch end: epoch_<E>.pth every save_freq epochs (and the last), always last.pth."""
        if not dist.is_main():
            return
        every = self.epoch % self.cfg.train.save_freq == 0 or self.epoch == self.cfg.train.epochs
        self._checkpoint(([f"epoch_{self.epoch}.pth"] if every else []) + ["last.pth"])

    def maybe_save_iter(self) -> None:
        """The last step of every iteration: `save_iter` every `train.save_iter_freq` iterations, except
        at an epoch's end, whose checkpoint `save` writes once the epoch (and its validation) is over."""
        t = self.cfg.train
        if t.save_iter_freq and self.iteration % t.save_iter_freq == 0 and self.iteration % self.iters_per_epoch:
            self.save_iter()

    def save_iter(self) -> None:
        """Mid-epoch: iter_<I>.pth and last.pth; older iter_ files beyond the newest two are removed."""
        if not dist.is_main():
            return
        self._checkpoint([f"iter_{self.iteration}.pth", "last.pth"])
        iters = [p for p in list_checkpoints(self.model_dir) if os.path.basename(p).startswith("iter_")]
        for p in iters[KEEP_ITER_CHECKPOINTS:]:
            os.remove(p)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: dict) -> Optional[Dict[str, torch.Tensor]]:
        """One iteration: the method's optimisation steps (one for most methods, `Defense.steps`), each
        backward, clipped and stepped before the next is asked for; returns the detached logs (`loss`:
        the sum of the steps' losses), or None when a non-finite loss was skipped (with the
        iteration's remaining steps)."""
        t = self.cfg.train
        seed_layers(self.cfg.seed, dist.rank(), self.iteration)  # this process's Dropout / DropPath masks
        if t.channels_last:
            batch = channels_last(batch)
        steps = self.defense.steps(self.model, batch)
        logs: Dict[str, torch.Tensor] = {}
        total = None
        while True:
            with self._autocast():
                step = next(steps, None)
            if step is None:
                return dict(logs, loss=total)
            loss, step_logs, phase = step
            if not self._optimize(loss, phase):
                steps.close()
                return None
            logs.update(step_logs)
            total = loss.detach() if total is None else total + loss.detach()

    def _optimize(self, loss: torch.Tensor, phase: Optional[str] = None) -> bool:
        """backward, `train.clip_grad_norm`, step of the phase's optimiser; False when the loss was
        non-finite and the step skipped.

        Finiteness is tested on the device every step (agreed by all processes through a tiny
        all-reduce); the one host sync reads it after the backward has been queued.
        """
        t = self.cfg.train
        if phase not in self.optimizers:
            raise RuntimeError(f"training method {t.method} stepped phase {phase!r}; its phases: "
                               f"{list(self.optimizers)}")
        optimizer = self.optimizers[phase]
        bad = dist.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
        # every parameter's gradient, not only the phase's: none is left over from another phase's step
        self.model.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if bool(bad.item()):
            self.model.zero_grad(set_to_none=True)
            if not t.skip_nonfinite:
                raise FloatingPointError(
                    f"non-finite loss ({float(loss.detach()):g}) at iteration {self.iteration + 1} (epoch "
                    f"{self.epoch + 1}); set train.skip_nonfinite=true to skip such steps")
            self.skipped += 1
            self.log.warning(f"non-finite loss at iteration {self.iteration + 1}: step skipped "
                             f"({self.skipped} skipped so far)")
            return False
        if t.clip_grad_norm:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], t.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return True

    def _log_scalars(self, sums: Dict[str, torch.Tensor], counts: Dict[str, int], prefix: str) -> Dict[str, float]:
        """Means over processes and iterations; each key over the iterations that logged it (a method
        may log some terms only in some iterations, the same ones on every process)."""
        keys = sorted(sums)
        vec = dist.all_reduce_sum(torch.stack([sums[k] for k in keys] +
                                              [torch.tensor(float(counts[k]), device=self.device) for k in keys]))
        vec = vec.tolist()
        vals = {k: vec[i] / max(vec[len(keys) + i], 1.0) for i, k in enumerate(keys)}
        for k, v in vals.items():
            self._scalar(f"{prefix}/{k}", v, self.iteration)
        return vals

    def train_epoch(self) -> Dict[str, float]:
        from tqdm import tqdm
        t = self.cfg.train
        self.sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        self.defense.set_epoch(self.epoch)
        attack = self.defense.attack
        if attack is not None and t.attack_warmup_epochs:
            eps = attack.options.get("eps", 0.0) * attack.scale
            self._scalar("train/attack_eps", eps, self.epoch)
            if attack.scale < 1.0:
                self.log.info(f"epoch {self.epoch + 1}: training attack at {attack.scale:.3g} x eps ({eps:.3g}/255, warm-up)")
        done = self.iteration - self.epoch * self.iters_per_epoch  # > 0 when resumed mid-epoch
        self.sampler.skip(done * self.batch)
        self.model.train()
        if t.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        window: Dict[str, torch.Tensor] = {}
        total: Dict[str, torch.Tensor] = {}
        n_window: Dict[str, int] = {}
        n_total: Dict[str, int] = {}
        bar = tqdm(self.loader, disable=not dist.is_main(), desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   leave=False, initial=done, total=self.iters_per_epoch)
        for batch in bar:
            logs = self.train_step(to_device(batch, self.device))
            # every schedule follows the iteration count, also after a skipped step and for a phase whose
            # optimiser has not stepped yet (torch warns about the latter)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                for scheduler in self.schedulers.values():
                    scheduler.step()
            self.iteration += 1
            if logs is not None:
                for k, v in logs.items():
                    window[k] = window.get(k, 0.0) + v.float()
                    total[k] = total.get(k, 0.0) + v.float()
                    n_window[k] = n_window.get(k, 0) + 1
                    n_total[k] = n_total.get(k, 0) + 1
            if self.iteration % t.print_freq == 0 and window:
                vals = self._log_scalars(window, n_window, "train")
                lr = self.optimizer.param_groups[0]["lr"]
                self._scalar("train/lr", lr, self.iteration)
                self.log.info(f"epoch {self.epoch + 1} iter {self.iteration}/{self.max_iters} lr {lr:.5f} "
                              + " ".join(f"{k} {v:.4f}" for k, v in vals.items())
                              + (f" skipped {self.skipped}" if self.skipped else ""))
                window, n_window = {}, {}
            self.maybe_save_iter()
        if not total:
            return {}
        return {k: float(v) for k, v in self._log_scalars(total, n_total, "train_epoch").items()}

    def validate(self) -> dict:
        """Clean metrics on the val split (segmentation; plus mae / rmse of each regression task of a
        multitask model), logged to tensorboard under val/."""
        from torch.utils.data import Subset
        cfg = self.cfg
        shard = Subset(self.val_set, list(range(dist.rank(), len(self.val_set), dist.world_size())))
        loader = make_loader(shard, per_process_batch(cfg.train.val_batch_size, "train.val_batch_size"),
                             cfg.data.workers, cfg.seed, collate_fn=group_collate)
        model = dist.unwrap(self.model)
        reg_tasks = regression_tasks(model, self.val_set)
        stats = evaluate(model, loader, cfg.data.classes, cfg.data.ignore_label, device=self.device,
                         reg_tasks=reg_tasks)
        g = stats["clean"].gathered()
        m = summarize(g["inter"], g["union"], g["target"])
        m["tasks"] = task_metrics(g, None, reg_tasks)
        for k in ("mIoU", "mAcc", "aAcc"):
            self._scalar(f"val/{k}", m[k], self.epoch)
        for t, tm in m["tasks"].items():
            for k in ("mae", "rmse"):
                self._scalar(f"val/{t}/{k}", tm[k], self.epoch)
        return m

    def fit(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.log.info(f"training {cfg.model.name} with method {self.defense.describe()} for {t.epochs} epochs "
                      f"({self.iters_per_epoch} iterations each, {dist.world_size()} process(es), device {self.device})")
        phases = self.defense.param_phases(dist.unwrap(self.model))
        for line in phase_summary(dist.unwrap(self.model), phases) if phases else []:
            self.log.info(line)
        while self.epoch < t.epochs:
            start = time.time()
            train_logs = self.train_epoch()
            self.epoch += 1
            msg = f"epoch {self.epoch}/{t.epochs} done in {time.time() - start:.0f}s: " + \
                  " ".join(f"{k} {v:.4f}" for k, v in train_logs.items())
            if t.eval_freq and self.epoch % t.eval_freq == 0:
                m = self.validate()
                msg += f" | val mIoU {m['mIoU']:.4f} mAcc {m['mAcc']:.4f} aAcc {m['aAcc']:.4f}" + "".join(
                    f" {t} mae {tm['mae']:.4g} rmse {tm['rmse']:.4g}" for t, tm in m["tasks"].items())
            if self.skipped:
                msg += f" | {self.skipped} non-finite step(s) skipped so far"
            self.log.info(msg)
            self.save()
        if self.writer:
            self.writer.close()
        dist.barrier()
