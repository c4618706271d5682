"""Augmentation and evaluation preprocessing on numpy arrays: image HxWx3 float32 in [0,1], label HxW int.

Every random transform draws from a ``numpy.random.Generator`` passed in, which the dataset seeds
from (seed, epoch, index), so augmentation repeats exactly across runs, workers and resumes.
Labels always use nearest interpolation; padding uses the mean colour for images, 255 for labels.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import cv2
import numpy as np

MEAN_RGB = (0.485, 0.456, 0.406)
Sample = Tuple[np.ndarray, np.ndarray]


def rand_scale(img, lbl, rng, scale_range: Sequence[float]) -> Sample:
    s = rng.uniform(*scale_range)
    img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    lbl = cv2.resize(lbl, None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST)
    return img, lbl


def rand_rotate(img, lbl, rng, rotate_range: Sequence[float], ignore: int, p: float = 0.5) -> Sample:
    if rng.random() >= p:
        return img, lbl
    h, w = lbl.shape
    mat = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(*rotate_range), 1)
    img = cv2.warpAffine(img, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=MEAN_RGB)
    lbl = cv2.warpAffine(lbl, mat, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=ignore)
    return img, lbl


def rand_blur(img, lbl, rng, p: float = 0.5) -> Sample:
    if rng.random() < p:
        img = cv2.GaussianBlur(img, (5, 5), 0)
    return img, lbl


def rand_flip(img, lbl, rng, p: float = 0.5) -> Sample:
    if rng.random() < p:
        img, lbl = img[:, ::-1], lbl[:, ::-1]
    return img, lbl


def pad_to(img, lbl, size: Sequence[int], ignore: int) -> Sample:
    """Pad symmetrically (floor half before) to at least `size` = (h, w)."""
    h, w = lbl.shape
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph or pw:
        t, l = ph // 2, pw // 2
        img = cv2.copyMakeBorder(img, t, ph - t, l, pw - l, cv2.BORDER_CONSTANT, value=MEAN_RGB)
        lbl = cv2.copyMakeBorder(lbl, t, ph - t, l, pw - l, cv2.BORDER_CONSTANT, value=ignore)
    return img, lbl


def rand_crop(img, lbl, rng, size: Sequence[int], ignore: int) -> Sample:
    img, lbl = pad_to(img, lbl, size, ignore)
    h, w = lbl.shape
    i = int(rng.integers(0, h - size[0] + 1))
    j = int(rng.integers(0, w - size[1] + 1))
    return img[i:i + size[0], j:j + size[1]], lbl[i:i + size[0], j:j + size[1]]


def semseg_train(data_cfg) -> Callable:
    """RandScale -> RandRotate -> blur -> flip -> crop (ddcat.md §6), switches from `data`."""
    ign = data_cfg.ignore_label
    steps: List[Callable] = [lambda i, l, r: rand_scale(i, l, r, data_cfg.scale_range),
                             lambda i, l, r: rand_rotate(i, l, r, data_cfg.rotate_range, ign)]
    if data_cfg.blur:
        steps.append(rand_blur)
    if data_cfg.flip:
        steps.append(rand_flip)
    steps.append(lambda i, l, r: rand_crop(i, l, r, data_cfg.crop_size, ign))

    def apply(img: np.ndarray, lbl: np.ndarray, rng: np.random.Generator) -> Sample:
        lbl = lbl.astype(np.int32)  # cv2 cannot warp int64
        for step in steps:
            img, lbl = step(img, lbl, rng)
        return np.ascontiguousarray(img), np.ascontiguousarray(lbl)
    return apply


def resize_short(img, lbl, short: int) -> Sample:
    """Resize keeping the aspect ratio so the short side is `short` (bilinear image, nearest label)."""
    h, w = lbl.shape
    s = short / min(h, w)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return (cv2.resize(img, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(lbl, size, interpolation=cv2.INTER_NEAREST))


def pirat_train(data_cfg) -> Callable:
    """PIR-AT augmentation (sea.md §4.1): flip -> random short side in [lo,hi] x base_size -> pad ->
    blur (radius U(0,1), p=0.5) -> random crop. Pads right/bottom with 0 for the image as the original,
    but with 255 for the label: the original pads the mask with 0, which teaches padding as background."""
    ign, base, crop = data_cfg.ignore_label, data_cfg.base_size, data_cfg.crop_size
    lo, hi = data_cfg.scale_range

    def apply(img: np.ndarray, lbl: np.ndarray, rng: np.random.Generator) -> Sample:
        lbl = lbl.astype(np.int32)
        if data_cfg.flip and rng.random() < 0.5:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        short = int(rng.integers(int(lo * base), int(hi * base) + 1))
        img, lbl = resize_short(np.ascontiguousarray(img), np.ascontiguousarray(lbl), short)
        h, w = lbl.shape
        ph, pw = max(crop[0] - h, 0), max(crop[1] - w, 0)
        if ph or pw:
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
            lbl = cv2.copyMakeBorder(lbl, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=ign)
        if data_cfg.blur and rng.random() < 0.5:
            radius = rng.random()
            if radius > 0:  # PIL's GaussianBlur radius is the standard deviation
                img = cv2.GaussianBlur(img, (0, 0), radius)
        h, w = lbl.shape
        i, j = int(rng.integers(0, h - crop[0] + 1)), int(rng.integers(0, w - crop[1] + 1))
        return (np.ascontiguousarray(img[i:i + crop[0], j:j + crop[1]]),
                np.ascontiguousarray(lbl[i:i + crop[0], j:j + crop[1]]))
    return apply


def semseg_eval(img: np.ndarray, lbl: np.ndarray, base_size: int) -> Sample:
    """semseg test preprocessing: the image is resized (bilinear) so its long side is `base_size`; the
    label stays at its original resolution, where the predictions are scored after resizing the
    scores back (ddcat.md §5). Attack targets are the label resized to the image (nearest)."""
    h, w = lbl.shape
    s = base_size / max(h, w)
    size = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR), lbl


def sea_eval(img: np.ndarray, lbl: np.ndarray, crop: Sequence[int]) -> Sample:
    """SEA evaluation preprocessing (sea.md §3): resize (bilinear image, nearest label) so the image just covers
    `crop` = (h, w) (for a square crop: short side = crop), then take the centre crop."""
    h, w = lbl.shape
    s = max(crop[0] / h, crop[1] / w)
    size = (max(crop[1], int(round(w * s))), max(crop[0], int(round(h * s))))
    img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    lbl = cv2.resize(lbl.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
    i, j = (size[1] - crop[0]) // 2, (size[0] - crop[1]) // 2
    return (np.ascontiguousarray(img[i:i + crop[0], j:j + crop[1]]),
            np.ascontiguousarray(lbl[i:i + crop[0], j:j + crop[1]]))


# Multi-map augmentation (multitask): every array is HxW or HxWxC with a kind telling how to pad it.
PAD_VALUE = {"image": 0.0, "label": 255, "dense": 0.0, "mask": 0.0}


def crop_flip_train(data_cfg) -> Callable:
    """MTRobust's Cityscapes augmentation (mtl_fpd.md §A5.1): random crop (pad: labels 255, image, dense
    targets and masks 0, so padding is never supervised) then horizontal flip p=0.5, on all maps alike."""
    crop, ign = data_cfg.crop_size, data_cfg.ignore_label

    def apply(maps: List[Tuple[np.ndarray, str]], rng: np.random.Generator) -> List[np.ndarray]:
        h, w = maps[0][0].shape[:2]
        ph, pw = max(crop[0] - h, 0), max(crop[1] - w, 0)
        t, l = ph // 2, pw // 2
        i = int(rng.integers(0, h + ph - crop[0] + 1))
        j = int(rng.integers(0, w + pw - crop[1] + 1))
        flip = data_cfg.flip and rng.random() < 0.5
        out = []
        for a, kind in maps:
            if ph or pw:
                pad = [(t, ph - t), (l, pw - l)] + [(0, 0)] * (a.ndim - 2)
                a = np.pad(a, pad, constant_values=ign if kind == "label" else PAD_VALUE[kind])
            a = a[i:i + crop[0], j:j + crop[1]]
            out.append(np.ascontiguousarray(a[:, ::-1] if flip else a))
        return out
    return apply


TRAIN_PIPELINES = {"semseg": semseg_train, "pirat": pirat_train, "crop_flip": None, "none": lambda data_cfg: None}


def _crop_flip_pair(data_cfg) -> Callable:
    multi = crop_flip_train(data_cfg)
    return lambda img, lbl, rng: tuple(multi([(img, "image"), (lbl.astype(np.int32), "label")], rng))


TRAIN_PIPELINES["crop_flip"] = _crop_flip_pair


def build_train_transform(data_cfg) -> Callable:
    """The (img, lbl, rng) training transform named by ``data.transform`` (None for 'none')."""
    from utils.errors import SetupError
    if data_cfg.transform not in TRAIN_PIPELINES:
        raise SetupError(f"data.transform '{data_cfg.transform}' unknown; valid: {', '.join(TRAIN_PIPELINES)}")
    return TRAIN_PIPELINES[data_cfg.transform](data_cfg)


EVAL_PIPELINES = ("none", "semseg", "sea")


def build_eval_transform(data_cfg) -> Callable:
    """The (img, lbl, rng) evaluation preprocessing named by ``data.eval_transform`` (None for 'none')."""
    from utils.errors import SetupError
    name = data_cfg.eval_transform
    if name == "semseg":
        return lambda img, lbl, rng: semseg_eval(img, lbl, data_cfg.base_size)
    if name == "sea":
        return lambda img, lbl, rng: sea_eval(img, lbl, data_cfg.eval_crop)
    if name == "none":
        return None
    raise SetupError(f"data.eval_transform '{name}' unknown; valid: {', '.join(EVAL_PIPELINES)}")


def build_transform(data_cfg, split: str) -> Callable:
    """Training augmentation for 'train', evaluation preprocessing otherwise."""
    return build_train_transform(data_cfg) if split == "train" else build_eval_transform(data_cfg)


def build_multi_transform(data_cfg, split: str) -> Callable:
    """The multi-map transform of a multitask dataset: 'crop_flip' or 'none' for training, 'none' for evaluation
    (the other pipelines interpolate and would mix invalid depth into valid values)."""
    from utils.errors import SetupError
    name, key = (data_cfg.transform, "data.transform") if split == "train" else (data_cfg.eval_transform,
                                                                                 "data.eval_transform")
    if name == "none":
        return None
    if name == "crop_flip" and split == "train":
        return crop_flip_train(data_cfg)
    raise SetupError(f"{key} '{name}' cannot transform multitask targets; use "
                     + ("'crop_flip' or 'none'" if split == "train" else "'none'"))
