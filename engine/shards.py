"""One evaluation split over independent jobs: ``test.shard: [i, n]`` and ``test.py --merge DIR...``.

Shard i of n evaluates the images i, i+n, i+2n, ... (of the first ``test.num_images``) into
``<exp_dir>/result-shard<i>of<n>``; every random draw is seeded per image, so a shard's per-image counts
are those the whole evaluation computes for its images. ``merge_shards`` checks that the given result
folders are the n shards of the evaluation the config describes (same checkpoint file, data, model,
attacks, eps, protocol, seed), each image counted once, before it writes anything; then it pools
their per-image counts into ``<result>/per_image/`` and writes ``<result>/metrics.json`` as a single
run would, the worst case taken over all images. Prediction PNGs stay in the shard folders.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Sequence

import numpy as np
import torch

from datasets import build_dataset
from models import build_model
from utils.atomic import atomic_write
from utils.errors import SetupError
from utils.logger import get_logger

from . import eval_resume
from .paths import result_dir


def _read_shard(folder: str) -> dict:
    """metrics.json and the one per-image count file of a shard's result folder."""
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f"--merge: cannot read {path} ({e.__class__.__name__}); give finished shard result folders")
    if "shard" not in metrics:
        raise SetupError(f"--merge: {folder} is not the result of a sharded evaluation (no shard in metrics.json)")
    files = glob.glob(os.path.join(folder, "per_image", "*.all.npz"))
    if len(files) != 1:
        raise SetupError(f"--merge: {folder}/per_image must hold one .all.npz count file, found {len(files)}")
    return {"folder": folder, "metrics": metrics, "counts": files[0], "shard": tuple(metrics["shard"]),
            "name": os.path.basename(files[0])}


def check_shards(shards: Sequence[dict], expected_name: str, n: int) -> None:
    """One-line SetupError unless `shards` are exactly shards 0..k-1 of k of the evaluation whose
    count file is `expected_name`, covering images 0..n-1 once each."""
    first = shards[0]
    for s in shards:
        if s["name"] != first["name"]:
            raise SetupError(f"--merge: {first['folder']} and {s['folder']} are shards of different evaluations "
                             f"({first['name']} vs {s['name']})")
    if first["name"] != expected_name:
        raise SetupError(f"--merge: the shards ({first['name']}) are not of the evaluation this config and "
                         f"checkpoint describe ({expected_name}): another checkpoint file or test settings")
    k = first["shard"][1]
    by_index: Dict[int, str] = {}
    for s in shards:
        i, kk = s["shard"]
        if kk != k:
            raise SetupError(f"--merge: {first['folder']} is a shard of {k}, {s['folder']} one of {kk}")
        if i in by_index:
            raise SetupError(f"--merge: {by_index[i]} and {s['folder']} are both shard {i} of {k} (overlapping images)")
        by_index[i] = s["folder"]
    missing = sorted(set(range(k)) - set(by_index))
    if missing:
        raise SetupError(f"--merge: shard(s) {', '.join(map(str, missing))} of {k} missing "
                         f"(images {', '.join(map(str, eval_resume.shard_images(n, [missing[0], k])[:4]))}, ...)")
    seen: Dict[int, str] = {}
    for s in shards:
        idx = eval_resume.saved_counts(s["counts"])["clean"]["index"].tolist()
        twice = [i for i in idx if i in seen]
        if twice:
            raise SetupError(f"--merge: image {twice[0]} is counted in {seen[twice[0]]} and in {s['folder']}")
        seen.update({i: s["folder"] for i in idx})
    if sorted(seen) != list(range(n)):
        lost = sorted(set(range(n)) - set(seen))
        raise SetupError(f"--merge: the shards cover {len(seen)} of {n} images (missing e.g. image {lost[0]})")


def merge_counts(paths: Sequence[str], out: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Concatenate per-image count files (rows ordered by image index; seconds and passes summed)
    into `out`; returns the columns per run (as ``eval_resume.saved_counts``)."""
    loaded = []
    for p in paths:
        with np.load(p) as z:
            loaded.append({k: z[k] for k in z.files})
    runs = loaded[0]["runs"]
    order = np.argsort(np.concatenate([z["index"] for z in loaded]), kind="stable")
    arrays = {"runs": runs}
    for k in loaded[0]:
        if k in ("runs", "seconds", "passes", "batch"):
            continue
        arrays[k] = np.concatenate([z[k] for z in loaded])[order]
    arrays["seconds"] = sum(z["seconds"] for z in loaded)
    arrays["passes"] = sum(z["passes"] for z in loaded)
    with atomic_write(out) as f:
        np.savez(f, **arrays)
    return eval_resume.saved_counts(out)


def merge_shards(cfg, folders: Sequence[str]) -> dict:
    """``test.py --config C --merge DIR...``: the shards' counts -> ``<result>`` (metrics.json, per_image/,
    config.yaml, robustness curves) as a single evaluation would write them. Returns the metrics."""
    from .evaluator import build_attack_runs, checkpoint_path, metrics_record
    from .results import write_results
    log = get_logger()
    if cfg.test.shard:
        raise SetupError("--merge combines the shards: leave test.shard unset")
    if eval_resume.is_checkpoint_dir(cfg):
        raise SetupError("--merge: test.checkpoint must be one file (merge the shards of each checkpoint apart)")
    ckpt = checkpoint_path(cfg)
    if not os.path.isfile(ckpt):
        raise SetupError(f"checkpoint not found: {ckpt} (the shards' test.checkpoint)")
    folders = [os.path.normpath(f) for f in folders]
    if result_dir(cfg) in folders:
        raise SetupError(f"--merge: the merged result folder {result_dir(cfg)} is one of the shards; set "
                         f"test.result_dir elsewhere")
    shards = [_read_shard(f) for f in folders]
    model = build_model(cfg)  # (no weights: only which outputs it has)
    dataset = build_dataset(cfg, cfg.test.split)
    n = len(dataset) if cfg.test.num_images is None else min(cfg.test.num_images, len(dataset))
    expected = os.path.basename(eval_resume.merged_counts_path(cfg, ckpt, n))
    check_shards(shards, expected, n)
    runs = build_attack_runs(cfg, torch.device("cpu"), model, dataset)
    # everything is checked: write into the staging folder, then replace <result>
    identity = expected.rsplit("-", 1)[1].split(".")[0]
    staging = eval_resume.prepare_staging(cfg, identity)
    counts = merge_counts([s["counts"] for s in shards], os.path.join(staging, "per_image", expected))
    with np.load(os.path.join(staging, "per_image", expected)) as z:
        passes = {str(r): tuple(int(v) for v in p) for r, p in zip(z["runs"], z["passes"])}
    seconds = {r: sum((s["metrics"]["clean"] if r == "clean" else s["metrics"]["attacks"][r])["seconds"]
                      for s in shards) for r in counts}  # the shards' wall times added up
    metrics = metrics_record(cfg, ckpt, n, model, dataset, runs, counts, seconds, passes)
    metrics["merged_from"] = [s["folder"] for s in sorted(shards, key=lambda s: s["shard"][0])]
    write_results(cfg, metrics, {}, staging, log)
    log.info(f"merged {len(shards)} shards into {os.path.join(eval_resume.publish(cfg), 'metrics.json')}")
    return metrics

