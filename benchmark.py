"""Cost of the attack library: one APGD iteration against one forward + backward-to-input of the same
model and batch, and the worst-case aggregation over attacks. Prints a small table.

    python benchmark.py [--device cpu|cuda] [--batch 2] [--size 97] [--threads 1]

On the CPU the APGD figures are process CPU times (so other jobs on the machine do not distort
them); the aggregation figures are wall times.

Targets: APGD iteration / (forward + input backward) <= 1.15; worst case for 2000 images x 3
attacks x 151 classes < 2 s on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from attacks import attack_mode
from attacks.apgd import apgd_run
from models.pspnet import PSPNet
from utils.metrics import worst_case, worst_case_miou


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: str) -> float:
    """Time of one fn() call: process CPU time on the CPU (robust to other jobs sharing the cores),
    wall time on the GPU."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    _sync(device)
    t = clock()
    fn()
    _sync(device)
    return clock() - t


def bench_apgd(device: str, batch: int, size: int, classes: int = 6, repeats: int = 5, loss: str = "mask-ce"):
    """(seconds per forward+input-backward, seconds per APGD iteration) on the synthetic-size PSPNet."""
    torch.manual_seed(0)
    model = PSPNet(classes, layers=18, width=0.5).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch, size, size), device=device)
    y[:, :4] = 255
    with attack_mode(model):
        def fwd_bwd():
            xa = x.clone().requires_grad_(True)
            loss_v = F.cross_entropy(model(xa), y, ignore_index=255)
            torch.autograd.grad(loss_v, xa)

        def run(n):
            return lambda: apgd_run(model, x, y, eps=8 / 255, steps=n, loss=loss, prr=False, early_stop=False)

        n1, n2 = 2, 12
        fwd_bwd(), run(n1)()                                      # warm-up
        base, per_iter = [], []
        for _ in range(repeats):                                  # interleaved, so drifts hit both alike
            base.append(statistics.median(_once(fwd_bwd, device) for _ in range(3)))
            t1 = _once(run(n1), device)
            t2 = _once(run(n2), device)
            per_iter.append((t2 - t1) / (n2 - n1))
    return statistics.median(base), statistics.median(per_iter)


def bench_worst_case(n: int = 2000, attacks: int = 3, classes: int = 151, seed: int = 0):
    """Seconds for worst_case_miou and for the full worst_case report on random realistic counts."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, classes)) < 0.08                     # ~12 classes per image
    tgt = rng.integers(50, 5000, (n, classes)) * present
    inter = (tgt[None] * rng.uniform(0.0, 1.0, (attacks, n, classes))).astype(np.int64)
    spill = rng.integers(0, 2000, (attacks, n, classes)) * (rng.random((attacks, n, classes)) < 0.1)
    union = tgt[None] + spill + (tgt[None] - inter) * 0
    t = time.perf_counter()
    value, _, moves = worst_case_miou(inter, union)
    t_search = time.perf_counter() - t
    t = time.perf_counter()
    worst_case(inter, union, tgt)
    t_full = time.perf_counter() - t
    return t_search, t_full, value, moves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=97)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base, it = bench_apgd(args.device, args.batch, args.size, repeats=args.repeats)
    t_search, t_full, value, moves = bench_worst_case()
    rows = [
        (f"fwd + input bwd, PSPNet-18 w0.5, {args.batch}x3x{args.size}^2 ({args.device})", f"{base * 1e3:.1f} ms", ""),
        ("APGD iteration (mask-ce), same model and batch", f"{it * 1e3:.1f} ms", ""),
        ("  ratio APGD / (fwd + bwd)", f"{it / base:.3f}", "<= 1.15"),
        (f"worst-case mIoU search, 2000 x 3 x 151 ({moves} moves)", f"{t_search:.3f} s", "< 2 s"),
        ("full worst-case report (search + summaries)", f"{t_full:.3f} s", "< 2 s"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>10}  target")
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:>10}  {target}")


if __name__ == "__main__":
    main()
