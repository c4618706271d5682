"""Your own labelled images (``data.name: folder``): ``images/`` and ``labels/`` matched by file stem.

Layout under ``data.root``, per split (train, val, test):

- no list file (``data.<split>_list: ""``): ``images/<split>/**/<stem>.<jpg|jpeg|png|bmp|tif|tiff|webp>``
  and ``labels/<split>/**/<stem>.png``, matched by the path below the split folder without the
  extension; an image without a label or a label without an image is an error naming them;
- a list file (as for VOC): one ``image label`` pair of root-relative paths per line, or a bare stem
  meaning ``images/<stem>.<ext>`` and ``labels/<stem>.png``.

Labels are single-channel or palette PNGs of class ids (``data.classes``, ``data.ignore_label``);
``data.label_map`` maps raw values to train ids first (every raw value must be listed, so a value the
map forgot is an error naming the file, not a silent class). Images of any size and orientation;
decoded as strictly as every dataset (datasets/list_dataset.py).
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_list, split_list
from .registry import register_dataset
from .transforms import build_transform

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXT = ".png"
IMAGES, LABELS = "images", "labels"


def _by_stem(folder: str, exts) -> Dict[str, str]:
    """{relative path without extension: file} of the files under `folder` with one of `exts`."""
    out: Dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)):
        stem, ext = os.path.splitext(os.path.relpath(path, folder))
        if ext.lower() in exts and os.path.isfile(path):
            if stem in out:
                raise SetupError(f"{folder}: two files for the stem '{stem}': {os.path.basename(out[stem])}, "
                                 f"{os.path.basename(path)}")
            out[stem] = path
    return out


def _listing(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def scan_pairs(root: str, split: str) -> List[Tuple[str, Optional[str]]]:
    """(image, label) pairs of ``images/<split>`` and ``labels/<split>`` matched by stem (sorted)."""
    img_dir, lbl_dir = os.path.join(root, IMAGES, split), os.path.join(root, LABELS, split)
    for d in (img_dir, lbl_dir):
        if not os.path.isdir(d):
            raise SetupError(f"data.root: {d} not found (folder layout: {IMAGES}/<split>/ and {LABELS}/<split>/, "
                             f"or a list file in data.{split}_list)")
    images, labels = _by_stem(img_dir, IMAGE_EXTS), _by_stem(lbl_dir, (LABEL_EXT,))
    lone_images, lone_labels = set(images) - set(labels), set(labels) - set(images)
    if lone_images or lone_labels:
        parts = [f"{len(lone_images)} image(s) in {img_dir} without a label ({_listing(lone_images)})"
                 if lone_images else "",
                 f"{len(lone_labels)} label(s) in {lbl_dir} without an image ({_listing(lone_labels)})"
                 if lone_labels else ""]
        raise SetupError("data.name folder: unmatched stems: " + "; ".join(p for p in parts if p))
    return [(images[s], labels[s]) for s in sorted(images)]


def list_pairs(root: str, list_file: str) -> List[Tuple[str, Optional[str]]]:
    """Pairs from a list file; a bare stem is ``images/<stem>.<ext>`` + ``labels/<stem>.png``."""
    items = []
    for img, lbl in read_list(root, list_file):
        rel = os.path.relpath(img, root)
        if lbl is None and not os.path.splitext(rel)[1]:
            found = [rel_img for rel_img in (os.path.join(root, IMAGES, rel + e) for e in IMAGE_EXTS)
                     if os.path.isfile(rel_img)]
            img = found[0] if found else os.path.join(root, IMAGES, rel + IMAGE_EXTS[0])
            lbl = os.path.join(root, LABELS, rel + LABEL_EXT)
        items.append((img, lbl))
    return items


class UnlistedValues(ValueError):
    """Raw label values that ``data.label_map`` does not list."""


def lookup_table(label_map: Mapping[int, int]):
    """A function raw label array -> train ids through `label_map`; raises UnlistedValues for the
    values the map does not list."""
    size = max(label_map) + 1
    table = np.full(size, -1, np.int64)
    for raw, train in label_map.items():
        table[int(raw)] = int(train)

    def apply(lbl: np.ndarray) -> np.ndarray:
        inside = (lbl >= 0) & (lbl < size)
        out = np.where(inside, table[np.clip(lbl, 0, size - 1)], -1)
        if (out < 0).any():
            raise UnlistedValues(sorted(np.unique(lbl[out < 0]).tolist())[:5])
        return out
    return apply


class FolderDataset(SegDataset):
    """SegDataset whose label-map errors name the label file."""

    def load(self, index: int):
        try:
            return super().load(index)
        except UnlistedValues as e:
            raise SetupError(f"label {self.items[index][1]} has values {e.args[0]} that data.label_map "
                             f"does not list") from None


@register_dataset("folder")
def build_folder(cfg, split: str) -> FolderDataset:
    d = cfg.data
    if not os.path.isdir(d.root):
        raise SetupError(f"data root not found: {d.root}")
    list_file = split_list(d, split)
    if list_file:
        items = check_items(list_pairs(d.root, list_file), os.path.join(d.root, list_file))
    else:
        items = check_items(scan_pairs(d.root, split), os.path.join(d.root, IMAGES, split))
    label_map = lookup_table(d.label_map) if d.label_map else None
    return FolderDataset(items, d.classes, d.ignore_label, build_transform(d, split), cfg.seed, label_map)
