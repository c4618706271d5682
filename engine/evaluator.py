"""Clean and attacked evaluation over a split: per-image counts -> pooled metrics -> metrics.json.

Per image and per run (clean, each attack at each eps) only small arrays are kept: intersection,
union and target area per class, and for multitask models the error sums of every regression
output; never adversarial images. Processes evaluate disjoint shards; the counts are gathered by
image index. Images of different sizes are evaluated in same-size groups (never padded). Every
attack's random draws are seeded per image (``attacks.ImageSeeds``): the same draws for any batch
size, number of processes or resume. The numbers are bit-identical for the same per-process batch
and process count on the same machine (a resume included); another batch size, process count or
CPU changes the kernels' rounding, which an iterative attack can carry to a few pixels
(docs/reproducibility.md). Ensembles (SEA, sea+, user lists) and the overall worst case per eps are
computed from the counts (engine/results.py).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from attacks import ATTACKS, Attack, attack_mode, build_attack
from attacks.registry import attack_spec
from attacks.ensemble import expand_attacks, needs_class_weights
from attacks.losses import class_weights_from_counts
from attacks.multitask import merge_task_losses, published_task_losses, task_targets
from attacks.sea_weights import published_class_weights
from attacks.transfer import check_sources
from datasets import build_dataset
from datasets.palettes import class_names, palette
from models import build_model
from models.weights import load_model_weights
from utils import dist
from utils.atomic import atomic_write
from utils.config import load_config
from utils.env import env_record
from utils.errors import SetupError
from utils.logger import get_logger
from utils.metrics import class_map, confusion_counts, label_counts, regression_sums

from . import eval_resume
from .common import channels_last, group_collate, make_loader, per_process_batch, setup_runtime, to_device
from .protocols import Protocol, build_protocol
from .results import aggregate, write_results
from .visualize import example_panel, save_color

SEG_TASK = "segmentsemantic"
ColumnSpec = Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]


def eps_key(eps: float) -> str:
    """8.0 -> '8', 0.5 -> '0.5' (the eps as written in the config, 1/255 units)."""
    return f"{float(eps):g}"


@dataclass
class AttackRun:
    """One attack at one eps. ``key`` names it in metrics.json: "<label>@<eps>", or
    "<ensemble>/<member>@<eps>" for an ensemble member (the ensemble itself is "<ensemble>@<eps>").
    ``tasks``: the outputs it attacks (multitask models)."""
    key: str
    group: str
    eps: str
    attack: Attack
    tasks: List[str] = field(default_factory=lambda: [SEG_TASK])
    skip_solved: bool = False  # an ensemble member that skips images earlier members brought to 0 accuracy


def _load_model(config_path: str, checkpoint: str, device: torch.device, overrides=()) -> nn.Module:
    model = build_model(load_config(config_path, overrides))
    load_model_weights(model, checkpoint)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_label_counts(cfg) -> np.ndarray:
    """Pixels per class over the training split (no augmentation), cached in <exp_dir>/cache/."""
    path = os.path.join(cfg.exp_dir, "cache", "train_label_counts.json")
    key = {"dataset": cfg.data.name, "root": os.path.abspath(cfg.data.root), "list": cfg.data.train_list}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key and len(cached["counts"]) == cfg.data.classes:
            return np.asarray(cached["counts"], dtype=np.int64)
    plain = copy.deepcopy(cfg)
    plain.data.transform = "none"
    ds = build_dataset(plain, "train")
    counts = torch.zeros(cfg.data.classes, dtype=torch.long)
    for i in range(len(ds)):
        counts += label_counts(ds[i]["label"][None], cfg.data.classes, cfg.data.ignore_label)
    if dist.is_main():
        with atomic_write(path, "w") as f:
            json.dump({"key": key, "counts": counts.tolist()}, f)
    return counts.numpy()


def balanced_class_weights(cfg) -> List[float]:
    """Weights of ``mask-ce-bal``: ``test.class_weights``, else SEA's published vector for the dataset
    (VOC, ADE20K), else 1/N_c of the training split's label frequencies."""
    if cfg.test.class_weights:  # (one per class: checked with the config)
        return list(cfg.test.class_weights)
    return (published_class_weights(cfg.data.name, cfg.data.classes)
            or class_weights_from_counts(training_label_counts(cfg)).tolist())


