"""The robustness demo (README command (a)): train four methods on the built-in synthetic dataset with
one small budget, evaluate each clean and under attack, print one table.

``python3 tools/demo.py [--dry-run]``

Stages: train none / sat / ddcat / pirat, test the four, table. Each stage runs the experiment's own
launcher (tool_train/synthetic/demo_<method>.sh, tool_test/...), whose tqdm bars show its progress
and whose log lands in the experiment folder. A re-run reuses what is finished:

- training: ``model/last.pth`` at the config's final epoch, trained with the same config (test
  settings and run bookkeeping aside) is kept; an earlier epoch of the same config is continued
  (``train.resume=auto``); a checkpoint of another config is replaced (``train.overwrite=true``);
- evaluation: kept when ``result/metrics.json`` and the per-image counts of this very checkpoint
  and these test settings (engine/eval_resume.merged_counts_path) are there; an interrupted one
  resumes from its per-image counts (test.py does that by itself).

The table (mIoU in %) goes to the console and to exp/synthetic/demo/table.md and table.json, with the
wall time of every stage and the demo's acceptance checks. Configs: config/synthetic/synthetic_demo_*.yaml
(shared budget: config/_base_/demo/synthetic_demo.yaml). Errors: one line, exit code 2 (bad config)
or the failing launcher's code; earlier results are never touched by the runner itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.config import load_config  # noqa: E402
from utils.errors import SetupError  # noqa: E402

# (method, row name in the table); the order is the stage order
METHODS: List[Tuple[str, str]] = [("none", "clean training"), ("sat", "SAT"), ("ddcat", "DDC-AT"),
                                  ("pirat", "PIR-AT-style (100% adv.)")]
OUT_DIR = os.path.join("exp", "synthetic", "demo")
# keys that do not change the trained weights: run bookkeeping, and the evaluation settings
IGNORED_TRAIN_KEYS = ("train.resume", "train.overwrite", "train.print_freq", "data.workers", "test")
SEA_LABEL = "sea"


def config_path(method: str) -> str:
    return os.path.join("config", "synthetic", f"synthetic_demo_{method}.yaml")


def launcher(kind: str, method: str) -> str:
    """tool_train/... or tool_test/... script of a demo method (kind: train | test)."""
    return os.path.join(f"tool_{kind}", "synthetic", f"demo_{method}.sh")


# ------------------------------------------------------------------ stage decisions (pure, tested)
def _drop(cfg: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg.get(p, {})
    if isinstance(cfg, dict):
        cfg.pop(last, None)


def training_identity(cfg: dict) -> dict:
    """The parts of a resolved config that determine the trained weights."""
    out = json.loads(json.dumps(cfg))  # deep copy of plain data
    for key in IGNORED_TRAIN_KEYS:
        _drop(out, key)
    return out


def train_decision(cfg: dict, saved: Optional[dict]) -> Tuple[str, List[str]]:
    """What the training stage does, given the resolved config and what ``model/last.pth`` holds
    (``{"epoch": int, "config": dict}``; None: no checkpoint; ``{"error": str}``: unreadable).

    Returns (action, launcher overrides), action one of: train (fresh), reuse (finished, same
    config), resume (same config, earlier epoch), retrain (other config or unreadable file)."""
    if saved is None:
        return "train", []
    if "error" in saved or training_identity(saved.get("config", {})) != training_identity(cfg):
        return "retrain", ["train.overwrite=true"]
    if int(saved.get("epoch", -1)) >= int(cfg["train"]["epochs"]):
        return "reuse", []
    return "resume", ["train.resume=auto"]


def read_saved_training(exp_dir: str) -> Optional[dict]:
    """``{"epoch", "config"}`` of ``<exp_dir>/model/last.pth``; None when there is no checkpoint at all,
    ``{"error": msg}`` when it cannot be read (the stage then trains afresh)."""
    model = os.path.join(exp_dir, "model")
    last = os.path.join(model, "last.pth")
    if not os.path.isfile(last):
        # other checkpoints but no last.pth: not a run this runner can trust; start over
        others = os.path.isdir(model) and any(f.endswith(".pth") for f in os.listdir(model))
        return {"error": "model/ holds checkpoints but no last.pth"} if others else None
    from utils.checkpoint import read_checkpoint
    try:
        ckpt = read_checkpoint(last)
        return {"epoch": int(ckpt["epoch"]), "config": ckpt["config"]}
    except (SetupError, KeyError, TypeError, ValueError) as e:
        return {"error": str(e)}


def eval_finished(cfg) -> bool:
    """True when the result folder holds a finished evaluation of this checkpoint with these settings."""
    from engine import eval_resume
    ckpt = cfg.test.checkpoint or os.path.join(cfg.exp_dir, "model", "last.pth")
    if not (os.path.isfile(ckpt) and os.path.isfile(os.path.join(eval_resume.result_dir(cfg), "metrics.json"))):
        return False
    n = cfg.data.synthetic.num_val  # the demo's val split is the synthetic one: its size is known
    if cfg.test.num_images is not None:
        n = min(n, cfg.test.num_images)
    return os.path.isfile(eval_resume.merged_counts_path(cfg, ckpt, n))


# ------------------------------------------------------------------ the table (pure, tested)
def _label(attack: str) -> str:
    return {"bim2": "BIM-2 (DDC-AT)", "pgd10": "PGD-10", SEA_LABEL: "SEA"}.get(attack, attack)


def table_columns(eps: Sequence[float], attacks: Sequence[str]) -> List[Tuple[str, str]]:
    """(metrics key, header) per column: clean, then every attack at every eps (eps-major)."""
    cols = [("clean", "clean")]
    for e in eps:
        e = f"{float(e):g}"
        cols += [(f"{a}@{e}", f"{_label(a)} {e}/255") for a in attacks]
    return cols


def table_rows(metrics: Dict[str, dict], columns: Sequence[Tuple[str, str]]) -> Dict[str, Dict[str, Optional[float]]]:
    """{row name: {metrics key: mIoU in % or None}} from each method's metrics.json content."""
    rows = {}
    for name, m in metrics.items():
        row = {"clean": 100 * m["clean"]["mIoU"]}
        for key, _ in columns[1:]:
            a = m.get("attacks", {}).get(key)
            row[key] = None if a is None else 100 * a["mIoU"]
        rows[name] = row
    return rows


