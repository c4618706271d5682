"""A procedurally generated shapes dataset, written to disk in the VOC layout on first use.

Six classes: background, disc, square, triangle, ring, cross. Shapes have random colours on
textured, randomly coloured backgrounds, so the class is given by the shape, not the colour. Each
image is a deterministic function of (seed, split, index). On disk: ``JPEGImages/*.jpg``,
``SegmentationClass/*.png`` (single-channel ids, 255 on a thin band around every object) and
``list/{train,val}.txt`` with ``image label`` per line, i.e. exactly what the VOC loader reads;
``Depth/*.png`` holds a depth map per image (16-bit, millimetres) drawn with the shapes: the
background a ground plane receding upwards (4 m at the bottom row, 16 m at the top), every shape
flat, 1 m in front of the ground where its bottom touches it.

With ``data.tasks`` (segmentsemantic, depth_zbuffer, autoencoder) it is a multitask dataset
(datasets/multitask.py): depth in metres (all valid), reconstruction = the image itself.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import cv2
import numpy as np

from utils.errors import SetupError

from .list_dataset import SegDataset, check_items, read_image, read_label, read_list
from .multitask import AUTOENCODER, SEG_TASK, MultiTaskDataset, check_tasks
from .registry import register_dataset
from .transforms import build_multi_transform, build_transform

SPLIT_OFFSET = {"train": 0, "val": 1}
VERSION = 3  # bump when rendering changes, so stale data on disk is refused
TASKS = (SEG_TASK, "depth_zbuffer", AUTOENCODER)
DEPTH_DIR = "Depth"  # written with the images since depth maps exist (older datasets lack the folder)
DEPTH_UNIT = 1000.0  # stored value per metre
DEPTH_NEAR, DEPTH_FAR, DEPTH_FRONT = 4.0, 16.0, 1.0  # ground at the bottom / top row; shapes in front of it


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


def ground_depth(row, size: int):
    """Depth in metres of the ground plane at image row(s) `row`: DEPTH_NEAR at the bottom, DEPTH_FAR at the top."""
    return DEPTH_NEAR + (DEPTH_FAR - DEPTH_NEAR) * (1.0 - np.clip(row, 0, size - 1) / (size - 1))


def render(rng: np.random.Generator, size: int, depth: bool = False) -> tuple:
    """One (RGB uint8 HxWx3, label uint8 HxW) sample; with `depth` also its depth map (float32 HxW,
    metres). The depth map draws nothing from `rng`: image and label are the same either way."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dmap = ground_depth(yy, size).astype(np.float32) if depth else None
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
        if dmap is not None:  # flat, standing in front of the ground where its bottom (cy + r) touches it
            dmap[mask > 0] = ground_depth(cy + r, size) - DEPTH_FRONT
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    kernel = np.ones((3, 3), np.uint8)
    lbl[cv2.dilate(lbl, kernel) != cv2.erode(lbl, kernel)] = 255  # thin ignore band, as in VOC
    if dmap is not None:
        return (img * 255).round().astype(np.uint8), lbl, dmap
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
    if os.path.exists(root) and not os.path.isdir(root):
        raise SetupError(f"data.root {root} is a file, not a folder")
    if os.path.exists(root) and os.listdir(root):
        raise SetupError(f"data.root {root} exists and is not a synthetic dataset")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-")
    for d in ("JPEGImages", "SegmentationClass", DEPTH_DIR, "list"):
        os.makedirs(os.path.join(tmp, d))
    for split, n in (("train", num_train), ("val", num_val)):
        lines = []
        for i in range(n):
            img, lbl, dmap = render(np.random.default_rng([seed, SPLIT_OFFSET[split], i]), size, depth=True)
            name = f"{split}_{i:04d}"
            cv2.imwrite(os.path.join(tmp, "JPEGImages", name + ".jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(tmp, "SegmentationClass", name + ".png"), lbl)
            cv2.imwrite(os.path.join(tmp, DEPTH_DIR, name + ".png"), np.round(dmap * DEPTH_UNIT).astype(np.uint16))
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


def depth_path(root: str, image: str) -> str:
    """JPEGImages/<name>.jpg -> Depth/<name>.png."""
    return os.path.join(root, DEPTH_DIR, os.path.splitext(os.path.basename(image))[0] + ".png")


def read_depth(path: str):
    """(depth in metres HxW float32, valid mask HxW float32: stored value > 0)."""
    raw = read_label(path).astype(np.float32)
    return raw / DEPTH_UNIT, (raw > 0).astype(np.float32)


@register_dataset("synthetic")
def build_synthetic(cfg, split: str):
    d, s = cfg.data, cfg.data.synthetic
    if d.classes != 6:
        raise SetupError(f"data.classes must be 6 for the synthetic dataset, got {d.classes}")
    ensure_synthetic(d.root, s.num_train, s.num_val, s.size, s.seed)
    list_file = {"train": d.train_list, "val": d.val_list, "test": d.test_list}[split]
    items = check_items(read_list(d.root, list_file), os.path.join(d.root, list_file))
    if not d.tasks:
        return SegDataset(items, d.classes, d.ignore_label, build_transform(d, split), cfg.seed)
    tasks = check_tasks(d.tasks, TASKS, "synthetic")
    if "depth_zbuffer" in tasks and not os.path.isdir(os.path.join(d.root, DEPTH_DIR)):
        raise SetupError(f"data.root {d.root} holds a synthetic dataset written without depth maps (an older "
                         f"version): delete it to have it written again with {DEPTH_DIR}/, or point data.root elsewhere")
    mt_items = []
    for img, lbl in items:
        item = {"image": img, SEG_TASK: lbl}
        if "depth_zbuffer" in tasks:
            item["depth_zbuffer"] = depth_path(d.root, img)
            if not os.path.isfile(item["depth_zbuffer"]):
                raise SetupError(f"synthetic: image {img} has no depth map (expected {item['depth_zbuffer']})")
        mt_items.append(item)
    readers = {SEG_TASK: lambda item: (read_label(item[SEG_TASK]), None),
               "depth_zbuffer": lambda item: read_depth(item["depth_zbuffer"])}
    return MultiTaskDataset(mt_items, tasks, read_image, readers, d.classes, d.ignore_label,
                            build_multi_transform(d, split), cfg.seed)
