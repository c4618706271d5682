"""Attacks on segmentation models. Add one: a module with an ``@register_attack`` function, imported below."""
from typing import Optional

from .base import Attack, ImageSeeds, PassCounter, attack_mode, image_seeds
from .registry import ATTACKS, register_attack
from . import pgd, apgd, multitask, transfer, padam, dag, houdini  # noqa: F401  (registers)
from .ensemble import ENSEMBLES, AttackGroup, ensemble_members, expand_attacks, needs_class_weights
from .losses import LOSSES, class_weights_from_counts


def build_attack(name: str, *, seed: int = 0, label: Optional[str] = None, **options) -> Attack:
    """A configured attack; ``eps``/``alpha`` in 1/255, other options as the function takes them.
    `seed` and `label` (default: the name) seed its per-image random draws."""
    return Attack(name, ATTACKS.get(name), seed=seed, label=label, **options)


__all__ = ["build_attack", "register_attack", "ATTACKS", "Attack", "ImageSeeds", "image_seeds", "PassCounter",
           "attack_mode", "LOSSES",
           "class_weights_from_counts", "ENSEMBLES", "AttackGroup", "ensemble_members", "expand_attacks",
           "needs_class_weights"]
