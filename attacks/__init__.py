"""Attacks on segmentation models. Add one: a module with an ``@register_attack`` function, imported below."""
from .base import Attack, PassCounter, attack_mode
from .registry import ATTACKS, register_attack
from . import pgd  # noqa: F401  (registers)


def build_attack(name: str, **options) -> Attack:
    """A configured attack; ``eps``/``alpha`` in 1/255, other options as the function takes them."""
    return Attack(name, ATTACKS.get(name), **options)


__all__ = ["build_attack", "register_attack", "ATTACKS", "Attack", "PassCounter", "attack_mode"]
