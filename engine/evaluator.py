"""Clean and attacked evaluation over a split: per-image counts -> pooled metrics -> metrics.json.

Per image and per run (clean, each attack at each eps) only small integer arrays are kept:
intersection, union and target area per class, never adversarial images. Processes evaluate
disjoint shards; the counts are gathered by image index, so a multi-process run gives exactly the
single-process numbers. Ensembles (SEA, sea+, user lists) and the overall worst case per eps are
computed from those counts (utils.metrics.worst_case).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from attacks import Attack, attack_mode, build_attack
from attacks.ensemble import expand_attacks, needs_class_weights
from attacks.losses import class_weights_from_counts
from datasets import build_dataset
from datasets.palettes import class_names, palette
from models import build_model
from models.weights import load_model_weights
from utils import dist
from utils.config import load_config
from utils.errors import SetupError
from utils.logger import get_logger
from utils.metrics import confusion_counts, label_counts, summarize, worst_case

from . import eval_resume
from .common import make_loader, per_process_batch, setup_runtime, to_device
from .protocols import Protocol, build_protocol
from .visualize import example_panel, save_color

Counts = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # index, inter, union, target


def eps_key(eps: float) -> str:
    """8.0 -> '8', 0.5 -> '0.5' (the eps as written in the config, 1/255 units)."""
    return f"{float(eps):g}"


@dataclass
class AttackRun:
    """One attack at one eps. ``key`` names it in metrics.json: "<label>@<eps>", or
    "<ensemble>/<member>@<eps>" for an ensemble member (the ensemble itself is "<ensemble>@<eps>")."""
    key: str
    group: str
    eps: str
    attack: Attack


def _load_model(config_path: str, checkpoint: str, device: torch.device, overrides=()) -> nn.Module:
    model = build_model(load_config(config_path, overrides))
    load_model_weights(model, checkpoint)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_label_counts(cfg) -> np.ndarray:
    """Pixels per class over the training split (no augmentation), cached in <exp_dir>/result/."""
    path = os.path.join(cfg.exp_dir, "result", "train_label_counts.json")
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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"key": key, "counts": counts.tolist()}, f)
    return counts.numpy()


def build_attack_runs(cfg, device: torch.device = torch.device("cpu")) -> List[AttackRun]:
    """Expand ``test.attacks`` x ``test.eps`` into runs; ensembles into their members.

    Adds class weights to balanced-CE members (``test.class_weights`` or the training split's label
    frequencies) and builds the source model of transfer attacks (``source_config`` /
    ``source_checkpoint`` options).
    """
    groups = expand_attacks(cfg.test.attacks)
    weights = None
    runs = []
    for eps in cfg.test.eps:
        e = eps_key(eps)
        for g in groups:
            for label, name, opts in g.members:
                opts = dict(opts)
                if needs_class_weights(opts):
                    if weights is None:
                        weights = cfg.test.class_weights or class_weights_from_counts(training_label_counts(cfg)).tolist()
                    opts["class_weights"] = weights
                if name == "transfer":
                    if not opts.get("source_config") or not opts.get("source_checkpoint"):
                        raise SetupError(f"attack '{label}': transfer needs source_config and source_checkpoint")
                    opts["source_forward"] = _load_model(opts["source_config"], opts["source_checkpoint"], device)
                key = f"{g.label}/{label}@{e}" if g.is_ensemble else f"{label}@{e}"
                runs.append(AttackRun(key, f"{g.label}@{e}", e, build_attack(name, eps=eps, **opts)))
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


def evaluate(model: nn.Module, loader, classes: int, ignore: int, runs: List[AttackRun] = (),
             protocol: Optional[Protocol] = None, on_pred: Optional[Callable] = None,
             device: torch.device = torch.device("cpu"), progress: bool = False,
             on_batch: Optional[Callable[[Dict[str, RunStats]], None]] = None) -> Dict[str, RunStats]:
    """Clean inference and every attack run on each batch; per-run stats (not yet gathered).

    `protocol` defaults to whole-image inference with the model; `on_pred(run, batch, pred, x_adv)`
    sees each batch's predictions (colour PNGs, examples); `on_batch(stats)` runs after each batch
    (e.g. to save progress).
    """
    from tqdm import tqdm
    protocol = protocol or Protocol(model, model)
    stats = {"clean": RunStats(), **{r.key: RunStats() for r in runs}}
    model.eval()
    for batch in tqdm(loader, disable=not progress, desc="eval", leave=False):
        batch = to_device(batch, device)
        x, y, idx = batch["image"], batch["label"], batch["index"]
        t0 = time.perf_counter()
        with torch.no_grad():
            pred = protocol.predict(x).argmax(1)
        _sync(device)
        stats["clean"].seconds += time.perf_counter() - t0
        stats["clean"].add(idx, pred, y, classes, ignore)
        if on_pred:
            on_pred("clean", batch, pred, None)
        for run in runs:
            t0 = time.perf_counter()
            with attack_mode(model):
                scores, x_adv = protocol.attacked(run.attack, x, y)
            pred = scores.argmax(1)
            _sync(device)
            stats[run.key].seconds += time.perf_counter() - t0
            stats[run.key].add(idx, pred, y, classes, ignore)
            if on_pred:
                on_pred(run.key, batch, pred, x_adv)
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
    load_model_weights(model, path, key="test.checkpoint")
    return model.to(device).eval(), path


def _compact(m: dict) -> dict:
    """A worst-case result in the metrics.json shape (pooled values of the chosen assignment)."""
    chosen = m["chosen"]
    counts = np.bincount(np.asarray(m["choice"], dtype=np.int64), minlength=len(m["labels"])).tolist()
    return {"mIoU": m["mIoU"], "mAcc": chosen["mAcc"], "aAcc": m["aAcc"], "mIoU_img": m["mIoU_img"],
            "aAcc_pooled": chosen["aAcc"], "iou_per_class": chosen["iou_per_class"],
            "attacks": m["labels"], "images_per_attack": counts}


def aggregate(gathered: Dict[str, Counts], runs: List[AttackRun], seconds: Dict[str, float],
              passes: Dict[str, List[int]], names: List[str]) -> Tuple[dict, dict, dict]:
    """(clean, attacks, worst_case) sections of metrics.json from the gathered counts."""
    _, ci, cu, ct = gathered["clean"]
    clean = dict(summarize(ci, cu, ct), seconds=seconds["clean"])
    attacks: Dict[str, dict] = {}
    for r in runs:
        _, i, u, t = gathered[r.key]
        f, b = passes[r.key]
        attacks[r.key] = dict(summarize(i, u, t), forward_passes=f, backward_passes=b, seconds=seconds[r.key])
    def combine(members: List[AttackRun]) -> dict:
        I = np.stack([gathered[r.key][1] for r in members])
        U = np.stack([gathered[r.key][2] for r in members])
        res = _compact(worst_case(I, U, ct, [r.key for r in members], names))
        res.update(forward_passes=sum(passes[r.key][0] for r in members),
                   backward_passes=sum(passes[r.key][1] for r in members),
                   seconds=sum(seconds[r.key] for r in members))
        return res

    by_group: Dict[str, List[AttackRun]] = {}
    by_eps: Dict[str, List[AttackRun]] = {}
    for r in runs:
        by_group.setdefault(r.group, []).append(r)
        by_eps.setdefault(r.eps, []).append(r)
    for group, members in by_group.items():
        if len(members) > 1:  # an ensemble: worst case over its members
            attacks[group] = combine(members)
    worst = {e: combine(members) for e, members in by_eps.items()}  # over every attack at that eps
    return clean, attacks, worst


def run_test(cfg) -> dict:
    """test.py: evaluate the checkpoint clean and under every configured attack; write results."""
    if eval_resume.is_checkpoint_dir(cfg):  # a folder: each checkpoint in turn
        return eval_resume.run_directory(cfg, run_test)
    log = get_logger()
    device = setup_runtime(cfg)
    model, ckpt = load_for_test(cfg, device)
    protocol = build_protocol(cfg, model)
    runs = build_attack_runs(cfg, device)
    dataset = build_dataset(cfg, cfg.test.split)
    n = len(dataset) if cfg.test.num_images is None else min(cfg.test.num_images, len(dataset))
    # images done by an interrupted run are skipped; their saved counts are merged back in `finish`
    tracker = eval_resume.EvalProgress(cfg, ckpt, n, [(r.key, r.attack) for r in runs])
    shard = Subset(dataset, tracker.todo)
    loader = make_loader(shard, per_process_batch(cfg.test.batch_size, "test.batch_size"), cfg.data.workers, cfg.seed)
    classes, names = cfg.data.classes, class_names(cfg.data.name, cfg.data.classes)
    result_dir = eval_resume.result_dir(cfg)
    pal = palette(cfg.data.name)
    examples: Dict[str, list] = {}
    clean_preds: Dict[int, np.ndarray] = {}

    def on_pred(run: str, batch: dict, pred: torch.Tensor, x_adv: Optional[torch.Tensor]) -> None:
        idx = batch["index"].tolist()
        preds = pred.cpu().numpy()
        if cfg.test.save_images:
            for i, p in zip(idx, preds):
                save_color(p, pal, os.path.join(result_dir, run, dataset.name(i) + ".png"))
        if not dist.is_main():
            return
        if run == "clean":  # keep the clean predictions of the first few images for the example panels
            for i, p in zip(idx, preds):
                if len(clean_preds) < cfg.test.examples:
                    clean_preds[i] = p
        elif x_adv is not None:
            for b, i in enumerate(idx):
                if i in clean_preds and len(examples.setdefault(run, [])) < cfg.test.examples:
                    examples[run].append(example_panel(batch["image"][b], x_adv[b], clean_preds[i], preds[b],
                                                       batch["label"][b].cpu().numpy(), pal))

    log.info(f"evaluating {ckpt} on {n} {cfg.test.split} images, protocol {cfg.test.protocol}; attacks: "
             f"{', '.join(f'{r.key} {r.attack}' for r in runs) or 'none'}")
    stats = evaluate(model, loader, classes, cfg.data.ignore_label, runs, protocol, on_pred=on_pred, device=device,
                     progress=dist.is_main(), on_batch=tracker.on_batch)
    tracker.finish(stats)
    gathered = {k: s.gathered() for k, s in stats.items()}
    seconds = {k: float(dist.all_reduce_sum(torch.tensor(s.seconds, dtype=torch.float64)).item()) / dist.world_size()
               for k, s in stats.items()}
    passes = {r.key: [int(dist.all_reduce_sum(torch.tensor(v)).item()) for v in (r.attack.counter.forward,
                                                                                    r.attack.counter.backward)]
              for r in runs}
    clean, attacks, worst = aggregate(gathered, runs, seconds, passes, names)
    metrics = {"config": cfg.path, "checkpoint": ckpt, "split": cfg.test.split, "num_images": n,
               "protocol": cfg.test.protocol, "class_names": names, "clean": clean, "attacks": attacks,
               "worst_case": worst}
    if dist.is_main():
        write_results(cfg, metrics, examples, log)
    return metrics


def format_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pct(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def write_results(cfg, metrics: dict, examples: Dict[str, list], log) -> None:
    """metrics.json (atomically), resolved config, printed tables, example panels, tensorboard."""
    from PIL import Image
    from tensorboardX import SummaryWriter

    from utils.config import save_config
    result_dir = eval_resume.result_dir(cfg)
    os.makedirs(result_dir, exist_ok=True)
    tmp = os.path.join(result_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(result_dir, "metrics.json"))
    save_config(cfg, os.path.join(result_dir, "config.yaml"))
    runs = {"clean": metrics["clean"], **metrics["attacks"],
            **{f"worst@{k}": v for k, v in metrics["worst_case"].items()}}
    rows = [["run", "mIoU", "mAcc", "aAcc", "mIoU/img", "fwd", "bwd", "sec"]]
    for k, m in runs.items():
        rows.append([k, pct(m["mIoU"]), pct(m["mAcc"]), pct(m["aAcc"]), pct(m.get("mIoU_img")),
                     str(m.get("forward_passes", "-")), str(m.get("backward_passes", "-")), f"{m.get('seconds', 0):.1f}"])
    log.info("results (%; worst-case aAcc is the mean over images of the per-image minimum):\n" + format_table(rows))
    cls_rows = [["class"] + list(runs)]
    for c, name in enumerate(metrics["class_names"]):
        cls_rows.append([name] + [pct(m["iou_per_class"][c]) for m in runs.values()])
    log.info("per-class IoU (%):\n" + format_table(cls_rows))
    with SummaryWriter(os.path.join(cfg.exp_dir, "events")) as w:
        for k, m in runs.items():
            for key in ("mIoU", "mAcc", "aAcc"):
                w.add_scalar(f"test/{k}/{key}", m[key], 0)
        for run, panels in examples.items():
            for j, panel in enumerate(panels):
                path = os.path.join(result_dir, "examples", run, f"{j}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(panel).save(path)
                w.add_image(f"examples/{run}/{j}", panel, 0, dataformats="HWC")
    log.info(f"wrote {os.path.join(result_dir, 'metrics.json')}")
