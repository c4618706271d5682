"""From gathered per-image counts to metrics.json, printed tables, example panels and tensorboard."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from utils.atomic import atomic_write, named_write
from utils.metrics import summarize, summarize_regression, worst_case

Columns = Dict[str, np.ndarray]  # "index", "inter", "union", "target", "reg_<task>" -> per-image rows
SEG_METRICS = ("mIoU", "mAcc", "aAcc")


def task_metrics(cols: Columns, seg_task: Optional[str], reg_tasks: Sequence[str]) -> Dict[str, dict]:
    """Per-task metrics of a multitask run: segmentation mIoU/mAcc/aAcc; every regression task's
    mae (L1), mse (L2) and rmse over its valid pixels, pooled over the images."""
    out: Dict[str, dict] = {}
    if seg_task is not None:
        seg = summarize(cols["inter"], cols["union"], cols["target"])
        out[seg_task] = {k: seg[k] for k in SEG_METRICS}
    for t in reg_tasks:
        out[t] = summarize_regression(cols[f"reg_{t}"])
    return out


def _compact(m: dict) -> dict:
    """A worst-case result in the metrics.json shape (pooled values of the chosen assignment)."""
    chosen = m["chosen"]
    counts = np.bincount(np.asarray(m["choice"], dtype=np.int64), minlength=len(m["labels"])).tolist()
    return {"mIoU": m["mIoU"], "mAcc": chosen["mAcc"], "aAcc": m["aAcc"], "mIoU_img": m["mIoU_img"],
            "aAcc_pooled": chosen["aAcc"], "iou_per_class": chosen["iou_per_class"],
            "attacks": m["labels"], "images_per_attack": counts}


def skip_savings(member_cols: Sequence[Columns], member_passes: Sequence[Sequence[int]]) -> dict:
    """What ``skip_solved`` saved an ensemble: per member, the images it skipped (an earlier member had
    brought them to 0 pixel accuracy: the rule the evaluator applied, found again from the counts),
    and the passes saved, each skipped image costed at the member's mean passes per image it did run
    (exact for members of fixed cost: PAdam, the PGD family, Houdini; an estimate for the ones that
    stop early: APGD with early_stop, DAG). None where a member ran on no image."""
    n = member_cols[0]["inter"].shape[0]
    solved = np.zeros(n, dtype=bool)
    skipped, saved_f, saved_b = [], 0.0, 0.0
    known = True
    for cols, (f, b) in zip(member_cols, member_passes):
        k = int(solved.sum())
        skipped.append(k)
        ran = n - k
        if k and ran:
            saved_f, saved_b = saved_f + k * f / ran, saved_b + k * b / ran
        elif k:
            known = False
        solved |= (cols["target"].sum(1) > 0) & (cols["inter"].sum(1) == 0)
    return {"skipped_images": skipped,
            "saved_forward_passes": round(saved_f) if known else None,
            "saved_backward_passes": round(saved_b) if known else None}


def aggregate(gathered: Dict[str, Columns], runs, seconds: Dict[str, float], passes: Dict[str, Sequence[int]],
              names: List[str], tasks: Optional[Tuple[Optional[str], Sequence[str]]] = None) -> Tuple[dict, dict, dict]:
    """(clean, attacks, worst_case) sections of metrics.json from the gathered columns.

    `runs` are the evaluator's AttackRuns (key, group, eps, tasks); `tasks` = (segmentation task name
    or None, regression tasks) for a multitask model adds a ``tasks`` section to clean and every attack.
    """
    def one(key: str) -> dict:
        g = gathered[key]
        m = dict(summarize(g["inter"], g["union"], g["target"]), seconds=seconds[key])
        if tasks is not None:
            m["tasks"] = task_metrics(g, *tasks)
        return m

    clean = one("clean")
    attacks: Dict[str, dict] = {}
    for r in runs:
        f, b = passes[r.key]
        attacks[r.key] = dict(one(r.key), forward_passes=f, backward_passes=b)
        if tasks is not None:
            attacks[r.key]["attacked_tasks"] = list(r.tasks)
            for m in attacks[r.key]["tasks"].values():
                m.update(forward_passes=f, backward_passes=b)
    target = gathered["clean"]["target"]

    def combine(members: list) -> dict:
        inter = np.stack([gathered[r.key]["inter"] for r in members])
        union = np.stack([gathered[r.key]["union"] for r in members])
        res = _compact(worst_case(inter, union, target, [r.key for r in members], names))
        res.update(forward_passes=sum(passes[r.key][0] for r in members),
                   backward_passes=sum(passes[r.key][1] for r in members),
                   seconds=sum(seconds[r.key] for r in members))
        return res

    by_group: Dict[str, list] = {}
    by_eps: Dict[str, list] = {}
    for r in runs:
        by_group.setdefault(r.group, []).append(r)
        by_eps.setdefault(r.eps, []).append(r)
    for group, members in by_group.items():
        if len(members) > 1:  # an ensemble: worst case over its members
            attacks[group] = combine(members)
            if getattr(members[0], "skip_solved", False):
                attacks[group].update(skip_savings([gathered[r.key] for r in members],
                                                   [passes[r.key] for r in members]))
    worst = {e: combine(members) for e, members in by_eps.items()}  # over every attack at that eps
    return clean, attacks, worst


def format_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pct(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def num(v: Optional[float]) -> str:
    return "-" if v is None or v != v else f"{v:.4g}"


def task_table(runs: Dict[str, dict]) -> Optional[str]:
    """Rows: runs; columns: segmentation mIoU and each regression task's mae / rmse (multitask only)."""
    with_tasks = {k: m["tasks"] for k, m in runs.items() if "tasks" in m}
    if not with_tasks:
        return None
    first = next(iter(with_tasks.values()))
    header = ["run"]
    for t, m in first.items():
        header += [f"{t} mIoU"] if "mIoU" in m else [f"{t} mae", f"{t} rmse"]
    rows = [header]
    for k, tm in with_tasks.items():
        row = [k]
        for t, m in tm.items():
            row += [pct(m["mIoU"])] if "mIoU" in m else [num(m["mae"]), num(m["rmse"])]
        rows.append(row)
    return format_table(rows)


