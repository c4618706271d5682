"""What every attack shares: pass counting, the eps-ball projection, the frozen-model context.

An attack is a plain function ``fn(forward, x, y, *, eps, ..., counter=None, rng=None) -> x_adv`` on a
batch: `forward` maps images in [0,1] to logits [B,C,H,W]; eps and step sizes are in [0,1] units there.
One that can start at x itself declares when it does (``register_attack(..., starts_at_x=...)``) and
takes ``clean_forward=None``, which it calls instead of `forward` for that forward of x.
``build_attack`` wraps it in an :class:`Attack` that takes config units (1/255) and keeps counts.

Random draws (random starts) come from :class:`ImageSeeds`: one generator per image, seeded by
(seed, attack label, image key, restart), so the draws never depend on the batch size, the grouping
of images, the number of processes or a resume (the result still carries the kernels' rounding,
which differs between batch sizes: equal up to rounding, not bit for bit; docs/reproducibility.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import is_number, yaml_float
from utils.errors import SetupError
from utils.registry import closest

from .losses import get_loss
from .registry import attack_spec

PIXEL_OPTIONS = ("eps", "alpha")  # given in 1/255 in configs


@dataclass
class PassCounter:
    """Forward and (input) backward passes, totals since the counter was made: each image, or sliding
    window, through the model counts one (a batch of 8 counts 8), summed over every call of the attack.
    metrics.json's ``forward_passes`` / ``backward_passes`` are these totals over the evaluated images
    (all processes and resumed parts); divided by ``num_images`` they give the cost per image."""
    forward: int = 0
    backward: int = 0


def counted(forward: Callable, counter: Optional[PassCounter]) -> Callable:
    """Wrap `forward` so each call adds the batch size to ``counter.forward``."""
    if counter is None:
        return forward

    def fwd(x: torch.Tensor):
        counter.forward += x.shape[0]
        return forward(x)
    return fwd


def input_grad(loss: torch.Tensor, x: torch.Tensor, counter: Optional[PassCounter]) -> torch.Tensor:
    """d loss / d x only (never touches parameter .grad), counting one backward per image."""
    if counter is not None:
        counter.backward += x.shape[0]
    return torch.autograd.grad(loss, x)[0]


@dataclass(frozen=True)
class ImageSeeds:
    """Per-image random streams for one attack call: row b of the batch draws from a generator
    seeded by (seed, label, keys[b], restart). A key is the image index, or (index, window) when
    the rows are sliding windows of one image."""
    seed: int
    label: str
    keys: Tuple[Tuple[int, ...], ...]

    def generator(self, row: int, restart: int = 0) -> torch.Generator:
        blob = f"{self.seed}|{self.label}|{'/'.join(map(str, self.keys[row]))}|{restart}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1)

    def uniform(self, like: torch.Tensor, bound: float, restart: int = 0) -> torch.Tensor:
        """U(-bound, bound) noise shaped like `like`; drawn in float32 on the CPU (identical on every
        device), one image at a time (once per attack, not per iteration)."""
        if len(self.keys) != like.shape[0]:
            raise ValueError(f"{len(self.keys)} seed keys for a batch of {like.shape[0]}")
        rows = [torch.rand(like.shape[1:], generator=self.generator(b, restart)) for b in range(like.shape[0])]
        return ((2 * torch.stack(rows) - 1) * bound).to(like.device, like.dtype)


def image_seeds(seed: int, label: str, keys: Sequence) -> ImageSeeds:
    """ImageSeeds from image indices (ints) or key tuples."""
    return ImageSeeds(int(seed), str(label), tuple(tuple(int(v) for v in k) if isinstance(k, (tuple, list))
                                                   else (int(k),) for k in keys))


def uniform_noise(like: torch.Tensor, bound: float, rng: Optional[ImageSeeds], restart: int = 0) -> torch.Tensor:
    """U(-bound, bound) noise: from the per-image seeds, or torch's global generator when none are given
    (direct calls in tests; the evaluator and the training methods always pass seeds)."""
    if rng is not None:
        return rng.uniform(like, bound, restart)
    return (2 * torch.rand(like.shape, generator=None, device=like.device, dtype=like.dtype) - 1) * bound


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip to the L-inf ball of radius eps around x and to [0,1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)


def pixel_ce(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel cross-entropy [B,H,W]; exactly 0 (value and gradient) at ignored pixels."""
    return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Model in eval mode with parameters frozen (requires_grad False); both restored on exit.

    Every submodule gets its own mode back (not ``model.train()``, which would also switch the
    BatchNorm layers that ``train.freeze_bn`` keeps in eval mode back to training)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


