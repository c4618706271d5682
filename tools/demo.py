"""The robustness demo (README command (a)): train four methods on the built-in synthetic dataset with
one small budget, evaluate each clean and under attack, print one table.

``python3 tools/demo.py [--dry-run] [--jobs N] [--seeds 0-4] [--write-reference]``

Stages: train none / sat / ddcat / pirat, then test each. Each stage runs the experiment's own launcher
(tool_train/synthetic/demo_<method>.sh, tool_test/...) as a child process with one thread, whose log
lands in the experiment folder; `--jobs` stages run side by side (default: one per CPU core, at most
four; a method's test follows its training), each with a progress bar read from its launcher's tqdm
output. One thread per stage whatever the machine, so the numbers do not depend on its core count.
A re-run reuses what is finished:

- training: ``model/last.pth`` at the config's final epoch, trained with the same config (test
  settings and run bookkeeping aside) is kept; an earlier epoch of the same config is continued
  (``train.resume=auto``); a checkpoint of another config is replaced (``train.overwrite=true``);
- evaluation: kept when its training is kept and ``result/metrics.json`` and the per-image counts of
  this very checkpoint and these test settings (engine/eval_resume.merged_counts_path) are there; an
  interrupted one resumes from its per-image counts (test.py does that by itself).

Several ``--seeds`` train each method once per seed (seed s > 0 into exp/synthetic/demo_<method>_seed<s>).
The table (mIoU in %, one per seed, and the mean ± std over them) goes to the console and to
exp/synthetic/demo/table.md and table.json, every cell marked ``in`` or ``OUT`` of the reference range
(tools/demo_reference.json, the README's table: max(4 std, 2 points) around the mean over seeds 0-4;
``--write-reference`` rewrites it from this run's seeds), with the wall time of every stage and the
demo's checks, findings that held for every reference seed (a failing one: exit code 1, named);
exp/synthetic/demo/robustness.png overlays the four worst-case robustness curves of the first seed
(tools/compare_curves.py). Configs:
config/synthetic/synthetic_demo_*.yaml (shared budget: config/_base_/demo/synthetic_demo.yaml).
Errors: one line, exit code 2 (bad config) or the failing launcher's code, after the last lines of
its output; a failure or Ctrl-C stops the other running stages (a training resumes from its last
checkpoint on the next run); earlier results are never touched by the runner itself.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from utils.atomic import atomic_write  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import SetupError  # noqa: E402

# (method, row name in the table); the order is the stage order
METHODS: List[Tuple[str, str]] = [("none", "clean training"), ("sat", "SAT"), ("ddcat", "DDC-AT"),
                                  ("pirat", "PIR-AT-style (100% adv.)")]
OUT_DIR = os.path.join("exp", "synthetic", "demo")
# keys that do not change the trained weights: run bookkeeping, and the evaluation settings
IGNORED_TRAIN_KEYS = ("train.resume", "train.overwrite", "train.print_freq", "data.workers", "test")
SEA_LABEL = "sea"
# mean and std of every cell over the README's seeds (written by --write-reference)
REFERENCE = os.path.join("tools", "demo_reference.json")
WITHIN_STDS, WITHIN_FLOOR = 4.0, 2.0  # a run's cell is "in" when within max(4 std, 2 points) of the mean


def config_path(method: str) -> str:
    return os.path.join("config", "synthetic", f"synthetic_demo_{method}.yaml")


def seed_overrides(seed: int, exp_dir: str) -> List[str]:
    """Launcher overrides of one demo seed: none for seed 0 (the configs as written), else the training
    seed and an experiment folder of its own (``<exp_dir>_seed<s>``, e.g. exp/synthetic/demo_sat_seed1)."""
    return [] if seed == 0 else [f"seed={seed}", f"exp_dir={exp_dir}_seed{seed}"]


def demo_overrides(method: str, seed: int) -> List[str]:
    """The launcher overrides of one demo method at one seed (``seed_overrides`` of its config's exp_dir)."""
    return seed_overrides(seed, load_config(config_path(method)).exp_dir) if seed else []


def load_demo_config(method: str, seed: int = 0):
    """The resolved config of one demo method at one seed (its launcher overrides applied)."""
    return load_config(config_path(method), demo_overrides(method, seed))


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"`` or ``"0-4"`` -> [0, 1, 2] / [0, 1, 2, 3, 4]; ValueError on anything else."""
    seeds: List[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"--seeds: {text!r} is not a list like 0,1,2 or a range like 0-4")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds: {text!r} names no seed or a seed twice")
    return seeds


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


def cell_text(value: Optional[float], ref: Optional[Sequence[float]] = None) -> str:
    """One cell: mIoU with two decimals ("-" if missing), marked in / outside the reference range."""
    if value is None:
        return "-"
    if ref is None:
        return f"{value:.2f}"
    return f"{value:.2f} {'in' if within(value, ref) else 'OUT'}"


def _table_head(columns: Sequence[Tuple[str, str]]) -> List[str]:
    return ["| method | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---:|" * len(columns)]


def markdown_table(rows: Dict[str, Dict[str, Optional[float]]], columns: Sequence[Tuple[str, str]],
                   reference: Optional[Dict[str, Dict[str, Sequence[float]]]] = None) -> str:
    """A markdown table: one row per method, mIoU with two decimals ("-" where missing); with a
    reference ({row: {key: (mean, std)}}), each cell marked ``in`` or ``OUT`` of its range."""
    lines = _table_head(columns)
    for name, row in rows.items():
        ref = (reference or {}).get(name, {})
        cells = [cell_text(row.get(k), ref.get(k) if reference is not None else None) for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stats_table(stats: Dict[str, Dict[str, Sequence[float]]], columns: Sequence[Tuple[str, str]]) -> str:
    """A markdown table of ``mean ± std`` cells ({row: {key: (mean, std)}}), one decimal."""
    lines = _table_head(columns)
    for name, row in stats.items():
        cells = ["-" if row.get(k) is None else f"{row[k][0]:.1f} ± {row[k][1]:.1f}" for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell_stats(runs: Dict[int, Dict[str, Dict[str, Optional[float]]]]) -> Dict[str, Dict[str, List[float]]]:
    """{row: {key: [mean, std]}} over the seeds' tables (std: sample standard deviation, n - 1; 0 for
    one seed); a cell missing in any seed is left out."""
    first = next(iter(runs.values()))
    out: Dict[str, Dict[str, List[float]]] = {}
    for name, row in first.items():
        out[name] = {}
        for key in row:
            values = [r[name][key] for r in runs.values() if r.get(name, {}).get(key) is not None]
            if len(values) != len(runs):
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            out[name][key] = [mean, var ** 0.5]
    return out


def within(value: float, ref: Sequence[float]) -> bool:
    """A run's cell is within the reference range: |value - mean| <= max(4 std, 2 points)."""
    mean, std = ref
    return abs(value - mean) <= max(WITHIN_STDS * std, WITHIN_FLOOR)


def cell_record(value: Optional[float], ref: Optional[Sequence[float]]) -> dict:
    """table.json's record of one cell: the run's value, the reference (mean, std) and whether the
    value is within its range (None where either is missing)."""
    return {"value": value, "reference_mean": None if ref is None else ref[0],
            "reference_std": None if ref is None else ref[1],
            "within": None if value is None or ref is None else within(value, ref)}


def write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all (a temporary file, then a rename)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def read_reference(path: str) -> Optional[dict]:
    """The reference table (``{"rows": {row: {key: [mean, std]}}, "seeds": [...], "machine": str, ...}``)
    or None when there is none; SetupError naming the file when it is unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            ref = json.load(f)
        for row in ref["rows"].values():
            for mean, std in row.values():
                float(mean), float(std)
        return ref
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SetupError(f"{path}: not a demo reference table ({e})") from e


def acceptance(rows: Dict[str, Dict[str, Optional[float]]], eps: float = 8.0, clean_row: str = METHODS[0][1],
               margin: float = 10.0) -> List[Tuple[str, bool]]:
    """The demo's checks (mIoU points), findings that held for every seed of the reference and under
    every CPU kernel set tried (docs/demo.md, "The demo's checks"): per method SEA <= PGD-10 <= BIM-2 at
    `eps`; every adversarially trained row's SEA at `eps` at least `margin` above the clean row's
    (smallest gap seen: 20.4 points)."""
    e = f"{eps:g}"
    out = []

    def le(a: Optional[float], b: Optional[float]) -> bool:
        return a is not None and b is not None and a <= b

    for name, r in rows.items():
        sea, pgd, bim = r.get(f"{SEA_LABEL}@{e}"), r.get(f"pgd10@{e}"), r.get(f"bim2@{e}")
        out.append((f"{name}: SEA <= PGD-10 <= BIM-2 at {e}/255", le(sea, pgd) and le(pgd, bim)))
    if clean_row in rows:
        c = rows[clean_row].get(f"{SEA_LABEL}@{e}")
        for name, r in rows.items():
            if name != clean_row:
                sea = r.get(f"{SEA_LABEL}@{e}")
                out.append((f"{name}: SEA {e}/255 >= {clean_row} + {margin:g}",
                            le(c, None if sea is None else sea - margin)))
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


# tqdm's console line: "<desc>: <pct>%|<bar>| <n>/<total> [...]"; training bars are "epoch e/E"
PROGRESS = re.compile(r"(?P<desc>[^\r\n:|]*?): *\d+%\|[^|\r\n]*\| *(?P<n>\d+)/(?P<total>\d+)")
EPOCH = re.compile(r"epoch (\d+)/(\d+)$")
# longest training first, so that the lanes finish close together (none is the cheapest)
SCHEDULE = ("ddcat", "pirat", "sat", "none")
THREADS_PER_STAGE = 1  # fixed, so the numbers do not depend on the machine's core count


def stage_fraction(text: str) -> Optional[float]:
    """The fraction of a stage done, from the last tqdm update in `text` (a piece of a launcher's
    console output): n/total of the bar, across epochs for a training bar ("epoch e/E"); None if
    `text` holds no bar."""
    last = None
    for last in PROGRESS.finditer(text):
        pass
    if last is None:
        return None
    frac = int(last["n"]) / max(int(last["total"]), 1)
    epoch = EPOCH.search(last["desc"].strip())
    if epoch:
        frac = (int(epoch[1]) - 1 + frac) / max(int(epoch[2]), 1)
    return min(max(frac, 0.0), 1.0)


def default_jobs() -> int:
    """Stages run at once: one per usable CPU core, at most one per method."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(len(METHODS), cores))


class StageFailed(Exception):
    def __init__(self, script: str, overrides: Sequence[str], code: int, tail: Sequence[str]):
        super().__init__(f"stage {script} {' '.join(overrides)} failed (exit code {code})")
        self.script, self.overrides, self.code, self.tail = script, list(overrides), code, list(tail)


class Runner:
    """Runs launchers as child processes (one thread each, own process group), `jobs` at a time, each
    with a progress bar in its lane, and stops them all when one fails or on Ctrl-C."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.lock = threading.Lock()
        self.procs: Dict[int, subprocess.Popen] = {}
        self.failed = threading.Event()

    def launch(self, script: str, overrides: Sequence[str], label: str, lane: int) -> None:
        """Run one launcher to its end, its progress shown on bar `lane`; raise StageFailed on failure."""
        from tqdm import tqdm
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_STAGE), MKL_NUM_THREADS=str(THREADS_PER_STAGE))
        with self.lock:
            if self.failed.is_set():
                raise StageFailed(script, overrides, -1, ["not started: another stage failed"])
            proc = subprocess.Popen(["sh", script, *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.procs[proc.pid] = proc
        tail: Deque[str] = collections.deque(maxlen=15)
        bar = tqdm(total=100, desc=label, position=lane, leave=False,
                   bar_format="{desc:<14} {percentage:3.0f}%|{bar:30}| {elapsed}")
        pending = ""
        try:
            for chunk in iter(lambda: proc.stdout.read1(1 << 14), b""):
                pieces = re.split(r"[\r\n]", pending + chunk.decode("utf-8", "replace"))
                pending = pieces.pop()
                for piece in pieces:
                    frac = stage_fraction(piece)
                    if frac is not None:
                        bar.update(int(100 * frac) - bar.n)
                    rest = PROGRESS.sub("", piece).strip()
                    if rest:
                        tail.append(rest)
            if pending.strip():
                tail.append(PROGRESS.sub("", pending).strip())
            code = proc.wait()
        finally:
            bar.close()
            with self.lock:
                self.procs.pop(proc.pid, None)
        if code:
            raise StageFailed(script, overrides, code, tail)

    def stop_all(self) -> None:
        """Terminate every running launcher with its children (a training resumes from its last
        checkpoint on the next run)."""
        self.failed.set()
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


def run_chains(runner: Runner, chains: Sequence[Callable[[int], None]]) -> None:
    """Run the callables (each given its lane number) `runner.jobs` at a time; the first failure stops
    the others and is raised."""
    lanes: "queue.Queue[int]" = queue.Queue()
    for lane in range(runner.jobs):
        lanes.put(lane)

    def on_lane(chain):
        lane = lanes.get()
        try:
            chain(lane)
        finally:
            lanes.put(lane)
    with concurrent.futures.ThreadPoolExecutor(max_workers=runner.jobs) as pool:
        futures = [pool.submit(on_lane, c) for c in chains]
        try:
            for f in concurrent.futures.as_completed(futures):
                f.result()
        except BaseException:
            runner.stop_all()
            for f in futures:
                f.cancel()
            raise


def ensure_dataset(cfg) -> None:
    """Write the synthetic dataset once, before the stages that read it run side by side."""
    if cfg.data.name == "synthetic":
        from datasets.synthetic import ensure_synthetic
        s = cfg.data.synthetic
        ensure_synthetic(cfg.data.root, s.num_train, s.num_val, s.size, s.seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print what each stage would do, run nothing")
    parser.add_argument("--jobs", type=int, default=None,
                        help="stages run at once, one thread each (default: one per CPU core, at most 4)")
    parser.add_argument("--write-reference", action="store_true",
                        help=f"after the run, write the seeds' mean and std as the reference ({REFERENCE}); "
                             "needs at least 2 seeds")
    parser.add_argument("--seeds", default="0",
                        help="training seeds, e.g. 0-4 or 0,2 (default 0); seed s > 0 trains into "
                             "exp/synthetic/demo_<method>_seed<s>, and several seeds give mean and std per cell")
    args = parser.parse_args(argv)
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        print(f"error: --jobs must be >= 1, got {jobs}", file=sys.stderr)
        return 2
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.write_reference and len(seeds) < 2:
        print("error: --write-reference needs at least 2 seeds (--seeds 0-4)", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    try:
        cfgs = {(m, s): load_demo_config(m, s) for s in seeds for m, _ in METHODS}
        reference = None if args.write_reference else read_reference(REFERENCE)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m, _ in METHODS:
        for kind in ("train", "test"):
            if not os.path.isfile(launcher(kind, m)):
                print(f"error: launcher {launcher(kind, m)} not found", file=sys.stderr)
                return 2
    before = earlier_times(os.path.join(OUT_DIR, "table.json"))
    plan: Dict[Tuple[str, int], List[Stage]] = {}
    overrides: Dict[Tuple[str, int], List[str]] = {}
    for key, cfg in cfgs.items():
        m, s = key
        action, overrides[key] = train_decision(cfg.to_dict(), read_saved_training(cfg.exp_dir))
        # a stage downstream of a training that runs is redone whatever is on disk
        test_action = "evaluate" if action != "reuse" or not eval_finished(cfg) else "reuse"
        suffix = f" seed {s}" if len(seeds) > 1 or s else ""
        plan[key] = [Stage(f"train {m}{suffix}", action, earlier=before.get(f"train {m}{suffix}")),
                     Stage(f"test {m}{suffix}", test_action, earlier=before.get(f"test {m}{suffix}"))]
    order = [(m, s) for s in seeds for m in SCHEDULE]
    print(f"{len(METHODS)} trainings and evaluations per seed, seeds {','.join(map(str, seeds))}, {jobs} at a "
          f"time ({THREADS_PER_STAGE} thread each); logs in each exp_dir", flush=True)
    for key in order:
        for st in plan[key]:
            print(f"  {st.name:<12} {st.action:<8} ({cfgs[key].exp_dir})", flush=True)
    if args.dry_run:
        return 0
    first = cfgs[(METHODS[0][0], seeds[0])]
    try:
        ensure_dataset(first)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = Runner(jobs)
    t_all = time.monotonic()

    def chain(key: Tuple[str, int]) -> Callable[[int], None]:
        m, s = key
        seed_args = demo_overrides(m, s)

        def run(lane: int) -> None:
            from tqdm import tqdm
            for st, kind, extra in ((plan[key][0], "train", overrides[key]), (plan[key][1], "test", [])):
                if st.action == "reuse":
                    continue
                t = time.monotonic()
                runner.launch(launcher(kind, m), seed_args + extra, st.name, lane)
                st.seconds = time.monotonic() - t
                tqdm.write(f"done: {st.name} ({st.action}) in {format_seconds(st.seconds)}")
        return run
    try:
        run_chains(runner, [chain(key) for key in order])
    except StageFailed as e:
        for line in e.tail:
            print(f"  | {line}", file=sys.stderr)
        print(f"error: {e}; its log is the newest in its exp_dir; finished stages are kept, re-run to continue",
              file=sys.stderr)
        return e.code if e.code > 0 else 1
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, re-run to continue", file=sys.stderr)
        return 130
    stages = [plan[(m, s)][i] for i in (0, 1) for s in seeds for m, _ in METHODS]
    attacks = [a if isinstance(a, str) else a.get("label", a["name"]) for a in first.test.attacks]
    columns = table_columns(first.test.eps, attacks)
    runs: Dict[int, Dict[str, Dict[str, Optional[float]]]] = {}
    results = []
    for s in seeds:
        metrics = {}
        for m, name in METHODS:
            cfg = cfgs[(m, s)]
            result = cfg.test.result_dir or os.path.join(cfg.exp_dir, "result")
            path = os.path.join(result, "metrics.json")
            try:
                with open(path) as f:
                    metrics[name] = json.load(f)
            except (OSError, ValueError) as e:
                print(f"error: cannot read {path}: {e}", file=sys.stderr)
                return 2
            if s == seeds[0]:
                results.append(result)
        runs[s] = table_rows(metrics, columns)
    wall = time.monotonic() - t_all
    if args.write_reference:
        reference = write_reference(runs)
    ok = write_report(runs, columns, stages, wall, first, jobs, reference)
    curves = os.path.join(OUT_DIR, "robustness.png")
    try:
        from compare_curves import compare
        compare(results, curves, labels=[name for _, name in METHODS])
        print(f"wrote {curves} (worst case over the attacks against eps, the four methods, seed {seeds[0]})")
    except (SetupError, OSError) as e:  # e.g. evaluations without robustness.json: the table stands
        print(f"note: no {curves}: {e}", file=sys.stderr)
    return 0 if ok else 1


def machine_description() -> str:
    """The CPU model, core count, torch version and its CPU capability (a reference's provenance)."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores; torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def write_report(runs: Dict[int, Dict[str, Dict[str, Optional[float]]]], columns, stages: List[Stage],
                 wall: float, cfg, jobs: int = 1, reference: Optional[dict] = None) -> bool:
    """Print each seed's table (cells marked in / outside the reference range), the mean ± std over the
    seeds when there are several, the reference, the checks and the timings; write them to
    OUT_DIR/table.md and table.json. Returns True when every check holds for every seed."""
    sea = next((a for a in cfg.test.attacks if (a == SEA_LABEL or (isinstance(a, dict) and a.get("name") == SEA_LABEL))), None)
    sea_steps = sea.get("steps", 300) if isinstance(sea, dict) else 300
    n = min(cfg.data.synthetic.num_val, cfg.test.num_images or cfg.data.synthetic.num_val)
    header = (f"mIoU (%) on the first {n} synthetic val images; BIM-2: 2 steps of 2.55/255, no random start; "
              f"PGD-10: 10 steps of 2/255, random start; SEA: worst case per image over APGD mask-ce-bal / "
              f"mask-ce / JS with {sea_steps} iterations each (the paper's: 300)")
    ref_rows = None if reference is None else reference["rows"]
    parts, records, all_ok = [header], [], True
    for seed, rows in runs.items():
        checks = acceptance(rows)
        all_ok &= all(ok for _, ok in checks)
        mark = "" if ref_rows is None else \
            f" (in: within max({WITHIN_STDS:g} std, {WITHIN_FLOOR:g}) of the reference mean; OUT: outside)"
        parts.append(f"Seed {seed}{mark}:\n\n{markdown_table(rows, columns, ref_rows)}\n\nChecks, seed {seed}:\n"
                     + "\n".join(f"- [{'x' if ok else ' '}] {c}" for c, ok in checks))
        cells = {name: {k: cell_record(row.get(k), (ref_rows or {}).get(name, {}).get(k)) for k, _ in columns}
                 for name, row in rows.items()}
        records.append({"seed": seed, "cells": cells, "checks": [{"check": c, "ok": ok} for c, ok in checks]})
    stats = cell_stats(runs) if len(runs) > 1 else None
    if stats is not None:
        parts.append(f"Mean ± std over seeds {','.join(map(str, runs))}:\n\n{stats_table(stats, columns)}")
    if reference is not None:
        parts.append(f"Reference (the README's demo table, {REFERENCE}; mean ± std over seeds "
                     f"{','.join(map(str, reference.get('seeds', [])))}, "
                     f"{reference.get('machine', 'machine not recorded')}):\n\n{stats_table(ref_rows, columns)}")
    outside = [f"seed {r['seed']} {name} / {k}" for r in records for name, c in r["cells"].items()
               for k, v in c.items() if v["within"] is False]
    if reference is not None:
        parts.append("Every cell within the reference range." if not outside else
                     f"{len(outside)} cell(s) outside the reference range: " + "; ".join(outside))
    timing = "\n".join(f"- {s.name}: {format_seconds(s.seconds, s.earlier)}" for s in stages) + \
        f"\n- whole demo (this run): {format_seconds(wall)}"
    parts.append(f"Wall time per stage ({os.cpu_count()} CPU cores; {jobs} stage(s) at a time, "
                 f"{THREADS_PER_STAGE} thread each):\n{timing}")
    text = "\n\n".join(parts) + "\n"
    print("\n" + text)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, content in (("table.md", text), ("table.json", json.dumps(
            {"header": header, "columns": [list(c) for c in columns], "seeds": list(runs), "runs": records,
             "mean_std": stats, "reference": reference, "outside": outside,
             "checks_ok": all_ok,
             "stages": [{"stage": s.name, "action": s.action, "seconds": s.seconds, "earlier": s.earlier}
                        for s in stages],
             "wall_seconds": wall, "cpu_count": os.cpu_count(), "jobs": jobs, "threads_per_stage": THREADS_PER_STAGE,
             "platform": platform.platform(), "machine": machine_description()}, indent=1))):
        write_text(os.path.join(OUT_DIR, name), content)
    print(f"wrote {os.path.join(OUT_DIR, 'table.md')} and table.json")
    for r in records:
        for c in r["checks"]:
            if not c["ok"]:
                print(f"error: check failed, seed {r['seed']}: {c['check']}", file=sys.stderr)
    return all_ok


def write_reference(runs: Dict[int, Dict[str, Dict[str, Optional[float]]]], path: str = REFERENCE) -> dict:
    """Write the mean ± std of every cell over the seeds' tables, with the machine, as the reference
    that later runs are marked against (the README's demo table is this file)."""
    ref = {"seeds": list(runs), "machine": machine_description(), "rows": cell_stats(runs),
           "within": f"|value - mean| <= max({WITHIN_STDS:g} std, {WITHIN_FLOOR:g} points)"}
    write_text(path, json.dumps(ref, indent=1) + "\n")
    print(f"wrote {path} (reference over seeds {','.join(map(str, runs))})")
    return ref


if __name__ == "__main__":
    sys.exit(main())
