"""Training augmentation on numpy arrays: image HxWx3 float32 in [0,1], label HxW int64.

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


TRAIN_PIPELINES = {"semseg": semseg_train, "none": lambda data_cfg: None}


def build_train_transform(data_cfg) -> Callable:
    from utils.errors import SetupError
    if data_cfg.transform not in TRAIN_PIPELINES:
        raise SetupError(f"data.transform '{data_cfg.transform}' unknown; valid: {', '.join(TRAIN_PIPELINES)}")
    return TRAIN_PIPELINES[data_cfg.transform](data_cfg)
