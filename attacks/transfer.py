"""Transfer (black-box) attack: craft on a source model, evaluate the target on the result (ddcat.md §5).

The evaluator builds the source model from the entry's ``source_config`` / ``source_checkpoint``
(they are accepted here as options only so that they validate and show in the attack's name), puts
it in ``attack_mode`` and passes ``source_forward=<its forward>`` to ``build_attack``. The target's
``forward`` is not touched: every counted pass is a source-model pass.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from utils.errors import SetupError

from .base import Attack, ImageSeeds, PassCounter
from .registry import ATTACKS, attack_spec, register_attack


def _hoist_alpha(name: str, options: dict) -> dict:
    """`options` with inner_options' alpha moved to the top level, where ``Attack`` converts it from
    1/255 (and scales it with eps); passed on from inner_options it would reach the inner attack unconverted."""
    inner = options.get("inner_options")
    if isinstance(inner, dict) and "alpha" in inner:
        if options.get("alpha") is not None:
            raise SetupError(f"attack '{name}': alpha given both at the top level and in inner_options; give it once")
        inner = dict(inner)
        options["alpha"] = inner.pop("alpha")
        options["inner_options"] = inner
    return options


def check_sources(label: str, options: dict) -> None:
    """An entry of ``test.attacks`` names its source model: ``source_config`` and ``source_checkpoint``,
    both existing files (one-line SetupError otherwise)."""
    for key in ("source_config", "source_checkpoint"):
        path = options.get(key)
        if not path:
            raise SetupError(f"attack '{label}': transfer needs source_config and source_checkpoint")
        if not os.path.isfile(path):
            raise SetupError(f"attack '{label}': {key} '{path}' is not a file")


def _check_transfer(name: str, options: dict) -> None:
    """Validate the inner attack and its options at build time."""
    inner = options.get("inner", "pgd")
    if inner == "transfer":
        raise SetupError("attack 'transfer': inner attack cannot be 'transfer'")
    opts = dict(options.get("inner_options") or {})
    for k in ("alpha", "steps"):
        if options.get(k) is not None:
            opts[k] = options[k]
    if "eps" in opts:
        raise SetupError("attack 'transfer': give 'eps' at the top level, not in inner_options")
    Attack(inner, ATTACKS.get(inner), eps=options.get("eps", 1.0), **opts)


@register_attack("transfer", check=_check_transfer, prepare=_hoist_alpha)
def transfer(forward: Callable, x: torch.Tensor, y, *, eps: float, source_forward: Callable, inner: str = "pgd",
             alpha: Optional[float] = None, steps: Optional[int] = None, inner_options: Optional[dict] = None,
             source_config: Optional[str] = None, source_checkpoint: Optional[str] = None,
             counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None) -> torch.Tensor:
    """``inner`` attack (e.g. pgd, apgd, mim) run on ``source_forward``; alpha/steps passed on when set.

    ``inner_options`` holds the inner attack's other options; eps goes top-level, and an alpha given
    there (1/255) is moved top-level when the attack is built, so it is converted like the top-level one.
    """
    if not callable(source_forward):
        raise SetupError("attack 'transfer' needs source_forward: the source model's forward, built by the "
                         "evaluator from source_config / source_checkpoint")
    opts = dict(inner_options or {})
    if alpha is not None:
        opts["alpha"] = alpha
    if steps is not None:
        opts["steps"] = steps
    fn = ATTACKS.get(inner)
    if rng is not None and attack_spec(fn).takes_rng:
        opts["rng"] = rng
    return fn(source_forward, x, y, eps=eps, counter=counter, **opts)
