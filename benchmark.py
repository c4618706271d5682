"""Cost of every attack and training method of a config's model against its lower bound.

    python benchmark.py --config config/synthetic/synthetic_pspnet18_none.yaml [--batch 4] [--size 97x97]
                        [--classes 21] [--iters 10] [--device cpu|cuda] [--amp bf16|fp16] [--out rows.json]

Rows (printed as a table, written as a JSON list with ``--out``):
  model        forward; forward + backward to the input only (the floor of one attack iteration);
               one clean training step (forward, backward, optimiser step)
  attack       one iteration of each attack, ``ratio`` = its time / (forward + input backward). Each
               iteration is timed from one input-gradient forward to the next, with a floor pass
               timed right before it (``Meter.per_iteration``), so set-up costs (random starts, the
               final forward) are not counted; FGSM is one step, timed whole against the floor.
  defense      one training step of each method that fits the model (DDC-AT on the config model's
               ``_ddcat`` variant), ``ratio`` = its time / the clean step of the same model, ``bound``
               = the method's pass count in clean-step units (``cost_bound``: (2k+3)/3 for
               PIR-AT with k attack steps)
  aggregation  the worst case over attacks for N images x A attacks x C classes (utils.metrics)
Each figure is the median (``--stat min``: the minimum) of ``--repeats`` timed runs after a warm-up
(attack rows: over every iteration of ``--repeats`` runs of ``--iters`` iterations):
process CPU time on the CPU (robust to other jobs sharing the cores; ``--threads`` intra-op threads),
wall time on the GPU.
``peak_mb``: the peak resident memory during the row (CPU; freed memory is returned to the OS and the
high-water mark reset before each row) or the peak CUDA memory allocated.

Targets (issue "Performance"): every attack iteration <= 1.05; PIR-AT 5 steps <= 1.05 x 13/3.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import inspect
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SetupError
from utils.perf import keep_cpu_memory

if TYPE_CHECKING:
    from defenses import Defense

ATTACK_EPS, ATTACK_ALPHA = 8.0, 2.0  # config units (1/255)
MIN_SIZE = 8  # pixels: one position of the feature map at output stride 8


@dataclass
class Row:
    name: str
    kind: str                  # model | attack | defense | aggregation
    median_ms: float
    ratio: Optional[float]
    bound: Optional[float]
    peak_mb: float


# ------------------------------------------------------------------ clocks and memory
class Meter:
    """Times a callable (median, or minimum, of repeats after one warm-up) and reads its peak memory.

    ``stat="min"`` takes the fastest repeat of each quantity instead (timeit's advice where other load
    only ever adds time): the fastest attack iteration, and ratios over the fastest floor."""

    def __init__(self, device: torch.device, repeats: int, stat: str = "median"):
        self.device, self.repeats, self.stat = device, repeats, stat
        self.clock = time.process_time if device.type == "cpu" else time.perf_counter
        self._libc = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # freed blocks back to the OS, so the baseline is live memory
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
        except (OSError, AttributeError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def once(self, fn: Callable[[], object]) -> float:
        self.sync()
        t = self.clock()
        fn()
        self.sync()
        return self.clock() - t

    # Peaks are read over an untimed warm-up run right after reset_peak: the reset hands freed memory
    # back to the OS, and the timed runs must not pay for faulting it in again (utils.perf).
    def median(self, fn: Callable[[], object]) -> Tuple[float, float]:
        """(median seconds over the repeats, peak MB) of fn()."""
        fn()  # warm-up (allocator, lazy initialisation, autotuning)
        self.reset_peak()
        fn()
        peak = self.peak_mb()
        times = [self.once(fn) for _ in range(self.repeats)]
        return self.pick(times), max(peak, self.peak_mb())

    def pick(self, xs: List[float]) -> float:
        """The statistic over repeats: median, or minimum with ``stat="min"``."""
        return min(xs) if self.stat == "min" else statistics.median(xs)

    def paired(self, fn: Callable[[], object], ref: Callable[[], object]) -> Tuple[float, float, float]:
        """(median seconds of fn, median ratio fn / ref, peak MB of fn), each repeat timing ref then fn."""
        fn()
        self.reset_peak()
        fn()
        peak = self.peak_mb()
        ref()
        bases, times = [], []
        for _ in range(self.repeats):
            bases.append(self.once(ref))
            times.append(self.once(fn))
        if self.stat == "min":
            return min(times), min(times) / min(bases), peak
        return statistics.median(times), statistics.median([t / b for t, b in zip(times, bases)]), peak

    def per_iteration(self, run: Callable[[Callable], object], forward: Callable,
                      floor: Callable[[], object]) -> Tuple[float, float, float]:
        """(seconds per iteration, ratio to `floor`, peak MB) of the attack that ``run(fwd)`` runs
        with ``fwd`` as its forward.

        An iteration is timed from one input-gradient forward to the next, so the set-up (random
        start) and a closing forward-only pass are not counted, and one floor() pass is timed right
        before each iteration's forward and left out of that iteration's time. Every iteration thus
        gets its own ratio to a floor measured next to it: the machine's speed changes between
        consecutive passes (on a shared VM, correlated over seconds; docs/performance.md), which
        timing whole runs and differencing them amplified. Statistics over every iteration of the ``repeats`` runs:
        the median time and the median ratio, or (``stat="min"``) the fastest iteration over the
        fastest floor."""
        run(forward)  # warm-up
        self.reset_peak()
        run(forward)
        peak = self.peak_mb()
        times: List[float] = []
        bases: List[float] = []
        last: dict = {}

        def timed(inp):
            if torch.is_grad_enabled() and inp.requires_grad:  # an iteration starts here
                self.sync()
                now = self.clock()
                if last:
                    times.append(now - last["start"] - last["floor"])
                    bases.append(last["floor"])
                last.update(start=now, floor=self.once(floor))
            return forward(inp)
        for _ in range(self.repeats):
            last.clear()
            run(timed)
        if not times:
            raise SetupError("an attack run made fewer than 2 input-gradient forwards: raise --iters")
        if self.stat == "min":
            return min(times), min(times) / min(bases), peak
        return statistics.median(times), statistics.median([t / b for t, b in zip(times, bases)]), peak


# ------------------------------------------------------------------ the model and its batch
def parse_size(text: str) -> Tuple[int, int]:
    """'97x129' or '97' -> (97, 129) / (97, 97)."""
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not m:
        raise SetupError(f"--size must be H or HxW (pixels), got '{text}'")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if min(h, w) < MIN_SIZE:
        raise SetupError(f"--size {text}: height and width must be at least {MIN_SIZE} pixels")
    return h, w


def check_out(path: Optional[str]) -> None:
    """`--out` must be a file name in a folder this process can write, checked before anything is
    timed (a run that cannot write its rows loses them)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SetupError(f"--out {path}: is a folder; give a .json file name")
    if not os.path.isdir(folder):
        raise SetupError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SetupError(f"--out {path}: not writable")


