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
# passed by the caller, never config options
RUNTIME_ARGS = ("forward", "x", "y", "counter", "rng", "clean_forward")


@dataclass(frozen=True)
class AttackSpec:
    """An attack function's options and declarations."""
    options: Tuple[str, ...]     # its config options: the parameters other than the runtime arguments
    required: Tuple[str, ...]    # the options without a default
    hints: Mapping[str, Any]     # their annotations ({} where one does not resolve: types left unchecked)
    takes_rng: bool              # whether it draws random numbers (gets per-image seeds)
    defaults: Mapping[str, Any]  # the options' defaults (where they have one)
    multitask: bool = False      # forward returns {task: output} and y is {task: target}
    # whether the first iterate is x itself, from the options (defaults filled in); None: never said,
    # and the attack takes no `clean_forward` (an attack that declares it calls that for its forward of x)
    starts_at_x: Optional[Callable[[Mapping[str, Any]], bool]] = None
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
    defaults = {k: params[k].default for k in options if k not in required}
    return AttackSpec(options, required, hints, "rng" in params, defaults, **declared)


def unless_random_start(options: Mapping[str, Any]) -> bool:
    """``starts_at_x`` of an attack with a ``random_start`` option: at x when it is off."""
    return not options["random_start"]


def always(options: Mapping[str, Any]) -> bool:
    """``starts_at_x`` of an attack that never draws a random start."""
    return True


def attack_spec(fn: Callable) -> AttackSpec:
    """The spec `fn` was registered with, or one read from its signature (an unregistered function)."""
    return _SPECS.get(fn) or _read_spec(fn)


def register_attack(name: str, *, multitask: bool = False, check: Optional[Callable[[str, dict], None]] = None,
                    prepare: Optional[Callable[[str, dict], dict]] = None,
                    starts_at_x: Optional[Callable[[Mapping[str, Any]], bool]] = None
                    ) -> Callable[[Callable], Callable]:
    """Register an attack function under `name` with its declarations (see ``AttackSpec``).

    ``starts_at_x`` (e.g. ``unless_random_start``, ``always``) goes with a ``clean_forward=None``
    parameter: when given, the function calls it instead of `forward` for its one forward of x itself,
    so a caller that needs the model's output at x gets it from the attack."""
    def deco(fn: Callable) -> Callable:
        if (starts_at_x is None) == ("clean_forward" in inspect.signature(fn).parameters):
            raise TypeError(f"attack '{name}': declare starts_at_x exactly when the function takes clean_forward")
        _SPECS[fn] = _read_spec(fn, multitask=multitask, check=check, prepare=prepare, starts_at_x=starts_at_x)
        return ATTACKS.register(name)(fn)
    return deco
