"""Taskonomy (one or more buildings): ``root/<domain>/point_<P>_view_<V>_domain_<domain>.png``.

Targets and masks follow MTRobust (mtl_fpd.md §A2.2) with its defects fixed:
- images and every target are resized to ``data.taskonomy.size``; labels with nearest, depth with a
  valid-weighted resize so invalid values never leak into valid ones (the mask keeps pixels whose
  support is >= 99 % valid, as the original's bilinear mask thresholded at 0.99);
- segmentation: raw 0 (unlabelled) -> 255 (ignored), raw k -> k-1, 17 classes; folder and file domain
  may be ``segmentsemantic`` or ``segment_semantic``; class rebalancing weights, if
  ``root/semseg_prior_factor.npy`` exists, are exposed as ``dataset.seg_class_weights`` for the loss;
- principal_curvature is read in colour (the original read it as grey);
- the input image stays in [0,1] (normalisation is inside the model), so the autoencoder target is the
  [0,1] image; the other targets keep the original [-1,1]-style scalings below;
- the split is by point id (< ``data.taskonomy.split_point`` = train); shuffling is the loader's job.

"depth mask" tasks (normal, reshading, keypoints3d, edge_occlusion, principal_curvature) use the mask of
depth_zbuffer (or depth_euclidean when only that folder exists; all valid when neither does).
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from utils.errors import SetupError

from .list_dataset import decode_image, read_image as _read_full_image
from .multitask import AUTOENCODER, SEG_TASK, MultiTaskDataset, check_tasks
from .registry import register_dataset
from .transforms import build_multi_transform

CLASSES = 17
# MTRobust's fixed task order (letters s d e k n r K D A E p)
TASKS = (SEG_TASK, "depth_zbuffer", "edge_texture", "keypoints2d", "normal", "reshading", "keypoints3d",
         "depth_euclidean", AUTOENCODER, "edge_occlusion", "principal_curvature")
SEG_DOMAINS = ("segmentsemantic", "segment_semantic")
DEPTH_INVALID = 64500  # raw 16-bit depth at or above this is invalid (sky / no return)
DEPTH_MASKED = ("normal", "reshading", "keypoints3d", "edge_occlusion", "principal_curvature")
CURVATURE_MEAN, CURVATURE_STD = np.array([123.572, 120.1]), np.array([31.922, 21.658])
RGB_RE = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.(png|jpg)$")


def read_raw(path: str) -> np.ndarray:
    """The stored values (uint8 / uint16), RGB order for colour files; SetupError if unreadable or truncated."""
    a = decode_image(path, cv2.IMREAD_UNCHANGED)
    if a.ndim == 3:
        a = cv2.cvtColor(a[..., :3], cv2.COLOR_BGR2RGB)
    return a


def to_float(a: np.ndarray) -> np.ndarray:
    """skimage img_as_float: integer range -> [0,1]."""
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return a.astype(np.float32)


def resize_linear(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[:2] == (size, size):
        return a
    shrink = a.shape[0] > size or a.shape[1] > size
    return cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_nearest(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[:2] == (size, size):
        return a
    return cv2.resize(a, (size, size), interpolation=cv2.INTER_NEAREST)


def resize_valid(value: np.ndarray, valid: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Valid-weighted resize: resize(value*valid)/resize(valid); mask = support >= 0.99; 0 where masked."""
    num = resize_linear((value * valid).astype(np.float32), size)
    den = resize_linear(valid.astype(np.float32), size)
    mask = den >= 0.99
    out = np.where(mask, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)
    return out, mask.astype(np.float32)


def gray(a: np.ndarray) -> np.ndarray:
    """skimage rgb2gray weights on a colour image; grey images pass through."""
    return a if a.ndim == 2 else a[..., :3] @ np.array([0.2125, 0.7154, 0.0721], np.float32)


def depth_target(raw: np.ndarray, size: int, path: str) -> Tuple[np.ndarray, np.ndarray]:
    """log(1+raw)/log(2^16) with the mask raw < 64500 (mtl_fpd.md §A2.2)."""
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise SetupError(f"depth {path} must be a single-channel 16-bit PNG, got {raw.dtype} {raw.shape}")
    valid = (raw < DEPTH_INVALID).astype(np.float32)
    value = (np.log1p(raw.astype(np.float32)) / np.log(2.0 ** 16)).astype(np.float32)
    return resize_valid(value, valid, size)


def seg_target(raw: np.ndarray, size: int) -> np.ndarray:
    """Nearest resize; raw 0 (unlabelled) -> 255, raw k -> k-1."""
    if raw.ndim == 3:
        raw = raw[..., 0]
    raw = resize_nearest(raw, size).astype(np.int64)
    return np.where((raw == 0) | (raw == 255), 255, raw - 1)