def markdown_table(rows: Dict[str, Dict[str, Optional[float]]], columns: Sequence[Tuple[str, str]]) -> str:
    """A markdown table: one row per method, mIoU with two decimals ("-" where missing)."""
    lines = ["| method | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = ["-" if row.get(k) is None else f"{row[k]:.2f}" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance(rows: Dict[str, Dict[str, Optional[float]]], eps: float = 8.0, clean_row: str = METHODS[0][1],
               robust_row: str = METHODS[-1][1], margin: float = 15.0) -> List[Tuple[str, bool]]:
    """The demo's checks (mIoU points): per method SEA <= PGD-10 <= BIM-2 at `eps`; the robust row's
    SEA at least `margin` above the clean row's, its clean mIoU at most `margin` below."""
    e = f"{eps:g}"
    out = []

    def le(a: Optional[float], b: Optional[float]) -> bool:
        return a is not None and b is not None and a <= b

    for name, r in rows.items():
        sea, pgd, bim = r.get(f"{SEA_LABEL}@{e}"), r.get(f"pgd10@{e}"), r.get(f"bim2@{e}")
        out.append((f"{name}: SEA <= PGD-10 <= BIM-2 at {e}/255", le(sea, pgd) and le(pgd, bim)))
    if clean_row in rows and robust_row in rows:
        c, r = rows[clean_row], rows[robust_row]
        out.append((f"{robust_row}: SEA {e}/255 >= {clean_row} + {margin:g}",
                    le(c.get(f"{SEA_LABEL}@{e}"), None if r.get(f"{SEA_LABEL}@{e}") is None
                       else r[f"{SEA_LABEL}@{e}"] - margin)))
        out.append((f"{robust_row}: clean >= {clean_row} - {margin:g}", le(c["clean"] - margin, r["clean"])))
    return out


def format_seconds(s: Optional[float], earlier: Optional[float] = None) -> str:
    """"1 min 15.2 s"; None: the stage was reused (with the time it took when it ran, if known)."""
    if s is None:
        return "reused" + ("" if earlier is None else f" (ran in {format_seconds(earlier)})")
    return f"{int(s // 60)} min {s % 60:04.1f} s" if s >= 60 else f"{s:.1f} s"


# ------------------------------------------------------------------ running
@dataclass
class Stage:
    """One stage's record: what it did and how long it took (None seconds: reused)."""
    name: str
    action: str
    seconds: Optional[float] = None
    earlier: Optional[float] = None  # a reused stage: its time when it ran (from the previous table.json)


