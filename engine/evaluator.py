"""Clean and attacked evaluation over a split: per-image counts -> pooled metrics -> metrics.json.

Per image and per run (clean, each attack at each eps) only small integer arrays are kept:
intersection, union and target area per class. Processes evaluate disjoint shards; the counts are
gathered by image index, so a multi-process run gives exactly the single-process numbers.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from attacks import Attack, attack_mode, build_attack
from datasets import build_dataset
from datasets.palettes import class_names, palette
from models import build_model
from models.weights import load_model_weights
from utils import dist
from utils.errors import SetupError
from utils.logger import get_logger
from utils.metrics import confusion_counts, summarize

from . import eval_resume
from .common import make_loader, per_process_batch, setup_runtime, to_device
from .visualize import save_color

Counts = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # index, inter, union, target


def eps_key(eps: float) -> str:
    """8.0 -> '8', 0.5 -> '0.5' (the eps as written in the config, 1/255 units)."""
    return f"{float(eps):g}"


def build_attack_runs(cfg) -> List[Tuple[str, Attack]]:
    """Expand ``test.attacks`` x ``test.eps`` into ("<label>@<eps>", attack) pairs.

    An entry is a name ("pgd") or a mapping {name: pgd, label: pgd10, steps: 10, alpha: 2, ...};
    eps comes from ``test.eps`` unless the entry sets it.
    """
    runs = []
    for entry in cfg.test.attacks:
        opts = dict(entry) if isinstance(entry, dict) else {"name": entry}
        if "name" not in opts:
            raise SetupError(f"test.attacks entry {entry!r} needs a 'name'")
        name = opts.pop("name")
        label = opts.pop("label", name)
        for eps in ([opts.pop("eps")] if "eps" in opts else cfg.test.eps):
            runs.append((f"{label}@{eps_key(eps)}", build_attack(name, eps=eps, **opts)))
    return runs


class RunStats:
    """Per-image counts of one run, accumulated batch by batch."""

    def __init__(self):
        self.parts: List[Tuple[torch.Tensor, ...]] = []
        self.seconds = 0.0

    def add(self, index: torch.Tensor, pred: torch.Tensor, label: torch.Tensor, classes: int, ignore: int) -> None:
        inter, union, target = confusion_counts(pred, label, classes, ignore)
        self.parts.append((index.cpu(), inter.cpu(), union.cpu(), target.cpu()))

    def gathered(self) -> Counts:
        """All processes' counts, ordered by image index."""
        cols = [torch.cat([p[i] for p in self.parts]) if self.parts else torch.zeros(0, dtype=torch.long)
                for i in range(4)]
        idx, *counts = (dist.all_gather_rows(c) for c in cols)
        order = torch.argsort(idx)
        return tuple(t[order].numpy() for t in [idx] + counts)  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, loader, classes: int, ignore: int, attacks: List[Tuple[str, Attack]] = (),
             forward: Optional[Callable] = None, on_pred: Optional[Callable] = None,
             device: torch.device = torch.device("cpu"), progress: bool = False,
             on_batch: Optional[Callable[[Dict[str, RunStats]], None]] = None) -> Dict[str, RunStats]:
    """Run clean inference and every attack on each batch; returns per-run stats (not yet gathered).

    `forward` defaults to the model itself (whole-image protocol); `on_pred(run, index, pred)` is
    called with each batch's predictions (e.g. to write colour PNGs); `on_batch(stats)` after each
    batch (e.g. to save progress).
    """
    from tqdm import tqdm
    forward = forward or model
    stats = {"clean": RunStats(), **{name: RunStats() for name, _ in attacks}}
    model.eval()
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        batch = to_device(batch, device)
        x, y, idx = batch["image"], batch["label"], batch["index"]
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = forward(x).argmax(1)
        _sync(device)
        stats["clean"].seconds += time.perf_counter() - t0
        stats["clean"].add(idx, pred, y, classes, ignore)
        if on_pred:
            on_pred("clean", idx, pred)
        for name, attack in attacks:
            t0 = time.perf_counter()
            with attack_mode(model):
                x_adv = attack(forward, x, y)
                with torch.no_grad():
                    pred = forward(x_adv).argmax(1)
            _sync(device)
            stats[name].seconds += time.perf_counter() - t0
            stats[name].add(idx, pred, y, classes, ignore)
            if on_pred:
                on_pred(name, idx, pred)
        if on_batch:
            on_batch(stats)
    return stats


def checkpoint_path(cfg) -> str:
    return cfg.test.checkpoint or os.path.join(cfg.exp_dir, "model", "last.pth")


