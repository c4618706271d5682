"""Where an evaluation writes, long evaluations that survive a kill, and folders of checkpoints.

An evaluation writes everything (prediction PNGs, example panels, per-image counts, metrics.json)
into a staging folder ``<result>.partial`` next to its result folder; only when it has finished
does the staging folder replace ``<result>`` (``publish``). A run that fails half-way therefore
leaves the previous results untouched, and a result folder always holds one complete evaluation.

Per-image counts (intersection, union, target per class, and regression error sums of multitask
outputs, for every run) are written as the evaluation goes, in small ``.npz`` chunks under
``<result>.partial/per_image/``, named by the checkpoint and a hash of everything that determines the
numbers (checkpoint file identity, data, model, attacks, eps, protocol, seed; not the batch size, the
process count or the shard). A restarted evaluation loads them, skips the images already done, and
pools old and new counts, so its metrics equal those of an uninterrupted run (up to float rounding when
the per-process batch changed, which it says in one line). When a run completes, the chunks are merged
into one ``<checkpoint>-<hash>.all.npz`` holding every image's counts (in ``<result>/per_image/``).

``test.shard: [i, n]`` evaluates the images i, i+n, ... only; ``engine/shards.py`` merges the n
shards' count files into the result of the whole evaluation.

``test.checkpoint`` may name a folder: each ``*.pth`` in it is evaluated in turn (newest first),
with results in ``<result>/<checkpoint stem>/`` and a summary in ``<result>/checkpoints.json``.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from utils import dist
from utils.atomic import atomic_write
from utils.checkpoint import list_checkpoints
from utils.errors import SetupError
from utils.logger import get_logger

from .paths import result_dir, staging_dir

# seconds between two writes of the per-image counts: a killed evaluation redoes at most the batches
# of this span (0: a write after every batch)
FLUSH_SECONDS = 10.0
FORMAT = 2  # per-image file layout; chunks of another layout are not resumed from
IDENTITY_FILE = "identity.txt"


def shard_images(n: int, shard) -> List[int]:
    """The image indices an evaluation of `n` images covers: all, or every k-th from i (``shard = [i, k]``)."""
    return list(range(n)) if not shard else list(range(shard[0], n, shard[1]))


def prepare_staging(cfg, identity: str) -> str:
    """Empty the staging folder unless it holds an interrupted run of this very evaluation (same
    identity and shard), whose per-image counts are then resumed. Main process; the others wait."""
    folder = staging_dir(cfg)
    if cfg.test.shard:
        identity += " shard {} of {}".format(*cfg.test.shard)
    if dist.is_main():
        marker = os.path.join(folder, IDENTITY_FILE)
        same = False
        if os.path.isfile(marker):
            with open(marker) as f:
                same = f.read().strip() == identity
        if not same:
            if glob.glob(os.path.join(folder, "per_image", "*.npz")):
                get_logger().info(f"{folder} holds the progress of another evaluation (other checkpoint or "
                                  f"settings): starting afresh")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            with open(marker, "w") as f:
                f.write(identity + "\n")
    dist.barrier()
    return folder


def publish(cfg) -> str:
    """Replace ``<result>`` by the finished staging folder (main process); returns ``<result>``."""
    final, staged = result_dir(cfg), staging_dir(cfg)
    os.remove(os.path.join(staged, IDENTITY_FILE))
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_checkpoint_dir(cfg) -> bool:
    return bool(cfg.test.checkpoint) and os.path.isdir(cfg.test.checkpoint)


def run_directory(cfg, run_one: Callable) -> Dict[str, dict]:
    """Evaluate every ``*.pth`` of the folder ``test.checkpoint`` with `run_one(cfg)` (test.py's
    single-checkpoint evaluation), each into ``<result>/<stem>/``; returns {path: metrics}."""
    folder, root = cfg.test.checkpoint, result_dir(cfg)
    files = list_checkpoints(folder)
    if not files:
        raise SetupError(f"test.checkpoint: no .pth files in folder {folder}")
    log = get_logger()
    log.info(f"evaluating {len(files)} checkpoints of {folder}: {', '.join(os.path.basename(f) for f in files)}")
    out, summary = {}, {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        one = copy.deepcopy(cfg)
        one.test.checkpoint, one.test.result_dir = path, os.path.join(root, stem)
        m = run_one(one)
        out[path] = m
        summary[stem] = {"checkpoint": path, "clean_mIoU": m["clean"]["mIoU"],
                         "attacks_mIoU": {k: a["mIoU"] for k, a in m.get("attacks", {}).items()}}
    if dist.is_main():
        with atomic_write(os.path.join(root, "checkpoints.json"), "w") as f:
            json.dump(summary, f, indent=1)
        lines = [f"{stem}: clean mIoU {100 * s['clean_mIoU']:.2f}"
                 + "".join(f", {k} {100 * v:.2f}" for k, v in s["attacks_mIoU"].items()) for stem, s in summary.items()]
        log.info("mIoU (%) per checkpoint:\n" + "\n".join(lines))
    return out


def _identity(cfg, ckpt: str, n: int) -> str:
    """Hash of what determines the per-image numbers; a changed checkpoint or setting starts afresh.
    Left out: what only changes float rounding or the work split (batch size, shard) or the outputs
    other than the counts (images, examples, plots, result folder)."""
    st = os.stat(ckpt)
    test = {k: v for k, v in cfg.test.to_dict().items()
            if k not in ("checkpoint", "save_images", "plots", "result_dir", "batch_size", "shard", "examples")}
    data = {k: v for k, v in cfg.data.to_dict().items() if k != "workers"}
    blob = json.dumps({"checkpoint": os.path.abspath(ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "test": test, "data": data, "model": cfg.model.to_dict(), "seed": cfg.seed, "n": n,
                       "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def merged_counts_path(cfg, ckpt: str, n: int) -> str:
    """``<result>/per_image/<checkpoint stem>-<identity>.all.npz``: the file a finished evaluation of
    `ckpt` on `n` images with these settings leaves; it exists only if that very evaluation completed
    (a retrained checkpoint or changed test settings give another name). Callers that want to reuse
    finished results (tools/demo.py) test for it."""
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    return os.path.join(result_dir(cfg), "per_image", f"{stem}-{_identity(cfg, ckpt, n)}.all.npz")


Part = Dict[str, torch.Tensor]  # column name -> per-image rows ("index", "inter", ..., "reg_<task>")


class EvalProgress:
    """Saved per-image progress of one checkpoint's evaluation.

    ``todo``: this process's image indices still to evaluate. ``on_batch(stats)``: called by the
    evaluator after each batch (writes new counts every few seconds). ``finish(stats)``: writes
    the rest, merges the saved counts into `stats` and consolidates the files. `columns` maps each
    per-image column to (dtype, shape of one row), the same for every run.
    """

    def __init__(self, cfg, ckpt: str, n: int, attacks: Sequence[Tuple[str, object]],
                 columns: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], batch: int = 0):
        self.identity = _identity(cfg, ckpt, n)
        self.folder = os.path.join(prepare_staging(cfg, self.identity), "per_image")
        self.prefix = f"{os.path.splitext(os.path.basename(ckpt))[0]}-{self.identity}"
        self.columns = dict(columns)
        self.attacks = list(attacks)
        self.runs = ["clean"] + [k for k, _ in self.attacks]
        self.batch = batch  # per-process batch, recorded with the counts
        images = shard_images(n, cfg.test.shard)
        # this process's images; earlier counts of these only are gathered from here (the others' from theirs)
        self.own = set(images[dist.rank()::dist.world_size()])
        self.prior_files = sorted(glob.glob(os.path.join(self.folder, self.prefix + ".*.npz")))
        self.prior: Dict[str, List[Part]] = {r: [] for r in self.runs}
        self.prior_seconds = {r: 0.0 for r in self.runs}
        self.prior_passes = {r: [0, 0] for r in self.runs}
        self.prior_batches: set = set()
        seen: set = set()
        for path in self.prior_files:
            self._load(path, seen)
        self.done = seen
        self.todo = [i for i in images[dist.rank()::dist.world_size()] if i not in seen]
        self.saved_parts = {r: 0 for r in self.runs}
        self.saved_seconds = {r: 0.0 for r in self.runs}
        self.saved_passes = {k: (0, 0) for k, _ in self.attacks}
        self.batches, self.last_flush, self.chunk = 0, time.time(), 0
        if seen:
            get_logger().info(f"resuming evaluation: {len(seen)} of {len(images)} images already done ({self.folder})")
        other = sorted(b for b in self.prior_batches if b != batch)
        if other and batch:
            get_logger().info(f"the per-process batch changed ({', '.join(map(str, other))} before, {batch} now): "
                              f"the images already done are kept; the results equal an uninterrupted run up to "
                              f"float rounding (docs/reproducibility.md)")

    def _load(self, path: str, seen: set) -> None:
        try:
            with np.load(path) as z:
                if [str(r) for r in z["runs"]] != self.runs:
                    return
                idx = z["index"]
                keep = np.array([i not in seen for i in idx.tolist()], dtype=bool)
                mine = keep & np.array([i in self.own for i in idx.tolist()], dtype=bool)
                for j, r in enumerate(self.runs):
                    part = {"index": torch.from_numpy(idx[mine])}
                    part.update({c: torch.from_numpy(z[f"{c}_{j}"][mine]) for c in self.columns if c != "index"})
                    self.prior[r].append(part)
                    self.prior_seconds[r] += float(z["seconds"][j])
                    self.prior_passes[r] = [a + int(b) for a, b in zip(self.prior_passes[r], z["passes"][j])]
                seen.update(idx[keep].tolist())
                if "batch" in z.files and len(idx):
                    self.prior_batches.add(int(z["batch"]))
        except (OSError, ValueError, KeyError):  # a chunk cut short by a kill is simply redone
            get_logger().warning(f"ignoring unreadable per-image file {path}")

    def _write(self, path: str, parts: Dict[str, List[Part]], seconds: Dict[str, float],
               passes: Dict[str, Sequence[int]]) -> None:
        arrays = {"runs": np.array(self.runs)}
        for j, r in enumerate(self.runs):
            cat = {c: torch.cat([p[c] for p in parts[r]]).numpy() if parts[r] else
                   np.zeros((0,) + shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
                   for c, (dtype, shape) in self.columns.items()}
            if j == 0:
                arrays["index"] = cat["index"]
            elif not np.array_equal(cat["index"], arrays["index"]):
                raise RuntimeError(f"run {r} covers other images than the clean run")
            arrays.update({f"{c}_{j}": a for c, a in cat.items() if c != "index"})
        arrays["seconds"] = np.array([seconds[r] for r in self.runs], np.float64)
        arrays["passes"] = np.array([list(passes.get(r, (0, 0))) for r in self.runs], np.int64)
        arrays["batch"] = np.array(self.batch, np.int64)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    def flush(self, stats: Dict[str, object]) -> None:
        """Write the counts gathered since the last flush to a new chunk file of this process."""
        new = {r: stats[r].parts[self.saved_parts[r]:] for r in self.runs}
        if not new["clean"]:
            return
        seconds = {r: stats[r].seconds - self.saved_seconds[r] for r in self.runs}
        passes = {k: (a.counter.forward - self.saved_passes[k][0], a.counter.backward - self.saved_passes[k][1])
                  for k, a in self.attacks}
        self.chunk += 1
        name = f"{self.prefix}.r{dist.rank()}-{os.getpid()}-{self.chunk:05d}.npz"
        self._write(os.path.join(self.folder, name), new, seconds, passes)
        self.saved_parts = {r: len(stats[r].parts) for r in self.runs}
        self.saved_seconds = {r: stats[r].seconds for r in self.runs}
        self.saved_passes = {k: (a.counter.forward, a.counter.backward) for k, a in self.attacks}
        self.last_flush = time.time()

    def on_batch(self, stats: Dict[str, object]) -> None:
        self.batches += 1
        if time.time() - self.last_flush >= FLUSH_SECONDS:
            self.flush(stats)

    def finish(self, stats: Dict[str, object]) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, float],
                                                       Dict[str, Tuple[int, int]]]:
        """Save what is left, add the earlier sessions' counts (each process those of its own images;
        times and passes once, on rank 0), consolidate.

        Returns (every run's columns gathered from all processes and ordered by image index, seconds
        per run summed over processes, (forward, backward) passes per attack); a collective: call it
        on every process."""
        self.flush(stats)
        for r in self.runs:
            stats[r].parts[:0] = [p for p in self.prior[r] if len(p["index"])]
        if dist.is_main():
            for r in self.runs:
                stats[r].seconds += self.prior_seconds[r]
            for k, a in self.attacks:
                a.counter.forward += self.prior_passes[k][0]
                a.counter.backward += self.prior_passes[k][1]
        # collectives below: by now every process has flushed its own chunks
        gathered = {r: stats[r].gathered() for r in self.runs}
        seconds = {r: float(dist.all_reduce_sum(torch.tensor(stats[r].seconds, dtype=torch.float64))) for r in self.runs}
        passes = {k: tuple(int(v) for v in dist.all_reduce_sum(torch.tensor([a.counter.forward, a.counter.backward])))
                  for k, a in self.attacks}
        if dist.is_main():
            parts = {r: [{c: torch.from_numpy(a) for c, a in gathered[r].items()}] for r in self.runs}
            final = os.path.join(self.folder, f"{self.prefix}.all.npz")
            self._write(final, parts, seconds, passes)
            for p in glob.glob(os.path.join(self.folder, self.prefix + ".*.npz*")):
                if p != final:
                    os.remove(p)
        return gathered, seconds, passes


def saved_counts(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Read a per-image file: {run: {column: rows}} with the columns "index", "inter", "union",
    "target" and "reg_<task>" for multitask regression outputs."""
    with np.load(path) as z:
        cols = sorted({k.rsplit("_", 1)[0] for k in z.files if k.endswith("_0")})
        return {str(r): {"index": z["index"], **{c: z[f"{c}_{j}"] for c in cols}} for j, r in enumerate(z["runs"])}
