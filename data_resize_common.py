"""Shared core of the offline resize tools (data_resize_cityscape.py, data_resize_taskonomy.py); no torch needed.

Kinds of files and how they are resized:
- image: INTER_AREA when shrinking (anti-aliased), bilinear when enlarging;
- label: nearest, so no new label value can appear;
- depth: valid-weighted, resize(value * valid) / resize(valid): invalid pixels never mix into valid ones.
  An output pixel is valid when at least half of its footprint is valid; otherwise it gets the invalid code;
- copy: copied byte for byte (json, txt, ...).
Files are written atomically (hidden temporary file, then rename), so an existing output is a finished one
and a rerun skips it.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from multiprocessing import Pool
from typing import Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

MIN_SUPPORT = 0.5


@dataclass(frozen=True)
class Job:
    src: str
    dst: str
    kind: str                      # image | label | depth | copy
    invalid: str = "zero"          # depth: "zero" (raw 0 invalid, Cityscapes) | "high" (raw >= 64500, Taskonomy)


def out_size(h: int, w: int, size: Optional[Tuple[int, int]], factor: Optional[float]) -> Tuple[int, int]:
    """(width, height) of the output: a fixed `size` (w, h) or the input divided by `factor`."""
    if size is not None:
        return size
    return max(1, int(round(w / factor))), max(1, int(round(h / factor)))


def resize_image(a: np.ndarray, wh: Tuple[int, int]) -> np.ndarray:
    shrink = wh[0] < a.shape[1] or wh[1] < a.shape[0]
    return cv2.resize(a, wh, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_label(a: np.ndarray, wh: Tuple[int, int]) -> np.ndarray:
    return cv2.resize(a, wh, interpolation=cv2.INTER_NEAREST)


def resize_depth(a: np.ndarray, wh: Tuple[int, int], invalid: str = "zero") -> np.ndarray:
    """Valid-weighted resize of a single-channel integer depth/disparity map; keeps the dtype."""
    if invalid == "zero":
        valid, code = a > 0, 0
    else:
        valid, code = a < 64500, np.iinfo(a.dtype).max
    v = valid.astype(np.float32)
    num = resize_image(a.astype(np.float32) * v, wh)
    den = resize_image(v, wh)
    ok = den >= MIN_SUPPORT
    out = np.where(ok, num / np.maximum(den, 1e-6), code)
    if invalid == "zero":  # a valid value must not round down to the invalid code
        out = np.where(ok, np.maximum(out, 1), 0)
    info = np.iinfo(a.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(a.dtype)


def _tmp(dst: str) -> str:
    d, b = os.path.split(dst)
    stem, ext = os.path.splitext(b)
    return os.path.join(d, f".{stem}.part{ext}")


def process(job: Job, size: Optional[Tuple[int, int]], factor: Optional[float]) -> Tuple[str, str]:
    """Resize one file; returns (status, message) with status written | skipped | failed."""
    if os.path.exists(job.dst):
        return "skipped", ""
    try:
        os.makedirs(os.path.dirname(job.dst), exist_ok=True)
        tmp = _tmp(job.dst)
        if job.kind == "copy":
            shutil.copyfile(job.src, tmp)
        else:
            a = cv2.imread(job.src, cv2.IMREAD_UNCHANGED)
            if a is None:
                return "failed", f"{job.src}: not a readable image"
            wh = out_size(a.shape[0], a.shape[1], size, factor)
            if job.kind == "image":
                out = resize_image(a, wh)
            elif job.kind == "label":
                out = resize_label(a, wh)
            elif job.kind == "depth":
                if a.ndim != 2 or a.dtype.kind != "u":
                    return "failed", f"{job.src}: depth must be a single-channel integer PNG"
                out = resize_depth(a, wh, job.invalid)
            else:
                return "failed", f"{job.src}: unknown kind {job.kind}"
            if not cv2.imwrite(tmp, out):
                return "failed", f"{job.dst}: cannot write"
        os.replace(tmp, job.dst)
        return "written", ""
    except OSError as e:
        return "failed", f"{job.src}: {e}"


def _worker(args):
    return process(*args)


def walk(src: str) -> List[str]:
    """Every file under `src` (relative paths, sorted), skipping hidden temporaries."""
    out = []
    for d, dirs, files in os.walk(src):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), src) for f in sorted(files) if not f.startswith(".")]
    return out


def check_args(a) -> None:
    """The checks both resize tools make on --src, --dst and --factor (ValueError, one line)."""
    if not os.path.isdir(a.src):
        raise ValueError(f"--src {a.src} is not a folder")
    if os.path.abspath(a.src) == os.path.abspath(a.dst):
        raise ValueError("--dst must differ from --src")
    if a.factor is not None and a.factor <= 0:
        raise ValueError(f"--factor must be positive, got {a.factor}")


def parse_size(text: str) -> Tuple[int, int]:
    """'682x341' -> (682, 341); '256' -> (256, 256)."""
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--size must look like WxH or N, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise ValueError(f"--size must look like WxH or N with positive numbers, got {text!r}")
    return vals[0], vals[1]


def run(jobs: Sequence[Job], size: Optional[Tuple[int, int]], factor: Optional[float], workers: int,
        desc: str) -> int:
    """Process `jobs` with a progress bar; print a summary; return the exit status (1 if any failed)."""
    from tqdm import tqdm
    counts = {"written": 0, "skipped": 0, "failed": 0}
    errors: List[str] = []
    args = [(j, size, factor) for j in jobs]
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap_unordered(_worker, args, chunksize=8), total=len(args), desc=desc))
    else:
        results = [process(*a) for a in tqdm(args, desc=desc)]
    for status, msg in results:
        counts[status] += 1
        if msg:
            errors.append(msg)
    for msg in errors[:20]:
        print(f"failed: {msg}", file=sys.stderr)
    print(f"{desc}: {counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed")
    return 1 if counts["failed"] else 0


def main_guard(fn: Callable[[], int]) -> None:
    """Run a CLI main; bad input (ValueError) becomes a one-line error and exit status 2."""
    try:
        code = fn()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
