"""ADE20K SceneParsing: ``ADEChallengeData2016/{images,annotations}/{training,validation}``.

Annotation PNGs hold 0 = other/unlabelled and 1..150 = classes. ``data.reduce_zero_label: true`` (default,
mmseg convention): 0 -> 255 (ignored), k -> k-1, 150 classes. ``false``: ids kept, 151 classes with 0 a
real class (SEA protocol, sea.md §3). Files are sorted (SEA lists them unsorted). ``data.root`` may be
the folder holding ``ADEChallengeData2016`` or that folder itself.
"""
from __future__ import annotations

import glob
import os
from typing import List, Tuple

import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_list, split_list
from .registry import register_dataset
from .transforms import build_transform

SPLIT_DIRS = {"train": "training", "val": "validation", "test": "validation"}


def reduce_zero_label(lbl: np.ndarray) -> np.ndarray:
    """0 -> 255, k -> k-1 (255 stays 255)."""
    return np.where((lbl == 0) | (lbl == 255), 255, lbl - 1)


def ade_root(root: str) -> str:
    sub = os.path.join(root, "ADEChallengeData2016")
    return sub if os.path.isdir(sub) else root


def scan(root: str, split: str) -> List[Tuple[str, str]]:
    base = ade_root(root)
    img_dir = os.path.join(base, "images", SPLIT_DIRS[split])
    if not os.path.isdir(img_dir):
        raise SetupError(f"ade20k: split folder {img_dir} not found")
    images = sorted(glob.glob(os.path.join(img_dir, "*.jpg")))
    if not images:
        raise SetupError(f"ade20k: no .jpg images under {img_dir}")
    lbl_dir = os.path.join(base, "annotations", SPLIT_DIRS[split])
    items = [(p, os.path.join(lbl_dir, os.path.splitext(os.path.basename(p))[0] + ".png")) for p in images]
    return check_items(items, f"ade20k {split}")


@register_dataset("ade20k")
def build_ade20k(cfg, split: str) -> SegDataset:
    d = cfg.data
    want = 150 if d.reduce_zero_label else 151
    if d.classes != want:
        raise SetupError(f"data.classes must be {want} for ade20k with data.reduce_zero_label="
                         f"{str(d.reduce_zero_label).lower()}, got {d.classes}")
    list_file = split_list(d, split)
    items = (check_items(read_list(d.root, list_file), os.path.join(d.root, list_file)) if list_file
             else scan(d.root, split))
    label_map = reduce_zero_label if d.reduce_zero_label else None
    return SegDataset(items, d.classes, d.ignore_label, build_transform(d, split), cfg.seed, label_map)
