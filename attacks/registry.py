"""The attack registry: ``@register_attack("name")`` on a plain function ``fn(forward, x, y, **options)``."""
from utils.registry import Registry

ATTACKS = Registry("attack")
register_attack = ATTACKS.register
