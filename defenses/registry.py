"""The defense (training method) registry: ``@register_defense("name")`` on a class taking the config."""
from utils.registry import Registry

DEFENSES = Registry("training method (train.method)")
register_defense = DEFENSES.register
