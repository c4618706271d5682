"""Training methods. Add one: a module with an ``@register_defense`` class, imported below."""
from .base import Defense
from .registry import DEFENSES, register_defense
from . import none  # noqa: F401  (registers)
from . import sat  # noqa: F401  (registers)
from . import ddcat  # noqa: F401  (registers)
from . import fpd  # noqa: F401  (registers)
from . import pirat  # noqa: F401  (registers)
from . import mtl  # noqa: F401  (registers)


def build_defense(config) -> Defense:
    """The training method named by ``config.train.method``."""
    return DEFENSES.get(config.train.method)(config)


__all__ = ["build_defense", "register_defense", "DEFENSES", "Defense"]