def earlier_times(path: str) -> Dict[str, float]:
    """{stage: seconds when it last ran} from a previous table.json (empty if none or unreadable)."""
    try:
        with open(path) as f:
            stages = json.load(f)["stages"]
        return {s["stage"]: s["seconds"] if s["seconds"] is not None else s.get("earlier")
                for s in stages if isinstance(s, dict) and "stage" in s}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def run_launcher(script: str, overrides: Sequence[str]) -> None:
    """Run a launcher from the repository root (argument list, no shell string); raise on failure."""
    rc = subprocess.call(["sh", script, *overrides], cwd=ROOT)
    if rc:
        print(f"error: stage {script} {' '.join(overrides)} failed (exit code {rc}); see the newest log in "
              f"its exp_dir; finished stages are kept, re-run to continue", file=sys.stderr)
        raise SystemExit(rc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what each stage would do, run nothing")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    try:
        cfgs = {m: load_config(config_path(m)) for m, _ in METHODS}
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m, _ in METHODS:
        for kind in ("train", "test"):
            if not os.path.isfile(launcher(kind, m)):
                print(f"error: launcher {launcher(kind, m)} not found", file=sys.stderr)
                return 2
    stages: List[Stage] = []
    before = earlier_times(os.path.join(OUT_DIR, "table.json"))
    t_all = time.monotonic()
    total = 2 * len(METHODS) + 1
    for i, (m, _) in enumerate(METHODS):  # training stages
        cfg = cfgs[m]
        action, overrides = train_decision(cfg.to_dict(), read_saved_training(cfg.exp_dir))
        print(f"\n=== stage {i + 1}/{total}: train {m} ({cfg.exp_dir}): {action}", flush=True)
        stage = Stage(f"train {m}", action, earlier=before.get(f"train {m}"))
        if action != "reuse" and not args.dry_run:
            t = time.monotonic()
            run_launcher(launcher("train", m), overrides)
            stage.seconds = time.monotonic() - t
        stages.append(stage)
    for i, (m, _) in enumerate(METHODS):  # evaluation stages
        cfg = cfgs[m]
        action = "reuse" if eval_finished(cfg) else "evaluate"
        print(f"\n=== stage {len(METHODS) + i + 1}/{total}: test {m}: {action}", flush=True)
        stage = Stage(f"test {m}", action, earlier=before.get(f"test {m}"))
        if action != "reuse" and not args.dry_run:
            t = time.monotonic()
            run_launcher(launcher("test", m), [])
            stage.seconds = time.monotonic() - t
        stages.append(stage)
    if args.dry_run:
        return 0
    print(f"\n=== stage {total}/{total}: table", flush=True)
    first = cfgs[METHODS[0][0]]
    attacks = [a if isinstance(a, str) else a.get("label", a["name"]) for a in first.test.attacks]
    columns = table_columns(first.test.eps, attacks)
    metrics = {}
    for m, name in METHODS:
        path = os.path.join(cfgs[m].test.result_dir or os.path.join(cfgs[m].exp_dir, "result"), "metrics.json")
        try:
            with open(path) as f:
                metrics[name] = json.load(f)
        except (OSError, ValueError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    rows = table_rows(metrics, columns)
    wall = time.monotonic() - t_all
    write_report(rows, columns, stages, wall, first)
    return 0


def write_report(rows, columns, stages: List[Stage], wall: float, cfg) -> None:
    """Print the table, timings and checks; write them to OUT_DIR/table.md and table.json."""
    sea = next((a for a in cfg.test.attacks if (a == SEA_LABEL or (isinstance(a, dict) and a.get("name") == SEA_LABEL))), None)
    sea_steps = sea.get("steps", 300) if isinstance(sea, dict) else 300
    n = min(cfg.data.synthetic.num_val, cfg.test.num_images or cfg.data.synthetic.num_val)
    header = (f"mIoU (%) on the first {n} synthetic val images; BIM-2: 2 steps of 2.55/255, no random start; "
              f"PGD-10: 10 steps of 2/255, random start; SEA: worst case per image over APGD mask-ce-bal / "
              f"mask-ce / JS with {sea_steps} iterations each (the paper's: 300)")
    table = markdown_table(rows, columns)
    checks = acceptance(rows)
    timing = "\n".join(f"- {s.name}: {format_seconds(s.seconds, s.earlier)}" for s in stages) + \
        f"\n- whole demo (this run): {format_seconds(wall)}"
    text = (f"{header}\n\n{table}\n\nChecks:\n" + "\n".join(f"- [{'x' if ok else ' '}] {c}" for c, ok in checks)
            + f"\n\nWall time per stage ({os.cpu_count()} CPU cores, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}):\n{timing}\n")
    print("\n" + text)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, content in (("table.md", text), ("table.json", json.dumps(
            {"header": header, "columns": [list(c) for c in columns], "rows": rows,
             "checks": [{"check": c, "ok": ok} for c, ok in checks],
             "stages": [{"stage": s.name, "action": s.action, "seconds": s.seconds, "earlier": s.earlier}
                        for s in stages],
             "wall_seconds": wall, "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
             "platform": platform.platform()}, indent=1))):
        tmp = os.path.join(OUT_DIR, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, os.path.join(OUT_DIR, name))
    print(f"wrote {os.path.join(OUT_DIR, 'table.md')} and table.json")


if __name__ == "__main__":
    sys.exit(main())
