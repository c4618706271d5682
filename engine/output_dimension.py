"""MTRobust's robustness-vs-output-dimension analyses (mtl_fpd.md §A3.4), for any segmentation model of
the registry and the multitask models (their main, segmentation output).

1. ``grad_norm_vs_m``: for each number M of attacked outputs (pixels) and each batch, M random pixel
   positions (one mask shared by the batch, seeded by (seed, M, batch index)); the summed CE over the
   selected valid pixels is backpropagated to the input; ||grad_x||_2 / M per image, averaged over images.
   The paper predicts a decay of about 1/sqrt(M) when the per-pixel gradients are weakly correlated.
2. ``robust_accuracy_vs_m``: PGD (eps 8/255, alpha 2/255, 5 steps, no random start) on the CE of the M
   selected pixels only (the others get the ignore label); pixel accuracy of the selected valid pixels,
   clean and attacked, averaged over images.
3. ``task_attack_table`` (multitask models): the ``multitask`` attack on the segmentation output only vs
   on every task (optionally each task alone) through ``engine.evaluator.run_test``; every task's metrics.

JSON shapes (what the plots draw, see ``plot_grad_norm`` / ``plot_robust_accuracy``)::

    grad_norm.json        {"M": [...], "grad_norm": [...], "num_images": n, "seed": s, ...}
    robust_accuracy.json  {"M": [...], "clean_acc": [...], "adv_acc": [...], "images": [...], ...}
    task_attacks.json     {"tasks": [...], "clean": {task: {metric: v}}, "rows": [{"attacked": [...],
                           "metrics": {task: {metric: v}}}, ...]}

Predictions go through the evaluated inference (the ``whole`` protocol: whole image, or the sliding
window with ``test.crop_size``). "Batch index" counts the same-size groups of the evaluation batches in order (``group_collate``), so a
mask never spans images of different sizes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from attacks import attack_mode, build_attack
from attacks.base import input_grad, pixel_ce
from utils.atomic import atomic_write
from utils.errors import SetupError
from utils.metrics import class_map

from .common import group_collate, make_loader, to_device

SEG_METRICS = ("mIoU", "aAcc")      # reported per segmentation task in the task table
REG_METRICS = ("mae", "rmse")       # and per regression task


def default_sizes(num_pixels: int) -> List[int]:
    """1, 4, 16, ... (powers of 4) below `num_pixels`, then `num_pixels` itself."""
    sizes, m = [], 1
    while m < num_pixels:
        sizes.append(m)
        m *= 4
    return sizes + [num_pixels]


def parse_sizes(text: str) -> List[int]:
    """'1,4,16' -> [1, 4, 16]: distinct integers >= 1, sorted; SetupError naming --sizes otherwise."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SetupError(f"--sizes {text!r}: give comma-separated integers, e.g. 1,4,16,64") from None
    if not sizes or min(sizes) < 1:
        raise SetupError(f"--sizes {text!r}: every size must be an integer >= 1")
    return sorted(set(sizes))


def mask_generator(seed: int, m: int, batch: int) -> torch.Generator:
    """The CPU generator of the pixel mask for size `m` and batch `batch` (same on every device)."""
    blob = f"{int(seed)}|output_dimension|{int(m)}|{int(batch)}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1)


def pixel_mask(height: int, width: int, m: int, seed: int, batch: int) -> torch.Tensor:
    """Boolean [H, W] map with exactly `m` random pixels set (seeded by (seed, m, batch))."""
    if not 1 <= m <= height * width:
        raise SetupError(f"--sizes: {m} pixels asked of a {height}x{width} image ({height * width} pixels)")
    flat = torch.zeros(height * width, dtype=torch.bool)
    flat[torch.randperm(height * width, generator=mask_generator(seed, m, batch))[:m]] = True
    return flat.view(height, width)


def segmentation_forward(model: nn.Module, size: Optional[Tuple[int, int]] = None,
                         inference: Optional[Callable] = None) -> Callable:
    """x in [0,1] -> segmentation logits [B,C,H,W] through `inference` (default: the model on the whole
    image; the tool passes the ``whole`` protocol's, a sliding window when ``test.crop_size`` is set):
    the main output of a multitask model, resized (bilinear) to `size` when the labels are at another
    resolution."""
    main = model.main_output if getattr(model, "multitask", False) else None
    run = inference or model

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = run(x)
        out = out[main] if main is not None else out
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
        return out
    return forward