def _write_json(data: dict, path: str) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1)


def write_plots(metrics: dict, folder: str, writer, log, draw: bool = True) -> Optional[dict]:
    """robustness.json (with its ``robustness/...`` tensorboard scalars) and, if `draw`, robustness.png
    and per_class.png into `folder` (engine/plots.py); nothing without attacks. Returns the curves."""
    from .plots import plot_curves, plot_per_class, robustness_curves, write_curve_scalars
    curves = robustness_curves(metrics)
    if curves is None:
        return None
    _write_json(curves, os.path.join(folder, "robustness.json"))
    write_curve_scalars(curves, writer)
    if not draw:
        return curves
    if importlib.util.find_spec("matplotlib") is None:  # the numbers are written; only the pictures need it
        log.warning("matplotlib is not installed: robustness.png and per_class.png not drawn")
        return curves
    plot_curves(curves, os.path.join(folder, "robustness.png"))
    plot_per_class(metrics, os.path.join(folder, "per_class.png"))
    return curves


def write_results(cfg, metrics: dict, examples: Dict[str, list], folder: str, log) -> None:
    """metrics.json, robustness curves and per-class chart (``write_plots``), the resolved config and
    example panels into `folder` (the evaluation's staging folder); printed tables; tensorboard
    scalars and panels under ``<exp_dir>/events``."""
    from PIL import Image
    from tensorboardX import SummaryWriter

    from utils.config import save_config
    os.makedirs(folder, exist_ok=True)
    _write_json(metrics, os.path.join(folder, "metrics.json"))
    save_config(cfg, os.path.join(folder, "config.yaml"))
    runs = {"clean": metrics["clean"], **metrics["attacks"],
            **{f"worst@{k}": v for k, v in metrics["worst_case"].items()}}
    rows = [["run", "mIoU", "mAcc", "aAcc", "mIoU/img", "fwd", "bwd", "sec"]]
    for k, m in runs.items():
        rows.append([k, pct(m["mIoU"]), pct(m["mAcc"]), pct(m["aAcc"]), pct(m.get("mIoU_img")),
                     str(m.get("forward_passes", "-")), str(m.get("backward_passes", "-")), f"{m.get('seconds', 0):.1f}"])
    log.info("results (%; worst-case aAcc is the mean over images of the per-image minimum):\n" + format_table(rows))
    tt = task_table(runs)
    if tt:
        log.info("per-task results (segmentation mIoU in %; regression errors in target units):\n" + tt)
    cls_rows = [["class"] + list(runs)]
    for c, name in enumerate(metrics["class_names"]):
        cls_rows.append([name] + [pct(m["iou_per_class"][c]) for m in runs.values()])
    log.info("per-class IoU (%):\n" + format_table(cls_rows))
    with SummaryWriter(os.path.join(cfg.exp_dir, "events")) as w:
        write_plots(metrics, folder, w, log, draw=cfg.test.plots)
        for k, m in runs.items():
            for key in SEG_METRICS:
                w.add_scalar(f"test/{k}/{key}", m[key], 0)
            for t, tm in m.get("tasks", {}).items():
                for key in ("mae", "rmse"):
                    if key in tm:
                        w.add_scalar(f"test/{k}/{t}/{key}", tm[key], 0)
        for run, panels in examples.items():
            for j, panel in enumerate(panels):
                path = os.path.join(folder, "examples", run, f"{j}.png")
                with named_write(path):
                    Image.fromarray(panel).save(path)
                w.add_image(f"examples/{run}/{j}", panel, 0, dataformats="HWC")