def target_tasks(dataset: Dataset) -> List[str]:
    """The tasks a (multitask) dataset gives targets for; [] for a segmentation-only dataset."""
    return list(getattr(dataset, "tasks", []))


def regression_tasks(model: nn.Module, dataset: Dataset) -> List[str]:
    """Outputs of a multitask model scored as regressions: every task with a float target."""
    if not getattr(model, "multitask", False):
        return []
    missing = [t for t in target_tasks(dataset) if t not in model.tasks]
    if missing:
        raise SetupError(f"data.tasks {missing} are not outputs of the model (model.tasks: {list(model.tasks)})")
    return [t for t in target_tasks(dataset) if t != SEG_TASK]


def _attacked_tasks(cfg, name: str, opts: dict, multitask_attack: bool, model: Optional[nn.Module],
                    targets: List[str]) -> List[str]:
    """The outputs attack `name` differentiates; checks them against the model and the data."""
    where = f"attack '{name}'"
    multitask_model = model is not None and getattr(model, "multitask", False)
    if multitask_attack:
        if not multitask_model:
            raise SetupError(f"{where} needs a multitask model (model.name drn_multitask or taskonomy_resnet)")
        tasks = list(opts.get("tasks") or cfg.test.attack_tasks)
        bad = [t for t in tasks if t not in model.tasks or t not in targets]
        if not tasks or bad:
            raise SetupError(f"test.attack_tasks / {where}: {bad or tasks} must be outputs of the model "
                             f"({', '.join(model.tasks)}) with targets in data.tasks ({', '.join(targets) or 'none'})")
        return tasks
    main = model.main_output if multitask_model else SEG_TASK
    if list(cfg.test.attack_tasks) != [main]:
        raise SetupError(f"test.attack_tasks={list(cfg.test.attack_tasks)}: {where} attacks the segmentation output "
                         f"only; use the multitask attack ({{name: multitask, ...}}) to attack other tasks")
    return [main]


def _transfer_sources(groups, device: torch.device) -> Dict[Tuple[str, str], nn.Module]:
    """The source model of every transfer attack, loaded once per (source_config, source_checkpoint)."""
    sources: Dict[Tuple[str, str], nn.Module] = {}
    for g in groups:
        for label, name, opts in g.members:
            if name != "transfer":
                continue
            check_sources(label, opts)
            key = (opts["source_config"], opts["source_checkpoint"])
            if key not in sources:
                sources[key] = _load_model(*key, device)
    return sources


def build_attack_runs(cfg, device: torch.device = torch.device("cpu"), model: Optional[nn.Module] = None,
                      dataset: Optional[Dataset] = None) -> List[AttackRun]:
    """Expand ``test.attacks`` x ``test.eps`` into runs; ensembles into their members.

    Adds class weights to balanced-CE members (``balanced_class_weights``), the attacked tasks to
    multitask attacks (``test.attack_tasks`` unless the entry sets ``tasks``) with each task's training
    loss (``attacks.multitask.published_task_losses``), the source model of
    transfer attacks (``source_config`` / ``source_checkpoint``, ``_transfer_sources``) and each run's
    random seed (``seed`` and the run's key).
    """
    groups = expand_attacks(cfg.test.attacks)
    targets = target_tasks(dataset) if dataset is not None else list(cfg.data.tasks)
    sources = _transfer_sources(groups, device)
    weights = None
    runs = []
    for eps in cfg.test.eps:
        e = eps_key(eps)
        for g in groups:
            for label, name, opts in g.members:
                opts = dict(opts)
                if needs_class_weights(opts):
                    if weights is None:
                        weights = balanced_class_weights(cfg)
                    opts["class_weights"] = weights
                if name == "transfer":
                    opts["source_forward"] = sources[(opts["source_config"], opts["source_checkpoint"])]
                multitask = attack_spec(ATTACKS.get(name)).multitask
                tasks = _attacked_tasks(cfg, label, opts, multitask, model, targets)
                if multitask:  # each task's training loss (attacks/multitask.py), names in opts change the kind
                    opts["tasks"] = tasks
                    opts["task_losses"] = merge_task_losses(published_task_losses(
                        cfg.data.name, targets, getattr(dataset, "seg_class_weights", None), cfg.model.std),
                        opts.get("task_losses"))
                key = f"{g.label}/{label}@{e}" if g.is_ensemble else f"{label}@{e}"
                seed_label = g.seed_label(label, e)  # = key, except for members shared by named ensembles
                attack = build_attack(name, seed=cfg.seed, label=seed_label, eps=eps, **opts)
                runs.append(AttackRun(key, f"{g.label}@{e}", e, attack, tasks,
                                      skip_solved=g.skip_solved and g.is_ensemble and not multitask))
    return runs