def load_benchmark_config(path: str, classes: Optional[int], overrides=()):
    """The experiment config with data-independent settings: `classes` overrides data.classes."""
    from utils.config import load_config
    extra = list(overrides) + ([f"data.classes={classes}"] if classes else [])
    cfg = load_config(path, extra)
    cfg.model.pretrained = None  # benchmark random weights: no ImageNet file needed
    cfg.model.weights = None
    return cfg


def build_for(cfg, device: torch.device) -> nn.Module:
    from models import build_model
    torch.manual_seed(0)
    return build_model(cfg).to(device)


def make_batch(cfg, model: nn.Module, batch: int, size: Tuple[int, int], device: torch.device) -> dict:
    """Random images, labels with an ignored band, and for a multitask model a target per output."""
    g = torch.Generator().manual_seed(0)
    h, w = size
    x = torch.rand(batch, 3, h, w, generator=g)
    y = torch.randint(0, cfg.data.classes, (batch, h, w), generator=g)
    y[:, : max(h // 16, 1)] = cfg.data.ignore_label
    out = {"image": x, "label": y, "index": torch.arange(batch)}
    if getattr(model, "multitask", False):
        from attacks.multitask import SEG_TASK
        model.eval()
        with torch.no_grad():
            shapes = {t: o.shape for t, o in model(x[:1].to(device)).items()}
        out["targets"] = {t: (y if t == SEG_TASK else torch.rand((batch,) + tuple(s[1:]), generator=g))
                          for t, s in shapes.items()}
        out["masks"] = {t: torch.ones_like(v, dtype=torch.bool) if t != SEG_TASK else None
                        for t, v in out["targets"].items()}
        out["masks"] = {t: m for t, m in out["masks"].items() if m is not None}
    return {k: (v.to(device) if torch.is_tensor(v) else
                {t: a.to(device) for t, a in v.items()} if isinstance(v, dict) else v) for k, v in out.items()}


AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Optional[str]):
    """The training step's autocast context (a no-op without `amp`)."""
    import contextlib
    return contextlib.nullcontext() if amp is None else torch.autocast(device_type=device.type, dtype=AMP[amp])


def outputs_forward(model: nn.Module, amp: Optional[str]) -> Callable:
    """The model's outputs as the evaluator's attacks see them (engine.protocols.autocast_forward)."""
    from engine.protocols import autocast_forward
    return autocast_forward(model, AMP[amp])


def main_forward(model: nn.Module, amp: Optional[str], device: torch.device) -> Callable:
    """Eval-mode logits of the segmentation output (float32 under autocast), as attacks see them."""
    fwd = outputs_forward(model, amp)
    if not getattr(model, "multitask", False):
        return fwd
    return lambda x: fwd(x)[model.main_output]


# ------------------------------------------------------------------ rows
def model_rows(meter: Meter, cfg, model: nn.Module, batch: dict, amp: Optional[str]) -> Tuple[List[Row], Callable]:
    """forward, forward + input backward (its function returned: the attack floor), clean training step."""
    from attacks import attack_mode
    x, y = batch["image"], batch["label"]
    fwd = main_forward(model, amp, meter.device)
    ignore = cfg.data.ignore_label
    with attack_mode(model):
        def forward():
            with torch.no_grad():
                fwd(x)

        def fwd_bwd():
            xa = x.clone().requires_grad_(True)
            loss = F.cross_entropy(fwd(xa), y, ignore_index=ignore, reduction="none").flatten(1).mean(1).sum()
            torch.autograd.grad(loss, xa)
        t_f, m_f = meter.median(forward)
        t_fb, m_fb = meter.median(fwd_bwd)
    step = train_step_fn(cfg, model, "none", batch, amp)
    t_s, m_s = meter.median(step)
    rows = [Row("forward", "model", t_f * 1e3, None, None, m_f),
            Row("forward + input backward", "model", t_fb * 1e3, 1.0, None, m_fb),
            Row("clean training step", "model", t_s * 1e3, None, None, m_s)]
    return rows, fwd_bwd


def attack_specs(cfg, model: nn.Module) -> List[Tuple[str, str, dict]]:
    """(row name, attack name, options without steps) for every registered attack that applies:
    the sign attacks, APGD with every loss, the multitask attack on multitask models. Transfer
    attacks cost their source model's iterations and are left out."""
    from attacks import ATTACKS, LOSSES
    sign = {"eps": ATTACK_EPS, "alpha": ATTACK_ALPHA, "random_start": True}
    specs = []
    for name in ATTACKS.names():
        if name in ("transfer", "apgd", "fgsm"):
            continue
        if name == "multitask":
            if getattr(model, "multitask", False):
                specs.append(("multitask (every output)", name, dict(sign)))
            continue
        takes = inspect.signature(ATTACKS.get(name)).parameters  # (dag has no alpha, padam no random_start)
        specs.append((name, name, {k: v for k, v in dict(sign, random_start=name != "mim").items() if k in takes}))
    for loss in LOSSES.names():
        opts = {"eps": ATTACK_EPS, "loss": loss, "prr": False, "early_stop": False, "random_start": True}
        if loss == "mask-ce-bal":
            opts["class_weights"] = [1.0 / cfg.data.classes] * cfg.data.classes
        specs.append((f"apgd {loss}", "apgd", opts))
    return specs


def attack_rows(meter: Meter, cfg, model: nn.Module, batch: dict, amp: Optional[str], floor: Callable,
                iters: int) -> List[Row]:
    """FGSM whole against the floor (paired), then one iteration of every attack (``iters`` per run)."""
    from attacks import attack_mode, build_attack
    from attacks.multitask import task_targets
    x = batch["image"]
    rows = []
    with attack_mode(model):
        fwd = main_forward(model, amp, meter.device)
        fgsm = build_attack("fgsm", eps=ATTACK_EPS)
        t, ratio, m = meter.paired(lambda: fgsm(fwd, x, batch["label"]), floor)
        rows.append(Row("fgsm (1 step, whole attack)", "attack", t * 1e3, ratio, None, m))
        for row_name, name, opts in attack_specs(cfg, model):
            if name == "multitask":
                y = task_targets(batch["targets"], batch["masks"])

                forward = outputs_forward(model, amp)
            else:
                y, forward = batch["label"], fwd

            attack = build_attack(name, seed=0, **dict(opts, steps=iters))

            def run(f, attack=attack, y=y):
                attack(f, x, y, keys=batch["index"].tolist())
            t, ratio, m = meter.per_iteration(run, forward, floor)
            rows.append(Row(row_name, "attack", t * 1e3, ratio, None, m))
    return rows


# ------------------------------------------------------------------ training methods' bounds
# Pass counts per image in forward-equivalents (a forward and a backward to the input count one each; a
# clean training step, forward and backward, counts 3), keyed by train.method.
def attack_passes(defense: Defense) -> float:
    """Forward-equivalents per attacked image of the method's training attack (a forward and an input
    backward count one each): 2 per sign step, 2 per APGD iteration plus its final forward; 0 without
    an attack."""
    if defense.attack is None:
        return 0.0
    steps = int(defense.attack.options.get("steps") or 1)
    return 2.0 * steps + (1.0 if defense.attack.name == "apgd" else 0.0)


def sat_bound(defense: Defense) -> float:
    """(2k * adversarial share + 3) / 3: the attack on the replaced images, one training step."""
    return (attack_passes(defense) * defense.adv_fraction + 3.0) / 3.0


def pirat_bound(defense: Defense) -> float:
    """(2k + 3) / 3, plus one forward when the attack starts away from the clean image (the clean logs;
    ``Attack.starts_at_x``, as the attack declares it)."""
    extra = 0.0 if defense.attack.starts_at_x else 1.0
    return (attack_passes(defense) + 3.0 + extra) / 3.0


def ddcat_bound(defense: Defense) -> float:
    """(2k + 2 * clean share + 3) / 3: the attack on the whole batch, the two no-grad routed
    forwards of the clean part, one training step (the published method's pass count; here the
    clean part's routed forward shares the attack's first backbone pass when the attack starts at
    the clean image, and only its f_a and f_m heads run on their own)."""
    return (attack_passes(defense) + 2.0 * (1.0 - defense.adv_fraction) + 3.0) / 3.0


def mtl_bound(defense: Defense) -> float:
    """Clean: 1. Adversarial: (2k + 3) / 3, or (2k + 6) / 3 when clean images join the training forward."""
    if defense.attack is None:
        return 1.0
    return (attack_passes(defense) + (6.0 if defense.mix_clean else 3.0)) / 3.0


def fpd_bound(defense: Defense) -> float:
    """Two-phase: 2 (the joint and the cycle step; the gated warm-up is one step). Adversarial
    fine-tuning: (2k + 1 + 6 + 3) / 3: the attack, the labelling forward, the step on [x; x_adv],
    the cycle step."""
    if not defense.adversarial_finetuning:
        return 2.0
    return (attack_passes(defense) + 10.0) / 3.0


COST_BOUNDS: Dict[str, Callable[[Defense], float]] = {
    "sat": sat_bound, "pirat": pirat_bound, "ddcat": ddcat_bound, "mtl": mtl_bound, "fpd": fpd_bound}


def cost_bound(defense: Defense) -> Optional[float]:
    """Pass-count floor of one training iteration of the method in clean-step units (a clean step = 3
    forward-equivalents: forward, backward): the method's entry in ``COST_BOUNDS``; otherwise 1 for a
    method without an attack (the clean step itself) and None (not stated) for one with an attack."""
    bound = COST_BOUNDS.get(defense.cfg.train.method)
    if bound is not None:
        return bound(defense)
    return 1.0 if defense.attack is None else None


Loss = Tuple[torch.Tensor, Dict[str, torch.Tensor]]  # (loss, logs) as Defense.loss gives them


def ddcat_reference_loss(defense: Defense, model: nn.Module, batch: dict) -> Loss:
    """DDC-AT's loss on the clean batch with every mask label 0 (no attack, no routed forwards):
    a training step of all three heads, which the clean loss (o_n and aux only) leaves out of
    the backward; this is the training step that `ddcat_bound` counts."""
    y = batch["label"]
    return defense.batch_loss(model, batch["image"], torch.zeros_like(y), y, y.shape[0])


REFERENCE_LOSSES: Dict[str, Callable[[Defense, nn.Module, dict], Loss]] = {"ddcat": ddcat_reference_loss}


def reference_loss(defense: Defense, model: nn.Module, batch: dict) -> Loss:
    """(loss, logs) of the method's training loss on the clean batch without its attack: the "one
    training step" (three passes) that `cost_bound` counts in. The clean loss (`train.method: none`),
    except for a method in ``REFERENCE_LOSSES``, whose own loss trains more of the model than that."""
    own = REFERENCE_LOSSES.get(defense.cfg.train.method)
    if own is not None:
        return own(defense, model, batch)
    return defense.task_loss(model(batch["image"]), batch)


def reference_steps(defense: Defense, model: nn.Module, batch: dict):
    """`Defense.steps` for the method's reference loss: one step, computed when first asked for (under
    the caller's autocast)."""
    yield (*reference_loss(defense, model, batch), None)


def train_step_fn(cfg, model: nn.Module, method: str, batch: dict, amp: Optional[str],
                  reference: bool = False) -> Callable[[], None]:
    """One training iteration of `method` as the engine runs it: each of the method's optimisation
    steps' backward and optimiser step (plain SGD at a tiny lr keeps the weights near their start).
    ``reference``: one step on the method's loss without its attack (`reference_loss`), the unit of
    its `cost_bound`."""
    from defenses import build_defense
    from engine.trainer import build_optimizers
    c = copy.deepcopy(cfg)
    c.train.method = method
    c.train.lr, c.train.warmup_epochs = 1e-6, 0
    defense = build_defense(c)
    defense.prepare(model)
    optimizers = build_optimizers(c, model, defense)
    device = batch["image"].device

    def step():
        model.train()
        steps = reference_steps(defense, model, batch) if reference else defense.steps(model, batch)
        while True:
            with autocast(device, amp):
                s = next(steps, None)
            if s is None:
                return
            loss, _, phase = s
            model.zero_grad(set_to_none=True)
            loss.backward()
            optimizers[phase].step()
    return step


def defense_variant(cfg, method: str) -> Optional[str]:
    """The model the method trains: the config's own, or its DDC-AT variant for ddcat."""
    name = cfg.model.name
    if method == "ddcat" and not name.endswith("_ddcat"):
        from models.registry import MODELS
        return name + "_ddcat" if name + "_ddcat" in MODELS else None
    return name


def defense_rows(meter: Meter, cfg, batch_size: int, size, amp: Optional[str]) -> List[Row]:
    """One training step per method that fits the model, against its reference step on the same model
    and batch (`reference_loss`: the clean loss, or the method's own loss without the attack where it
    trains more of the model than that)."""
    from defenses import DEFENSES, build_defense
    rows: List[Row] = []
    for method in DEFENSES.names():
        if method == "none":
            continue
        variant = defense_variant(cfg, method)
        if variant is None:
            continue
        c = copy.deepcopy(cfg)
        c.model.name = variant
        c.train.method = method
        c.train.mtl.adversarial = True  # the adversarial variants of the multitask and FPD methods
        c.train.fpd.adversarial = c.train.fpd.adversarial if method != "fpd" else True
        if method == "fpd":
            c.train.attack = None
        model = build_for(c, meter.device)
        batch = make_batch(c, model, batch_size, size, meter.device)
        try:
            build_defense(c).prepare(model)
            step = train_step_fn(c, model, method, batch, amp)
        except SetupError:
            continue  # the method does not fit this model
        clean = train_step_fn(c, model, method, batch, amp, reference=True)
        t, ratio, m = meter.paired(step, clean)
        d = build_defense(c)
        k = int(d.attack.options.get("steps") or 1) if d.attack is not None else 0
        label = f"{method}{f' {k}-step' if k else ''}" + (f" ({variant})" if variant != cfg.model.name else "")
        rows.append(Row(label, "defense", t * 1e3, ratio, cost_bound(d), m))
    return rows


def aggregation_row(meter: Meter, n: int = 2000, attacks: int = 3, classes: int = 151, seed: int = 0) -> Row:
    """The full worst-case report (local search + summaries) on random realistic counts; wall time."""
    from utils.metrics import worst_case
    rng = np.random.default_rng(seed)
    present = rng.random((n, classes)) < 0.08                     # ~12 classes per image
    tgt = rng.integers(50, 5000, (n, classes)) * present
    inter = (tgt[None] * rng.uniform(0.0, 1.0, (attacks, n, classes))).astype(np.int64)
    spill = rng.integers(0, 2000, (attacks, n, classes)) * (rng.random((attacks, n, classes)) < 0.1)
    union = tgt[None] + spill
    meter.reset_peak()
    times = []
    for _ in range(max(meter.repeats, 1)):
        t = time.perf_counter()
        worst_case(inter, union, tgt)
        times.append(time.perf_counter() - t)
    return Row(f"worst case, {n} images x {attacks} attacks x {classes} classes", "aggregation",
               meter.pick(times) * 1e3, None, None, meter.peak_mb())


# ------------------------------------------------------------------ report
def format_rows(rows: List[Row]) -> str:
    head = ["name", "kind", "median ms", "ratio", "bound", "peak MB"]
    body = [[r.name, r.kind, f"{r.median_ms:.1f}", "" if r.ratio is None else f"{r.ratio:.3f}",
             "" if r.bound is None else f"{r.bound:.3f}", f"{r.peak_mb:.0f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [head] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run(config: str, batch: int = 4, size: Tuple[int, int] = (97, 97), classes: Optional[int] = None,
        iters: int = 10, device: str = "cpu", amp: Optional[str] = None, repeats: int = 3,
        kinds=("model", "attack", "defense", "aggregation"), aggregation=(2000, 3, 151),
        stat: str = "median") -> List[Row]:
    """Every row for one config (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        keep_cpu_memory()  # as train.py and test.py run on the CPU (engine.common.setup_runtime)
    meter = Meter(dev, repeats, stat)
    cfg = load_benchmark_config(config, classes)
    model = build_for(cfg, dev)
    data = make_batch(cfg, model, batch, size, dev)
    rows: List[Row] = []
    m_rows, floor = model_rows(meter, cfg, model, data, amp)
    if "model" in kinds:
        rows += m_rows
    if "attack" in kinds:
        rows += attack_rows(meter, cfg, model, data, amp, floor, iters)
    if "defense" in kinds:
        rows += defense_rows(meter, cfg, batch, size, amp)
    if "aggregation" in kinds:
        rows.append(aggregation_row(meter, *aggregation))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="experiment YAML (its model, classes, training settings)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", default="97x97", help="HxW of the input")
    ap.add_argument("--classes", type=int, default=None, help="override data.classes")
    ap.add_argument("--iters", type=int, default=10, help="iterations per timed attack run (>= 2)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast for forward/backward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="over the repeats (min: the fastest; median_ms then holds it)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads on the CPU (default: torch's)")
    ap.add_argument("--only", default="model,attack,defense,aggregation", help="comma-separated row kinds")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    try:
        if not os.path.isfile(a.config):
            raise SetupError(f"--config: no such file: {a.config}")
        size = parse_size(a.size)
        if a.batch < 2 or a.iters < 2 or a.repeats < 1 or (a.classes is not None and a.classes < 2):
            raise SetupError("--batch must be >= 2 (training steps with BatchNorm), --iters >= 2 (an iteration is "
                             "timed between two forwards), --repeats >= 1, --classes >= 2")
        if a.threads is not None and a.threads < 1:
            raise SetupError(f"--threads must be >= 1, got {a.threads}")
        check_out(a.out)
        load_benchmark_config(a.config, a.classes)  # a bad config is refused before anything is timed
        if a.device == "cuda" and not torch.cuda.is_available():
            raise SetupError("--device cuda: no GPU is visible")
        if a.amp == "fp16" and a.device != "cuda":
            raise SetupError("--amp fp16 needs --device cuda (use bf16 on the CPU)")
        kinds = tuple(k for k in a.only.split(",") if k)
        bad = [k for k in kinds if k not in ("model", "attack", "defense", "aggregation")]
        if bad:
            raise SetupError(f"--only: unknown row kind(s) {bad}; valid: model, attack, defense, aggregation")
        if a.threads:
            torch.set_num_threads(a.threads)
        rows = run(a.config, a.batch, size, a.classes, a.iters, a.device, a.amp, a.repeats, kinds, stat=a.stat)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.config}: batch {a.batch}x3x{size[0]}x{size[1]}, device {a.device}, amp {a.amp or 'off'}, "
          f"{torch.get_num_threads()} thread(s), {a.stat} of {a.repeats}, torch {torch.__version__}")
    print(format_rows(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
