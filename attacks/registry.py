"""The attack registry: ``@register_attack("name")`` on a plain function ``fn(forward, x, y, **options)``.

What build time needs to know about an attack is read from its signature once, at registration, with
what the registration declares (``AttackSpec``)."""
from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from utils.registry import Registry

ATTACKS = Registry("attack")
RUNTIME_ARGS = ("forward", "x", "y", "counter", "rng")  # passed by the caller, never config options


@dataclass(frozen=True)
class AttackSpec:
    """An attack function's options and declarations."""
    options: Tuple[str, ...]     # its config options: the parameters other than the runtime arguments
    required: Tuple[str, ...]    # the options without a default
    hints: Mapping[str, Any]     # their annotations ({} where one does not resolve: types left unchecked)
    takes_rng: bool              # whether it draws random numbers (gets per-image seeds)
    multitask: bool = False      # forward returns {task: output} and y is {task: target}
    check: Optional[Callable[[str, dict], None]] = None    # attack-specific validation at build time
    prepare: Optional[Callable[[str, dict], dict]] = None  # rewrites the options before they are validated


_SPECS: Dict[Callable, AttackSpec] = {}


def _read_spec(fn: Callable, **declared) -> AttackSpec:
    params = inspect.signature(fn).parameters
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve
        hints = {}
    options = tuple(k for k in params if k not in RUNTIME_ARGS)
    required = tuple(k for k in options if params[k].default is inspect.Parameter.empty)
    return AttackSpec(options, required, hints, "rng" in params, **declared)


def attack_spec(fn: Callable) -> AttackSpec:
    """The spec `fn` was registered with, or one read from its signature (an unregistered function)."""
    return _SPECS.get(fn) or _read_spec(fn)


def register_attack(name: str, *, multitask: bool = False, check: Optional[Callable[[str, dict], None]] = None,
                    prepare: Optional[Callable[[str, dict], dict]] = None) -> Callable[[Callable], Callable]:
    """Register an attack function under `name` with its declarations (see ``AttackSpec``)."""
    def deco(fn: Callable) -> Callable:
        _SPECS[fn] = _read_spec(fn, multitask=multitask, check=check, prepare=prepare)
        return ATTACKS.register(name)(fn)
    return deco
