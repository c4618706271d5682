"""The dataset registry: ``@register_dataset("name")`` on a builder ``fn(config, split) -> Dataset``."""
from utils.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register
