"""A procedurally generated shapes dataset, written to disk in the VOC layout on first use.

Six classes: background, disc, square, triangle, ring, cross. Shapes have random colours on
textured, randomly coloured backgrounds, so the class is given by the shape, not the colour. Each
image is a deterministic function of (seed, split, index). On disk: ``JPEGImages/*.jpg``,
``SegmentationClass/*.png`` (single-channel ids, 255 on a thin band around every object) and
``list/{train,val}.txt`` with ``image label`` per line, i.e. exactly what the VOC loader reads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_list
from .registry import register_dataset
from .transforms import build_transform

SPLIT_OFFSET = {"train": 0, "val": 1}
VERSION = 3  # bump when rendering changes, so stale data on disk is refused


def _shape_polygon(cls: int, r: float, angle: float) -> list:
    if cls == 2:  # square
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        scale = 0.8
    elif cls == 3:  # triangle
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
        scale = 1.1
    else:  # cross
        a, b = 0.32, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        scale = 1.0
    c, s = np.cos(angle), np.sin(angle)
    return [(scale * r * (x * c - y * s), scale * r * (x * s + y * c)) for x, y in pts]


def _fill_pattern(cls: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Class-specific fill in [0,1] (solid, stripes, checker): shape and fill both tell the class,
    the colours never do. Stripe periods (6 px) differ from the background textures' (10-40 px)."""
    if cls == 2:
        return (np.floor(dy / 3) % 2).astype(np.float32)                       # horizontal stripes
    if cls == 3:
        return ((np.floor(dx / 3) + np.floor(dy / 3)) % 2).astype(np.float32)  # checker
    if cls == 5:
        return (np.floor(dx / 3) % 2).astype(np.float32)                       # vertical stripes
    return np.zeros_like(dx)                                                   # disc, ring: solid


def render(rng: np.random.Generator, size: int) -> tuple:
    """One (RGB uint8 HxWx3, label uint8 HxW) sample."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        th, f = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
        t = 0.5 + 0.5 * np.sin(f * (xx * np.cos(th) + yy * np.sin(th)))
    elif kind == 1:  # checkerboard
        p = rng.integers(4, 12)
        t = ((xx // p + yy // p) % 2).astype(np.float32)
    else:  # smooth blobs
        t = cv2.resize(rng.uniform(0, 1, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    t = np.clip(t, 0, 1)[..., None]
    img = c1 * (1 - 0.35 * t) + c2 * 0.35 * t  # textured, but objects stand out
    lbl = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 6))
        r = rng.uniform(0.14, 0.26) * size
        cx, cy = rng.uniform(r, size - r, 2)
        mask = np.zeros((size, size), np.uint8)
        if cls == 1:
            cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
        elif cls == 4:
            cv2.circle(mask, (int(cx), int(cy)), int(r), 1, -1)
            cv2.circle(mask, (int(cx), int(cy)), int(r * 0.55), 0, -1)
        else:
            poly = np.array([(cx + x, cy + y) for x, y in _shape_polygon(cls, r, rng.uniform(0, np.pi))], np.int32)
            cv2.fillPoly(mask, [poly], 1)
        colour = rng.uniform(0, 1, 3)
        while np.abs(colour - img[mask > 0].mean(0) if mask.any() else 1).max() < 0.3:
            colour = rng.uniform(0, 1, 3)
        fill = _fill_pattern(cls, xx - cx, yy - cy)[..., None]  # per-class fill, in random colours
        other = np.clip(colour + rng.choice([-1, 1]) * rng.uniform(0.25, 0.45), 0, 1)
        img[mask > 0] = (colour * (1 - fill) + other * fill)[mask > 0]
        lbl[mask > 0] = cls
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    kernel = np.ones((3, 3), np.uint8)
    lbl[cv2.dilate(lbl, kernel) != cv2.erode(lbl, kernel)] = 255  # thin ignore band, as in VOC
    return (img * 255).round().astype(np.uint8), lbl


def ensure_synthetic(root: str, num_train: int, num_val: int, size: int, seed: int) -> None:
    """Write the dataset to `root` unless it is there; refuse a root made with other settings."""
    params = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed, "version": VERSION}
    meta = os.path.join(root, "synthetic.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            old = json.load(f)
        if old != params:
            raise SetupError(f"{root} holds a synthetic dataset made with {old}, not {params}: "
                             f"point data.root elsewhere or delete it")
        return
    if os.path.exists(root) and os.listdir(root):
        raise SetupError(f"data.root {root} exists and is not a synthetic dataset")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-")
    for d in ("JPEGImages", "SegmentationClass", "list"):
        os.makedirs(os.path.join(tmp, d))
    for split, n in (("train", num_train), ("val", num_val)):
        lines = []
        for i in range(n):
            img, lbl = render(np.random.default_rng([seed, SPLIT_OFFSET[split], i]), size)
            name = f"{split}_{i:04d}"
            cv2.imwrite(os.path.join(tmp, "JPEGImages", name + ".jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(tmp, "SegmentationClass", name + ".png"), lbl)
            lines.append(f"JPEGImages/{name}.jpg SegmentationClass/{name}.png\n")
        with open(os.path.join(tmp, "list", f"{split}.txt"), "w") as f:
            f.writelines(lines)
    with open(os.path.join(tmp, "synthetic.json"), "w") as f:
        json.dump(params, f)
    try:
        if os.path.isdir(root):
            os.rmdir(root)  # an empty folder left by the user
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(meta):
            raise


@register_dataset("synthetic")
def build_synthetic(cfg, split: str) -> SegDataset:
    d, s = cfg.data, cfg.data.synthetic
    if d.classes != 6:
        raise SetupError(f"data.classes must be 6 for the synthetic dataset, got {d.classes}")
    ensure_synthetic(d.root, s.num_train, s.num_val, s.size, s.seed)
    list_file = {"train": d.train_list, "val": d.val_list, "test": d.test_list}[split]
    transform = build_transform(d, split)
    items = check_items(read_list(d.root, list_file), os.path.join(d.root, list_file))
    return SegDataset(items, d.classes, d.ignore_label, transform, cfg.seed)