def dense_target(task: str, raw: np.ndarray, size: int) -> np.ndarray:
    """HxW or HxWxC float target of a dense task other than depth and segmentation."""
    if task == "principal_curvature":  # colour, first two channels, on the 0..255 scale
        v = raw.astype(np.float32) * (255.0 / 65535.0 if raw.dtype == np.uint16 else 1.0)
        if v.ndim != 3:
            raise SetupError("principal_curvature targets must be colour images")
        return ((resize_linear(v[..., :2], size) - CURVATURE_MEAN) / CURVATURE_STD).astype(np.float32)
    f = to_float(raw)
    if task == "normal":
        if f.ndim != 3:
            raise SetupError("normal targets must be colour images")
        return resize_linear(f[..., :3], size) * 2 - 1
    if task == "reshading":
        return resize_linear(gray(f), size) * 2 - 1
    f = resize_linear(gray(f), size)
    if task == "keypoints3d":
        return f * 2 - 1
    if task == "keypoints2d":
        return np.clip(f, 0, 0.005) / 0.005 * 2 - 1
    if task == "edge_texture":
        return np.clip(f, 0, 0.08) / 0.08 * 2 - 1
    if task == "edge_occlusion":  # no clipping, then a sigma=4 blur, as the original
        return cv2.GaussianBlur((f / 0.00625 * 2 - 1).astype(np.float32), (0, 0), 4)
    raise KeyError(task)


def domain_file(root: str, domain: str, point: str, view: str) -> Optional[str]:
    """The file of `domain` for a view; segmentation accepts both folder/file spellings."""
    folders = SEG_DOMAINS if domain == SEG_TASK else (domain,)
    for folder in folders:
        for dom in folders:
            p = os.path.join(root, folder, f"point_{point}_view_{view}_domain_{dom}.png")
            if os.path.isfile(p):
                return p
    return None


def scan(root: str, split: str, split_point: int, domains: List[str]) -> List[Dict[str, str]]:
    rgb_dir = os.path.join(root, "rgb")
    if not os.path.isdir(rgb_dir):
        raise SetupError(f"taskonomy: folder {rgb_dir} not found")
    items = []
    for name in sorted(os.listdir(rgb_dir)):
        m = RGB_RE.match(name)
        if not m:
            continue
        point, view = m.group(1), m.group(2)
        if (int(point) < split_point) != (split == "train"):
            continue
        item = {"image": os.path.join(rgb_dir, name)}
        for dom in domains:
            p = domain_file(root, dom, point, view)
            if p is None:
                raise SetupError(f"taskonomy: image {item['image']} has no {dom} target "
                                 f"({os.path.join(root, dom)}/point_{point}_view_{view}_domain_{dom}.png)")
            item[dom] = p
        items.append(item)
    if not items:
        raise SetupError(f"taskonomy: no {split} images in {rgb_dir} (point id "
                         f"{'<' if split == 'train' else '>='} {split_point})")
    return items


@register_dataset("taskonomy")
def build_taskonomy(cfg, split: str) -> MultiTaskDataset:
    d, size = cfg.data, cfg.data.taskonomy.size
    if d.classes != CLASSES:
        raise SetupError(f"data.classes must be {CLASSES} for taskonomy, got {d.classes}")
    tasks = check_tasks(d.tasks or [SEG_TASK], TASKS, "taskonomy")
    mask_domain = None
    if any(t in DEPTH_MASKED for t in tasks):
        mask_domain = next((dom for dom in ("depth_zbuffer", "depth_euclidean")
                            if os.path.isdir(os.path.join(d.root, dom))), None)
    domains = [t for t in tasks if t != AUTOENCODER]
    if mask_domain and mask_domain not in domains:
        domains.append(mask_domain)
    items = scan(d.root, split, d.taskonomy.split_point, domains)

    def depth_mask(item) -> Optional[np.ndarray]:
        if mask_domain is None:
            return None
        return depth_target(read_raw(item[mask_domain]), size, item[mask_domain])[1]

    def reader(task: str) -> Callable:
        def read(item):
            raw = read_raw(item[task])
            if task == SEG_TASK:
                return seg_target(raw, size), None
            if task in ("depth_zbuffer", "depth_euclidean"):
                return depth_target(raw, size, item[task])
            target = dense_target(task, raw, size)
            return target, depth_mask(item) if task in DEPTH_MASKED else None
        return read

    ds = MultiTaskDataset(items, tasks, lambda p: resize_linear(_read_full_image(p), size),
                          {t: reader(t) for t in tasks if t != AUTOENCODER}, d.classes, d.ignore_label,
                          build_multi_transform(d, split), cfg.seed)
    prior = os.path.join(d.root, "semseg_prior_factor.npy")
    ds.seg_class_weights = None
    if os.path.isfile(prior):
        w = np.load(prior, allow_pickle=False)
        if w.shape != (CLASSES,):
            raise SetupError(f"{prior} must hold {CLASSES} class weights, got shape {w.shape}")
        ds.seg_class_weights = torch.from_numpy(w.astype(np.float32))
    return ds