def load_for_test(cfg, device: torch.device) -> Tuple[nn.Module, str]:
    """Build the model and load the checkpoint strictly (before any image is processed)."""
    path = checkpoint_path(cfg)
    if not os.path.isfile(path):
        raise SetupError(f"checkpoint not found: {path} (set test.checkpoint or train first)")
    model = build_model(cfg)
    load_model_weights(model, path)
    return model.to(device).eval(), path


def format_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def run_test(cfg) -> dict:
    """test.py: evaluate the checkpoint clean and under every configured attack; write results."""
    if eval_resume.is_checkpoint_dir(cfg):  # a folder: each checkpoint in turn
        return eval_resume.run_directory(cfg, run_test)
    log = get_logger()
    device = setup_runtime(cfg)
    model, ckpt = load_for_test(cfg, device)
    attacks = build_attack_runs(cfg)
    dataset = build_dataset(cfg, cfg.test.split)
    n = len(dataset) if cfg.test.num_images is None else min(cfg.test.num_images, len(dataset))
    tracker = eval_resume.EvalProgress(cfg, ckpt, n, attacks)  # images done by an interrupted run are skipped
    shard = Subset(dataset, tracker.todo)
    loader = make_loader(shard, per_process_batch(cfg.test.batch_size, "test.batch_size"), cfg.data.workers, cfg.seed)
    classes, names = cfg.data.classes, class_names(cfg.data.name, cfg.data.classes)
    result_dir = eval_resume.result_dir(cfg)
    pal = palette(cfg.data.name)

    def on_pred(run: str, idx: torch.Tensor, pred: torch.Tensor) -> None:
        if cfg.test.save_images:
            for i, p in zip(idx.tolist(), pred.cpu().numpy()):
                save_color(p, pal, os.path.join(result_dir, run, dataset.name(i) + ".png"))

    log.info(f"evaluating {ckpt} on {n} {cfg.test.split} images; attacks: "
             f"{', '.join(f'{k} {a}' for k, a in attacks) or 'none'}")
    stats = evaluate(model, loader, classes, cfg.data.ignore_label, attacks, on_pred=on_pred, device=device,
                     progress=dist.is_main(), on_batch=tracker.on_batch)
    tracker.finish(stats)
    gathered = {k: s.gathered() for k, s in stats.items()}
    counters = {k: a.counter for k, a in attacks}
    seconds = {k: float(dist.all_reduce_sum(torch.tensor(s.seconds, dtype=torch.float64)).item()) / dist.world_size()
               for k, s in stats.items()}
    passes = {k: [int(dist.all_reduce_sum(torch.tensor(v)).item()) for v in (c.forward, c.backward)]
              for k, c in counters.items()}
    metrics = {"config": cfg.path, "checkpoint": ckpt, "split": cfg.test.split, "num_images": n,
               "class_names": names, "clean": None, "attacks": {}, "worst_case": {}}
    for run, (_, inter, union, target) in gathered.items():
        m = summarize(inter, union, target)
        m["seconds"] = seconds[run]
        if run == "clean":
            metrics["clean"] = m
        else:
            m["forward_passes"], m["backward_passes"] = passes[run]
            metrics["attacks"][run] = m
    if dist.is_main():
        write_results(cfg, metrics, log)
    return metrics


def write_results(cfg, metrics: dict, log) -> None:
    """metrics.json (atomically), printed tables, tensorboard scalars."""
    result_dir = eval_resume.result_dir(cfg)
    os.makedirs(result_dir, exist_ok=True)
    tmp = os.path.join(result_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(result_dir, "metrics.json"))
    runs = {"clean": metrics["clean"], **metrics["attacks"]}
    rows = [["run", "mIoU", "mAcc", "aAcc", "fwd", "bwd", "sec"]]
    for k, m in runs.items():
        rows.append([k, pct(m["mIoU"]), pct(m["mAcc"]), pct(m["aAcc"]), str(m.get("forward_passes", "-")),
                     str(m.get("backward_passes", "-")), f"{m['seconds']:.1f}"])
    log.info("results (%):\n" + format_table(rows))
    cls_rows = [["class"] + list(runs)]
    for c, name in enumerate(metrics["class_names"]):
        cls_rows.append([name] + [pct(m["iou_per_class"][c]) for m in runs.values()])
    log.info("per-class IoU (%):\n" + format_table(cls_rows))
    from tensorboardX import SummaryWriter
    with SummaryWriter(os.path.join(cfg.exp_dir, "events")) as w:
        for k, m in runs.items():
            for key in ("mIoU", "mAcc", "aAcc"):
                w.add_scalar(f"test/{k}/{key}", m[key], 0)
    log.info(f"wrote {os.path.join(result_dir, 'metrics.json')}")