def selected_labels(y: torch.Tensor, mask: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    """Labels with every pixel outside `mask` set to `ignore` (it then adds nothing to the CE)."""
    return torch.where(mask.to(y.device)[None], y, torch.full_like(y, ignore))


def grad_norm_per_output(forward: Callable, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                         ignore: int = 255) -> torch.Tensor:
    """||d/dx sum_{p in mask, valid} CE_p||_2 / M per image [B] (M = mask.sum()); the model must be in
    ``attack_mode`` (eval, parameters frozen): the gradient is taken w.r.t. the input only."""
    x = x.detach().clone().requires_grad_(True)
    loss = pixel_ce(forward(x), selected_labels(y, mask, ignore), ignore).sum()
    g = input_grad(loss, x, None)
    return g.flatten(1).norm(dim=1) / int(mask.sum())


def iterate_groups(dataset: Dataset, batch_size: int, num_images: Optional[int], workers: int = 0,
                   seed: int = 0) -> Iterator[dict]:
    """Same-size groups of the first `num_images` images (all when None), in order."""
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    loader = make_loader(Subset(dataset, list(range(n))), batch_size, workers, seed, collate_fn=group_collate)
    for batch in loader:
        yield from batch


def grad_norm_vs_m(model: nn.Module, groups: Iterable[dict], sizes: Sequence[int], seed: int = 0,
                   ignore: int = 255, device: torch.device = torch.device("cpu"),
                   inference: Optional[Callable] = None) -> dict:
    """Analysis 1 (module docstring): {"M", "grad_norm" (mean over images), "grad_norm_std", "num_images"}."""
    norms: Dict[int, List[float]] = {m: [] for m in sizes}
    with attack_mode(model):
        for b, group in enumerate(groups):
            group = to_device(group, device)
            x, y = group["image"], group["label"]
            fwd = segmentation_forward(model, tuple(y.shape[-2:]), inference)
            for m in sizes:
                mask = pixel_mask(y.shape[-2], y.shape[-1], m, seed, b)
                norms[m] += grad_norm_per_output(fwd, x, y, mask, ignore).tolist()
    n = len(norms[sizes[0]]) if sizes else 0
    return {"M": [int(m) for m in sizes],
            "grad_norm": [float(torch.tensor(norms[m], dtype=torch.float64).mean()) for m in sizes],
            "grad_norm_std": [float(torch.tensor(norms[m], dtype=torch.float64).std(unbiased=False)) for m in sizes],
            "num_images": n, "seed": int(seed), "loss": "summed CE over the selected valid pixels",
            "measure": "||grad_x||_2 / M per image, mean over images"}


def selected_accuracy(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, ignore: int = 255
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(correct, valid) counts per image [B] over the selected pixels whose label is not `ignore`."""
    sel = mask.to(y.device)[None] & (y != ignore)
    return ((pred == y) & sel).flatten(1).sum(1), sel.flatten(1).sum(1)


def robust_accuracy_vs_m(model: nn.Module, groups: Iterable[dict], sizes: Sequence[int], seed: int = 0,
                         ignore: int = 255, eps: float = 8.0, alpha: float = 2.0, steps: int = 5,
                         device: torch.device = torch.device("cpu"), inference: Optional[Callable] = None) -> dict:
    """Analysis 2 (module docstring); eps / alpha in 1/255. Images with no valid selected pixel are left
    out of that M's average (``images`` counts the ones kept)."""
    # the library's PGD averages the per-pixel CE over all H*W pixels (ignored ones are 0), not over the M
    # selected ones: a positive factor per image, which sign steps do not see, so this is the mean over M
    attack = build_attack("pgd", seed=seed, eps=eps, alpha=alpha, steps=steps, random_start=False,
                          ignore_index=ignore)
    clean: Dict[int, List[float]] = {m: [] for m in sizes}
    adv: Dict[int, List[float]] = {m: [] for m in sizes}
    with attack_mode(model):
        for b, group in enumerate(groups):
            group = to_device(group, device)
            x, y = group["image"], group["label"]
            fwd = segmentation_forward(model, tuple(y.shape[-2:]), inference)
            with torch.no_grad():
                pred = class_map(fwd(x))
            for m in sizes:
                mask = pixel_mask(y.shape[-2], y.shape[-1], m, seed, b)
                x_adv = attack(fwd, x, selected_labels(y, mask, ignore))
                with torch.no_grad():
                    pred_adv = class_map(fwd(x_adv))
                c, v = selected_accuracy(pred, y, mask, ignore)
                a, _ = selected_accuracy(pred_adv, y, mask, ignore)
                keep = v > 0
                clean[m] += (c[keep].double() / v[keep]).tolist()
                adv[m] += (a[keep].double() / v[keep]).tolist()

    def mean(vals: List[float]) -> Optional[float]:
        return float(sum(vals) / len(vals)) if vals else None
    return {"M": [int(m) for m in sizes], "clean_acc": [mean(clean[m]) for m in sizes],
            "adv_acc": [mean(adv[m]) for m in sizes], "images": [len(clean[m]) for m in sizes],
            "seed": int(seed), "attack": {"name": "pgd", "eps": eps, "alpha": alpha, "steps": steps,
                                          "random_start": False, "eps_unit": "1/255"},
            "measure": "pixel accuracy of the selected valid pixels, mean over images"}


# ---------------------------------------------------------------- single-task vs all-task attacks

def task_sets(model_tasks: Sequence[str], target_tasks: Sequence[str], main: str, each: bool = False
              ) -> List[List[str]]:
    """[[main], every task with a target] (+ each such task alone when `each`), without repeats."""
    tasks = [t for t in model_tasks if t in target_tasks]
    sets = [[main], tasks] + ([[t] for t in tasks] if each else [])
    out: List[List[str]] = []
    for s in sets:
        if s not in out:
            out.append(s)
    return out


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML flow syntax: paths with odd characters stay one value


def pick_metrics(section: Dict[str, dict]) -> Dict[str, Dict[str, Optional[float]]]:
    """{task: {mIoU, aAcc} or {mae, rmse}} of a metrics.json ``tasks`` section."""
    out = {}
    for task, m in section.items():
        keys = SEG_METRICS if "mIoU" in m else REG_METRICS
        out[task] = {k: (float(m[k]) if isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) else None)
                     for k in keys}
    return out


def task_attack_table(config_path: str, overrides: Sequence[str], checkpoint: str, out_dir: str,
                      sets: Sequence[Sequence[str]], num_images: Optional[int] = None, eps: float = 8.0,
                      alpha: float = 2.0, steps: int = 5) -> dict:
    """Analysis 3: one ``run_test`` per attacked-task set (the ``multitask`` attack, no random start),
    results in <out_dir>/tasks/<set>/; {"tasks", "clean", "rows": [{"attacked", "metrics"}], "attack"}."""
    from utils.config import load_config
    from .evaluator import run_test
    attack = {"name": "multitask", "label": "mt", "steps": steps, "alpha": alpha, "random_start": False}
    rows, clean, tasks = [], None, None
    for s in sets:
        extra = [_override("test.attack_tasks", list(s)), _override("test.attacks", [attack]),
                 _override("test.eps", [eps]), _override("test.checkpoint", checkpoint),
                 _override("test.result_dir", os.path.join(out_dir, "tasks", "+".join(s))),
                 _override("test.num_images", num_images), "test.save_images=false", "test.examples=0",
                 "test.plots=false"]
        metrics = run_test(load_config(config_path, [*overrides, *extra]))
        key = next(iter(metrics["attacks"]))
        if clean is None:
            clean = pick_metrics(metrics["clean"]["tasks"])
            tasks = list(clean)
        rows.append({"attacked": list(s), "metrics": pick_metrics(metrics["attacks"][key]["tasks"])})
    return {"tasks": tasks or [], "clean": clean or {}, "rows": rows,
            "attack": {**attack, "eps": eps, "eps_unit": "1/255"}}


def table_markdown(table: dict) -> str:
    """The task table as markdown: a clean row, then one row per attacked-task set."""
    cols = [(t, k) for t in table["tasks"] for k in table["clean"][t]]
    head = "| attacked | " + " | ".join(f"{t} {k}" for t, k in cols) + " |"
    sep = "|---|" + "---|" * len(cols)

    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"
    lines = [head, sep, "| (clean) | " + " | ".join(fmt(table["clean"][t][k]) for t, k in cols) + " |"]
    for r in table["rows"]:
        lines.append(f"| {'+'.join(r['attacked'])} | " + " | ".join(fmt(r["metrics"][t][k]) for t, k in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots (matplotlib imported lazily)

def plot_grad_norm(data: dict, path: Optional[str] = None):
    """Log-log plot of a grad_norm.json dict: line "grad_norm" (M vs grad_norm) and the reference
    "1/sqrt(M)" through the first point; written to `path` when given. Returns the Figure."""
    from .plots import _figure, save_figure
    fig, (ax,) = _figure(5.5, 4.2)
    ms, g = data["M"], data["grad_norm"]
    ax.plot(ms, g, marker="o", markersize=4, label="grad_norm")
    if ms:
        ax.plot(ms, [g[0] * math.sqrt(ms[0] / m) for m in ms], linestyle="--", color="gray", label="1/sqrt(M)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("M (attacked pixels)")
    ax.set_ylabel("||grad_x||_2 / M")
    ax.set_title(f"input-gradient norm per output ({data.get('num_images', '?')} images)")
    ax.legend()
    if path:
        save_figure(fig, path)
    return fig


def plot_robust_accuracy(data: dict, path: Optional[str] = None):
    """robust_accuracy.json dict: lines "clean" and "pgd" (accuracy of the selected pixels vs M, log x);
    None values are gaps. Written to `path` when given. Returns the Figure."""
    from .plots import _figure, _nan, save_figure
    fig, (ax,) = _figure(5.5, 4.2)
    for name, key in (("clean", "clean_acc"), ("pgd", "adv_acc")):
        ax.plot(data["M"], [_nan(v) for v in data[key]], marker="o", markersize=4, label=name)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("M (attacked pixels)")
    ax.set_ylabel("pixel accuracy of the attacked pixels")
    ax.set_title("robust accuracy vs output dimension")
    ax.legend(loc="lower right")
    if path:
        save_figure(fig, path)
    return fig


def write_json(data: dict, path: str) -> None:
    """JSON through a temporary file (complete or untouched)."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1)