def run_columns(classes: int, reg_tasks: Sequence[str] = ()) -> ColumnSpec:
    """The per-image columns of a run: image index, I/U/T per class, and (sum|e|, sum e^2, n) per
    regression task."""
    cols: ColumnSpec = {"index": (torch.long, ()), "inter": (torch.long, (classes,)),
                        "union": (torch.long, (classes,)), "target": (torch.long, (classes,))}
    cols.update({f"reg_{t}": (torch.float64, (3,)) for t in reg_tasks})
    return cols


class RunStats:
    """Per-image columns of one run, accumulated batch by batch."""

    def __init__(self, columns: ColumnSpec):
        self.columns = columns
        self.parts: List[Dict[str, torch.Tensor]] = []
        self.seconds = 0.0

    def add(self, part: Dict[str, torch.Tensor]) -> None:
        self.parts.append({k: v.cpu() for k, v in part.items()})

    def gathered(self) -> Dict[str, np.ndarray]:
        """All processes' rows, ordered by image index (a collective: call on every process)."""
        cols = {c: torch.cat([p[c] for p in self.parts]) if self.parts else torch.zeros((0,) + shape, dtype=dtype)
                for c, (dtype, shape) in self.columns.items()}
        cols = {c: dist.all_gather_rows(t) for c, t in cols.items()}
        order = torch.argsort(cols["index"])
        return {c: t[order].numpy() for c, t in cols.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def segmentation_pred(outputs, label: torch.Tensor, main: Optional[str]) -> torch.Tensor:
    """Argmax map at the label's resolution. Scores at another size (labels kept at their original
    resolution, ``eval_transform: semseg``) are resized bilinearly first, as semseg / DDC-AT do."""
    scores = outputs[main] if isinstance(outputs, dict) else outputs
    if scores.shape[-2:] != label.shape[-2:]:
        scores = F.interpolate(scores.float(), size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
    return class_map(scores)


def run_part(group: dict, outputs, pred: torch.Tensor, classes: int, ignore: int,
             reg_tasks: Sequence[str]) -> Dict[str, torch.Tensor]:
    """One group's per-image columns (see ``run_columns``)."""
    inter, union, target = confusion_counts(pred, group["label"], classes, ignore)
    part = {"index": group["index"], "inter": inter, "union": union, "target": target}
    for t in reg_tasks:
        part[f"reg_{t}"] = regression_sums(outputs[t], group["targets"][t], group["masks"][t])
    return part


def attack_targets(group: dict, attack: Attack):
    """The label map, or for a multitask attack {task: target, "<task>_mask": valid mask}."""
    if not attack.multitask:
        return group["label"]
    return task_targets(group["targets"], group["masks"])


def solved_rows(part: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B]: images with valid pixels and none of them correct (0 pixel accuracy) in a run's part."""
    return (part["target"].sum(1) > 0) & (part["inter"].sum(1) == 0)


def _select_rows(group: dict, rows: torch.Tensor) -> dict:
    """The rows `rows` of every per-image tensor of a batch group (nested task dicts included)."""
    n = group["index"].shape[0]

    def pick(v):
        if isinstance(v, dict):
            return {k: pick(u) for k, u in v.items()}
        return v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
    return {k: pick(v) for k, v in group.items()}


class SolvedImages:
    """Per ensemble (group) of one batch: which images an earlier member brought to 0 pixel accuracy
    and that member's per-image columns, which the later members of a ``skip_solved`` ensemble copy
    for those images instead of attacking them (attacks/ensemble.py)."""

    def __init__(self):
        self.mask: Dict[str, torch.Tensor] = {}
        self.part: Dict[str, Dict[str, torch.Tensor]] = {}

    def skipped(self, group: str) -> Optional[torch.Tensor]:
        m = self.mask.get(group)
        return m if m is not None and bool(m.any()) else None

    def merge(self, group: str, rows: torch.Tensor, part: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The full batch's columns: `part` (of the attacked rows) and the solver's for the others."""
        full = {k: v.clone() for k, v in self.part[group].items()}
        for k, v in part.items():
            full[k][rows] = v
        return full

    def record(self, group: str, part: Dict[str, torch.Tensor]) -> None:
        now = solved_rows(part)
        if group not in self.mask:
            self.mask[group], self.part[group] = now, {k: v.clone() for k, v in part.items()}
            return
        new = now & ~self.mask[group]
        for k, v in part.items():
            self.part[group][k][new] = v[new]
        self.mask[group] |= now


def evaluate(model: nn.Module, loader, classes: int, ignore: int, runs: Sequence[AttackRun] = (),
             protocol: Optional[Protocol] = None, on_pred: Optional[Callable] = None,
             device: torch.device = torch.device("cpu"), progress: bool = False,
             on_batch: Optional[Callable[[Dict[str, RunStats]], None]] = None,
             reg_tasks: Sequence[str] = (), memory_format: torch.memory_format = torch.contiguous_format
             ) -> Dict[str, RunStats]:
    """Clean inference and every attack run on each batch; per-run stats (not yet gathered).

    Batches are lists of same-size groups (``group_collate``) or plain batches. `protocol` defaults
    to whole-image inference with the model; `on_pred(run, group, pred, x_adv)` sees each group's
    predictions (colour PNGs, examples); `on_batch(stats)` runs after each batch (to save progress).
    """
    from tqdm import tqdm
    protocol = protocol or Protocol(model, model)
    columns = run_columns(classes, reg_tasks)
    stats = {"clean": RunStats(columns), **{r.key: RunStats(columns) for r in runs}}
    model.eval()
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        for group in batch if isinstance(batch, list) else [batch]:
            group = to_device(group, device)
            if memory_format != torch.contiguous_format:
                group = channels_last(group)
            x, y = group["image"], group["label"]
            t0 = time.perf_counter()
            with torch.no_grad():
                out = protocol.predict(x)
                pred = segmentation_pred(out, y, protocol.main)
            _sync(device)
            stats["clean"].seconds += time.perf_counter() - t0
            stats["clean"].add(run_part(group, out, pred, classes, ignore, reg_tasks))
            if on_pred:
                on_pred("clean", group, pred, None)
            solved = SolvedImages()
            for run in runs:
                skip = solved.skipped(run.group) if run.skip_solved else None
                rows = None if skip is None else (~skip).nonzero().squeeze(1)
                if rows is not None and rows.numel() == 0:  # every image already solved: nothing to attack
                    stats[run.key].add(solved.merge(run.group, rows, {}))
                    continue
                sub = group if rows is None else _select_rows(group, rows)
                t0 = time.perf_counter()
                with attack_mode(model):
                    out, x_adv = protocol.attacked(run.attack, sub["image"], attack_targets(sub, run.attack),
                                                   sub["index"].tolist())
                pred = segmentation_pred(out, sub["label"], protocol.main)
                _sync(device)
                stats[run.key].seconds += time.perf_counter() - t0
                part = run_part(sub, out, pred, classes, ignore, reg_tasks)
                if rows is not None:
                    part = solved.merge(run.group, rows, part)
                if run.skip_solved:
                    solved.record(run.group, part)
                stats[run.key].add(part)
                if on_pred:
                    on_pred(run.key, sub, pred, x_adv)
        if on_batch:
            on_batch(stats)
    return stats


def checkpoint_path(cfg) -> str:
    return cfg.test.checkpoint or os.path.join(cfg.exp_dir, "model", "last.pth")


def load_for_test(cfg, device: torch.device) -> Tuple[nn.Module, str]:
    """Build the model and load the checkpoint strictly (before any image is processed). Without
    ``test.checkpoint`` and without ``<exp_dir>/model/last.pth``, a model that comes with its own weights
    (``model.name: hf`` or ``external``: ``weights_source``, the file they came from) is evaluated as built."""
    path = checkpoint_path(cfg)
    if not os.path.isfile(path) and cfg.test.checkpoint:
        raise SetupError(f"checkpoint not found: {path} (set test.checkpoint or train first)")
    model = build_model(cfg)
    if not os.path.isfile(path):
        path = getattr(model, "weights_source", None)
        if not path or not os.path.isfile(path):
            raise SetupError(f"checkpoint not found: {checkpoint_path(cfg)} (set test.checkpoint or train first)")
    else:
        load_model_weights(model, path, key="test.checkpoint")
    return model.to(device).eval(), path


def metrics_record(cfg, ckpt: Optional[str], n: int, model: nn.Module, dataset: Dataset, runs: Sequence[AttackRun],
                   gathered: dict, seconds: Dict[str, float], passes: dict, shard=None) -> dict:
    """The content of metrics.json from the gathered per-image columns (a shard's carries ``shard``)."""
    seg_task = SEG_TASK if SEG_TASK in target_tasks(dataset) else None
    tasks = (seg_task, regression_tasks(model, dataset)) if getattr(model, "multitask", False) else None
    names = list(cfg.data.class_names or class_names(cfg.data.name, cfg.data.classes))
    clean, attacks, worst = aggregate(gathered, runs, seconds, passes, names, tasks)
    metrics = {"config": cfg.path, "checkpoint": ckpt, "split": cfg.test.split, "num_images": n,
               "protocol": cfg.test.protocol, "class_names": names, "clean": clean, "attacks": attacks,
               "worst_case": worst, "env": env_record()}
    if shard:
        metrics["shard"] = list(shard)
    return metrics


def run_test(cfg) -> dict:
    """test.py: evaluate the checkpoint clean and under every configured attack; write results."""
    if eval_resume.is_checkpoint_dir(cfg):  # a folder: each checkpoint in turn
        return eval_resume.run_directory(cfg, run_test)
    device = setup_runtime(cfg)
    model, ckpt = load_for_test(cfg, device)
    return evaluate_model(model, build_dataset(cfg, cfg.test.split), cfg, checkpoint=ckpt, write=True, device=device)


class MemoryProgress:
    """EvalProgress's interface without files: every image of this process is evaluated, nothing is
    resumed or saved (an in-memory model, or a loader the caller built)."""

    def __init__(self, n: int, runs: Sequence[AttackRun], shard=None):
        self.todo = eval_resume.shard_images(n, shard)[dist.rank()::dist.world_size()]
        self.attacks = [(r.key, r.attack) for r in runs]

    def on_batch(self, stats: Dict[str, RunStats]) -> None:
        pass

    def finish(self, stats: Dict[str, RunStats]):
        gathered = {r: s.gathered() for r, s in stats.items()}
        seconds = {r: float(dist.all_reduce_sum(torch.tensor(s.seconds, dtype=torch.float64)))
                   for r, s in stats.items()}
        passes = {k: tuple(int(v) for v in dist.all_reduce_sum(torch.tensor([a.counter.forward, a.counter.backward])))
                  for k, a in self.attacks}
        return gathered, seconds, passes


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(0)).device


def evaluate_model(model: nn.Module, data, cfg, *, checkpoint: Optional[str] = None, write: bool = False,
                   device: Optional[torch.device] = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluate `model` clean and under ``test.attacks`` x ``test.eps`` on `data`; returns the dict that
    metrics.json holds (test.py runs this very function).

    `model`: an nn.Module; one that is not a project model (``Segmentor``) is wrapped by
    ``models.external.ModelAdapter`` without normalisation (it takes [0,1] RGB; its logits are unwrapped
    and upsampled to the input size). `data`: a dataset of samples {"image", "label", "index"}
    (``test.num_images`` applies) or a DataLoader yielding batches of them (evaluated as it is). `cfg`: a
    config (``utils.config.load_config``) or the path of one, with `overrides`; its ``test`` and ``data``
    settings (classes, ignore label, class names) apply. `checkpoint`: the file the weights came from,
    recorded in the dict; an evaluation with `write` and a checkpoint file resumes like test.py's.
    `write`: also write the result folder (metrics.json, plots, PNGs; ``test.result_dir`` or
    ``<exp_dir>/result``) and tensorboard events, as test.py does. `device`: default the model's.
    """
    from models.external import ModelAdapter
    from models.segmentor import Segmentor
    from torch.utils.data import DataLoader
    if isinstance(cfg, str):
        cfg = load_config(cfg, list(overrides))
    log = get_logger()
    if not isinstance(model, Segmentor):
        model = ModelAdapter(model, cfg.data.classes, source="model")
    device = device or _device_of(model)
    memory_format = torch.channels_last if cfg.test.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).eval()
    protocol = build_protocol(cfg, model, device)
    from_loader = isinstance(data, DataLoader)
    dataset = data.dataset if from_loader else data
    reg_tasks = regression_tasks(model, dataset)
    runs = build_attack_runs(cfg, device, model, dataset)
    n = len(dataset) if from_loader or cfg.test.num_images is None else min(cfg.test.num_images, len(dataset))
    classes = cfg.data.classes
    names = list(cfg.data.class_names or class_names(cfg.data.name, classes))
    staging = None
    batch = per_process_batch(cfg.test.batch_size, "test.batch_size")
    if write and not from_loader and checkpoint and os.path.isfile(checkpoint):
        # everything goes to a staging folder that replaces the result folder once the evaluation is done;
        # images done by an interrupted run of the same evaluation are skipped (counts merged in `finish`)
        tracker = eval_resume.EvalProgress(cfg, checkpoint, n, [(r.key, r.attack) for r in runs],
                                           run_columns(classes, reg_tasks), batch)
        staging = eval_resume.staging_dir(cfg)
    else:
        tracker = MemoryProgress(n, runs, None if from_loader else cfg.test.shard)
        if write:  # weights without a file to identify them: never resumed from an earlier run's counts
            staging = eval_resume.prepare_staging(cfg, f"unsaved-{os.getpid()}-{time.time_ns()}")
    loader = data if from_loader else make_loader(
        Subset(dataset, tracker.todo), batch, cfg.data.workers, cfg.seed, collate_fn=group_collate)
    pal = palette(cfg.data.name, classes)  # the 151-class ADE20K variant shifts the colours as the names
    examples: Dict[str, list] = {}
    clean_preds: Dict[int, np.ndarray] = {}

    def on_pred(run: str, group: dict, pred: torch.Tensor, x_adv: Optional[torch.Tensor]) -> None:
        idx = group["index"].tolist()
        preds = pred.cpu().numpy()
        if cfg.test.save_images:
            for i, p in zip(idx, preds):
                save_color(p, pal, os.path.join(staging, run, dataset.name(i) + ".png"))
        if not dist.is_main():
            return
        if run == "clean":  # keep the clean predictions of the first few images for the example panels
            for i, p in zip(idx, preds):
                if len(clean_preds) < cfg.test.examples:
                    clean_preds[i] = p
        elif x_adv is not None:
            for b, i in enumerate(idx):
                if i in clean_preds and len(examples.setdefault(run, [])) < cfg.test.examples:
                    examples[run].append(example_panel(group["image"][b], x_adv[b], clean_preds[i], preds[b],
                                                       group["label"][b].cpu().numpy(), pal, names,
                                                       cfg.data.ignore_label))

    shard = " (shard {} of {}: every {}-th image)".format(*cfg.test.shard, cfg.test.shard[1]) \
        if cfg.test.shard and not from_loader else ""
    log.info(f"evaluating {checkpoint or 'the model'} on {n} {cfg.test.split} images{shard}, protocol {cfg.test.protocol}; "
             f"attacks: {', '.join(f'{r.key} {r.attack}' for r in runs) or 'none'}")
    stats = evaluate(model, loader, classes, cfg.data.ignore_label, runs, protocol,
                     on_pred=on_pred if staging is not None else None, device=device,
                     progress=dist.is_main(), on_batch=tracker.on_batch, reg_tasks=reg_tasks,
                     memory_format=memory_format)
    gathered, seconds, passes = tracker.finish(stats)
    seconds = {k: v / dist.world_size() for k, v in seconds.items()}  # mean wall time per process
    metrics = metrics_record(cfg, checkpoint, n, model, dataset, runs, gathered, seconds, passes,
                             None if from_loader else cfg.test.shard)
    if staging is not None:
        if dist.is_main():
            write_results(cfg, metrics, examples, staging, log)
            log.info(f"wrote {os.path.join(eval_resume.publish(cfg), 'metrics.json')}")
        dist.barrier()
    return metrics
