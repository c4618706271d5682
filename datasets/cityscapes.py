"""Cityscapes in its official layout (or semseg-style list files), 19 train ids, optional disparity.

Layout under ``data.root``::

    leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
    gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png   (used when every image has one; also *_trainIds.png)
    gtFine/<split>/<city>/<stem>_gtFine_labelIds.png        (otherwise, mapped 34 -> 19 with LABEL_TO_TRAIN)
    disparity/<split>/<city>/<stem>_disparity.png           (only for the depth_zbuffer task)

Disparity follows the official definition: a 16-bit PNG value p > 0 encodes the disparity (p - 1) / 256
in pixels, p = 0 is invalid. Invalid pixels get target 0 and mask 0. MTRobust divides by 1000 and
regresses the invalid zeros as 0 (mtl_fpd.md §A2.1, §C.5); both are fixed here.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_image, read_label, read_list, split_list
from .multitask import SEG_TASK, AUTOENCODER, MultiTaskDataset, check_tasks
from .registry import register_dataset
from .transforms import build_multi_transform, build_transform

CLASSES = 19
TASKS = (SEG_TASK, "depth_zbuffer", AUTOENCODER)

# official cityscapesScripts labels.py: labelId -> trainId (everything not listed is 255)
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
              26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_TO_TRAIN = np.full(256, 255, np.int64)
for _id, _train in _TRAIN_IDS.items():
    LABEL_TO_TRAIN[_id] = _train

TRAIN_ID_SUFFIXES = ("_gtFine_labelTrainIds.png", "_gtFine_trainIds.png")
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"


def label_ids_to_train_ids(lbl: np.ndarray) -> np.ndarray:
    """Map official labelIds (0..33, -1) to the 19 train ids, 255 elsewhere."""
    return LABEL_TO_TRAIN[np.clip(lbl, 0, 255)]


def read_disparity(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(disparity in pixels HxW float32, valid mask HxW float32) from an official 16-bit disparity PNG."""
    raw = read_label(path).astype(np.float32)
    valid = raw > 0
    return np.where(valid, (raw - 1.0) / 256.0, 0.0).astype(np.float32), valid.astype(np.float32)


def disparity_path(root: str, image: str) -> str:
    """leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png -> disparity/<split>/<city>/<stem>_disparity.png.
    Only the folder right under the root is swapped (not every 'leftImg8bit' in the path)."""
    parts = os.path.relpath(image, root).split(os.sep)
    if parts[0] == "leftImg8bit":
        parts[0] = "disparity"
    name = parts[-1]
    parts[-1] = (name[:-len("_leftImg8bit.png")] if name.endswith("_leftImg8bit.png")
                 else os.path.splitext(name)[0]) + "_disparity.png"
    return os.path.join(root, *parts)


def scan(root: str, split: str) -> Tuple[List[Tuple[str, str]], bool]:
    """Sorted (image, label) pairs of the official layout and whether the labels are labelIds."""
    img_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(img_dir):
        raise SetupError(f"cityscapes: split folder {img_dir} not found")
    images = sorted(glob.glob(os.path.join(img_dir, "*", "*_leftImg8bit.png")))
    if not images:
        raise SetupError(f"cityscapes: no *_leftImg8bit.png images under {img_dir}")
    stems = [os.path.join(root, "gtFine", split, os.path.basename(os.path.dirname(p)),
                          os.path.basename(p)[:-len("_leftImg8bit.png")]) for p in images]

    def train_ids(stem: str) -> Optional[str]:
        return next((stem + s for s in TRAIN_ID_SUFFIXES if os.path.isfile(stem + s)), None)
    found = [train_ids(s) for s in stems]
    if all(found):
        return list(zip(images, found)), False
    return check_items(list(zip(images, [s + LABEL_ID_SUFFIX for s in stems])), f"cityscapes {split}"), True


def _items(d, split: str) -> Tuple[List[Tuple[str, Optional[str]]], bool]:
    list_file = split_list(d, split)
    if list_file:
        items = check_items(read_list(d.root, list_file), os.path.join(d.root, list_file))
        return items, any(lbl is not None and lbl.endswith(LABEL_ID_SUFFIX) for _, lbl in items)
    return scan(d.root, split)


@register_dataset("cityscapes")
def build_cityscapes(cfg, split: str):
    """Semantic segmentation (data.tasks empty) or multitask segmentation/disparity/autoencoder."""
    d = cfg.data
    if d.classes != CLASSES:
        raise SetupError(f"data.classes must be {CLASSES} for cityscapes, got {d.classes}")
    items, label_ids = _items(d, split)
    label_map = label_ids_to_train_ids if label_ids else None
    if not d.tasks:
        return SegDataset(items, d.classes, d.ignore_label, build_transform(d, split), cfg.seed, label_map)
    tasks = check_tasks(d.tasks, TASKS, "cityscapes")
    mt_items: List[Dict[str, str]] = []
    for img, lbl in items:
        item = {"image": img}
        if SEG_TASK in tasks:
            if lbl is None:
                raise SetupError(f"cityscapes: image {img} has no label in the list file")
            item[SEG_TASK] = lbl
        if "depth_zbuffer" in tasks:
            disp = disparity_path(d.root, img)
            if not os.path.isfile(disp):
                raise SetupError(f"cityscapes: image {img} has no disparity (expected {disp})")
            item["depth_zbuffer"] = disp
        mt_items.append(item)

    def read_seg(item):
        lbl = read_label(item[SEG_TASK])
        return (label_map(lbl) if label_map else lbl), None

    def read_depth(item):
        disp, valid = read_disparity(item["depth_zbuffer"])
        return disp, valid
    readers = {SEG_TASK: read_seg, "depth_zbuffer": read_depth}
    return MultiTaskDataset(mt_items, tasks, read_image, readers, d.classes, d.ignore_label,
                            build_multi_transform(d, split), cfg.seed)
