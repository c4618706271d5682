"""PASCAL VOC 2012 (+SBD augmented labels): ``JPEGImages/*.jpg`` + ``SegmentationClassAug/*.png``.

Labels are index PNGs (palette or single-channel): PIL returns the class ids, not luminance. 21 classes,
255 marks object boundaries and is ignored; ``data.boundary_as_background`` turns 255 into background
(0) instead, as the SEA evaluation does (sea.md §3). List files (``list/train_aug.txt``, ``list/val.txt``)
hold ``image label`` paths relative to the root, or bare image ids as in ``ImageSets/Segmentation/*.txt``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_list, split_list
from .registry import register_dataset
from .transforms import build_transform

CLASSES = 21
IMAGE_DIR, LABEL_DIR = "JPEGImages", "SegmentationClassAug"


def voc_items(root: str, list_file: str) -> List[Tuple[str, Optional[str]]]:
    """Pairs from a list file; a bare id `2007_000032` means JPEGImages/<id>.jpg + SegmentationClassAug/<id>.png."""
    items = []
    for img, lbl in read_list(root, list_file):
        rel = os.path.relpath(img, root)
        if lbl is None and os.sep not in rel and not os.path.splitext(rel)[1]:
            img, lbl = os.path.join(root, IMAGE_DIR, rel + ".jpg"), os.path.join(root, LABEL_DIR, rel + ".png")
        items.append((img, lbl))
    return items


def boundary_to_background(lbl: np.ndarray) -> np.ndarray:
    """SEA protocol: the 255 boundary band counts as background."""
    return np.where(lbl == 255, 0, lbl)


@register_dataset("voc2012")
def build_voc(cfg, split: str) -> SegDataset:
    d = cfg.data
    if d.classes != CLASSES:
        raise SetupError(f"data.classes must be {CLASSES} for voc2012, got {d.classes}")
    list_file = split_list(d, split)
    if not list_file:
        raise SetupError(f"voc2012 needs a list file for split '{split}' (data.{split}_list)")
    items = check_items(voc_items(d.root, list_file), os.path.join(d.root, list_file))
    label_map = boundary_to_background if d.boundary_as_background else None
    return SegDataset(items, d.classes, d.ignore_label, build_transform(d, split), cfg.seed, label_map)