_KIND_TEXT = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _option_kind(hint: Any) -> Tuple[Optional[type], bool]:
    """(float, int, bool or str, whether null is allowed) from a parameter's annotation; (None, _)
    for annotations that are not checked here (sequences, mappings, callables)."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    return (hint if hint in _KIND_TEXT else None), optional


def typed_option(attack: str, key: str, value: Any, hint: Any) -> Any:
    """`value` checked against the attack function's annotation `hint` (floats written as '1e-3'
    become floats); SetupError naming the attack and the option otherwise."""
    kind, optional = _option_kind(hint)
    if kind is None or (value is None and optional):
        return value
    if kind is float:
        value = yaml_float(value)
    ok = {float: is_number(value), int: isinstance(value, int) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str)}[kind]
    if not ok:
        raise SetupError(f"attack '{attack}': {key} must be {_KIND_TEXT[kind]}"
                         f"{' or null' if optional else ''}, got {value!r}")
    return value


class Attack:
    """A configured attack: ``attack(forward, x, y) -> x_adv``, accumulating ``attack.counter``.

    Options come in config units: ``eps`` and ``alpha`` in 1/255 (converted here).
    """

    def __init__(self, name: str, fn: Callable, *, seed: int = 0, label: Optional[str] = None, **options):
        spec = attack_spec(fn)
        if spec.prepare is not None:
            options = spec.prepare(name, dict(options))
        for k in options:
            if k not in spec.options:
                raise SetupError(f"attack '{name}' has no option '{k}'{closest(k, spec.options)}; "
                                 f"valid: {', '.join(spec.options)}")
        options = {k: typed_option(name, k, v, spec.hints.get(k)) for k, v in options.items()}
        if "eps" in options and not options["eps"] > 0:
            raise SetupError(f"attack '{name}': eps must be > 0, got {options['eps']}")
        if "alpha" in options and options["alpha"] is not None and not options["alpha"] > 0:
            raise SetupError(f"attack '{name}': alpha must be > 0, got {options['alpha']}")
        if "steps" in options and options["steps"] is not None and not (
                isinstance(options["steps"], int) and not isinstance(options["steps"], bool) and options["steps"] >= 1):
            raise SetupError(f"attack '{name}': steps must be an integer >= 1, got {options['steps']}")
        if options.get("decay") is not None and not options["decay"] >= 0:
            raise SetupError(f"attack '{name}': decay must be >= 0, got {options['decay']}")
        if "loss" in options:
            get_loss(options["loss"])  # validates the name, listing the valid ones
        missing = [k for k in spec.required if k not in options]
        if missing:
            raise SetupError(f"attack '{name}' needs option(s) {', '.join(missing)}")
        if spec.check is not None:
            spec.check(name, dict(options))
        self.name, self.fn, self.spec, self.options = name, fn, spec, dict(options)
        self.seed, self.label = seed, label or name
        self.kwargs = {k: (v / 255.0 if k in PIXEL_OPTIONS and v is not None else v) for k, v in options.items()}
        self.counter = PassCounter()
        self.scale = 1.0

    def set_scale(self, factor: float) -> None:
        """Run at `factor` times the configured eps and alpha (a training attack's eps warm-up)."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"attack scale must be in (0, 1], got {factor}")
        self.scale = float(factor)
        for k in PIXEL_OPTIONS:
            if self.options.get(k) is not None:
                self.kwargs[k] = self.options[k] * self.scale / 255.0

    @property
    def multitask(self) -> bool:
        """True for attacks on multitask outputs: forward returns {task: output}, y is {task: target}."""
        return self.spec.multitask

    @property
    def starts_at_x(self) -> bool:
        """Whether the first iterate is x itself (no random start), as the attack declares it for
        these options: then a `clean_forward` given to the call evaluates x."""
        declared = self.spec.starts_at_x
        return declared is not None and declared({**self.spec.defaults, **self.options})

    def __call__(self, forward: Callable, x: torch.Tensor, y, keys: Optional[Sequence] = None,
                 clean_forward: Optional[Callable] = None) -> torch.Tensor:
        """x_adv for the batch; `keys` (one image index or key tuple per row) seed its random draws.

        `clean_forward`: when the attack starts at x (`starts_at_x`), it calls this instead of
        `forward` for that forward (counted the same), so the caller gets the output at x without a
        forward of its own; it must return what `forward` would. Otherwise it is never called."""
        extra = {"rng": image_seeds(self.seed, self.label, keys)} if self.spec.takes_rng and keys is not None else {}
        if clean_forward is not None and self.spec.starts_at_x is not None:
            extra["clean_forward"] = clean_forward
        return self.fn(forward, x, y, counter=self.counter, **self.kwargs, **extra)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.options.items() if not callable(v) and k != "class_weights"}
        scale = "" if self.scale == 1.0 else f" at {self.scale:g} x eps"
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in shown.items())}){scale}"
