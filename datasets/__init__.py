"""Datasets. Add one: a module with a ``@register_dataset`` builder, imported below.

Samples are dicts: {"image": [3,H,W] float RGB in [0,1], "label": [H,W] long (255 = ignore), "index": int};
multitask datasets add {"targets": {task: tensor}, "masks": {task: [1,H,W] float}} (datasets/multitask.py).
Every dataset has ``classes``, ``set_epoch(epoch)`` and ``name(index)`` (output file stem).
"""
from torch.utils.data import Dataset

from utils.errors import SetupError

from .registry import DATASETS, register_dataset
from . import synthetic, cityscapes, voc, ade20k, taskonomy  # noqa: F401  (register)
from . import folder  # noqa: F401  (registers: your own labelled images)

SPLITS = ("train", "val", "test")


def build_dataset(config, split: str) -> Dataset:
    """The `split` ("train" with augmentation, "val"/"test" without) of ``config.data.name``."""
    if split not in SPLITS:
        raise SetupError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return DATASETS.get(config.data.name)(config, split)


__all__ = ["build_dataset", "register_dataset", "DATASETS"]
