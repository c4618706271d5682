"""Segmentation metrics from per-image integer counts, and the worst case over attacks (sea.md §2-3).

Everything starts from per-image, per-class counts (``confusion_counts``): intersection I, union U and
target area T, int64 [N,C]. They are small, can be gathered across ranks and stored, and are all the
pooled metrics and the worst-case aggregation need.

Definitions (sea.md §3): pooled over images, IoU_c = sum I_c / sum U_c, mIoU = mean over classes with
sum U_c > 0 (a class predicted but absent from the labels counts as 0; absent from both is skipped);
Acc_c = sum I_c / sum T_c, mAcc = mean over classes with sum T_c > 0; aAcc = sum I / sum T.
Image-averaged versions (``*_img``) average per-image values over images where they are defined.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]


def _np(a: Array) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def class_map(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index of the highest score along `dim` (the predicted class map): ``scores.argmax(dim)``, so the
    first class on ties and the NaN's class where a score is NaN."""
    return scores.argmax(dim)


def correct_pixels(scores: torch.Tensor, y: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool [B,H,W]: where the class map of `scores` [B,C,H,W] is the label y (and `valid`, if given).

    ``(class_map(scores) == y) & valid``; `y` may hold an ignore label outside [0, C) where `valid` is False."""
    correct = class_map(scores) == y
    return correct if valid is None else correct & valid


def label_counts(labels: torch.Tensor, classes: int, ignore: int = 255) -> torch.Tensor:
    """Pixels per class [C] int64 over a label batch (ignore and out-of-range values skipped).

    Accumulated over the training split, these give the class weights of SEA's balanced loss
    (``attacks.losses.class_weights_from_counts``).
    """
    y = labels.reshape(-1)
    y = y[(y != ignore) & (y >= 0) & (y < classes)]
    return torch.bincount(y.long(), minlength=classes)[:classes]


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, classes: int,
                     ignore: int = 255) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (intersection, union, target_area), each int64 [B,C], from argmax maps [B,H,W].

    Pixels whose label is ``ignore`` (or outside 0..C-1) count nowhere, their prediction included.
    A prediction outside 0..C-1 (Taskonomy's 18th output channel, 17 classes) is in no class: it adds
    to no intersection and no predicted area, and its labelled pixel is a miss of its label's class
    (an extra "none of these" column of the confusion matrix). The original histogram scored that
    channel as an 18th class with IoU 0 in the mean whenever it was predicted (mtl_fpd.md §A6); a
    clamp into class C-1 would instead grow that class's union.
    """
    B = pred.shape[0]
    pred, target = pred.reshape(B, -1).long(), target.reshape(B, -1).long()
    valid = (target != ignore) & (target >= 0) & (target < classes)
    base = torch.arange(B, device=pred.device).view(B, 1) * classes
    n = B * classes

    def hist(idx: torch.Tensor) -> torch.Tensor:
        return torch.bincount(idx, minlength=n)[:n].view(B, classes)

    tgt = hist((base + target)[valid])
    prd = hist((base + pred)[valid & (pred >= 0) & (pred < classes)])
    inter = hist((base + target)[valid & (pred == target)])
    return inter, prd + tgt - inter, tgt


def _ratio_mean(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Mean over the last axis of num/den over entries with den > 0 (NaN where none)."""
    present = den > 0
    r = np.where(present, num / np.maximum(den, 1), 0.0)
    k = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, r.sum(-1) / np.maximum(k, 1), np.nan)


def miou(inter: Array, union: Array) -> np.ndarray:
    """mIoU over the last (class) axis, classes with union > 0; vectorised over leading axes."""
    return _ratio_mean(_np(inter).astype(np.float64), _np(union))


def image_accuracy(inter: Array, target_area: Array) -> np.ndarray:
    """Per-image pixel accuracy over valid pixels [..., N]; NaN for images without valid pixels."""
    i, t = _np(inter).sum(-1), _np(target_area).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(t > 0, i / np.maximum(t, 1), np.nan)


def _nanmean(a: np.ndarray, axis=None):
    ok = ~np.isnan(a)
    n = ok.sum(axis)
    s = np.where(ok, a, 0.0).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def summarize(inter: Array, union: Array, target_area: Array,
              names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Pooled metrics of per-image counts [N,C] (or one pooled [C] row) plus image-averaged ones.

    Returns mIoU, mAcc, aAcc (pooled, fractions), mIoU_img and aAcc_img (means over images of the
    per-image values, images without a defined value skipped), iou_per_class (None where the pooled
    union is 0) and acc_per_class (None where the pooled target is 0), class names when given, images.
    """
    I, U, T = (_np(a).astype(np.int64) for a in (inter, union, target_area))
    if I.ndim == 1:
        I, U, T = I[None], U[None], T[None]
    sI, sU, sT = I.sum(0), U.sum(0), T.sum(0)
    iou = [float(i) / u if u > 0 else None for i, u in zip(sI, sU)]
    acc = [float(i) / t if t > 0 else None for i, t in zip(sI, sT)]
    out = {
        "mIoU": float(miou(sI, sU)),
        "mAcc": float(_ratio_mean(sI.astype(np.float64), sT)),
        "aAcc": float(sI.sum() / sT.sum()) if sT.sum() > 0 else float("nan"),
        "mIoU_img": float(_nanmean(miou(I, U))),
        "aAcc_img": float(_nanmean(image_accuracy(I, T))),
        "iou_per_class": iou,
        "acc_per_class": acc,
        "images": int(I.shape[0]),
    }
    if names is not None:
        out["names"] = list(names)
    return out


def worst_case_miou(inter: Array, union: Array, max_rounds: int = 100000,
                    tol: float = 1e-12) -> Tuple[float, np.ndarray, int]:
    """Pooled mIoU minimised over the per-image choice of attack; (mIoU, choice [N], accepted moves).

    inter, union: int [A,N,C]. Local search: start from the best single attack (lowest pooled mIoU);
    each round scores every single-image swap exactly (vectorised over images and attacks), then
    applies the improving swaps of all images together, best first, halving their number until the
    exact pooled mIoU improves (one swap always does); stops when no single swap improves.

    Guarantees: the result is <= every single attack's mIoU (it starts at the lowest and only
    decreases) and is a local minimum for single-image swaps. It is not guaranteed to be the global
    minimum over all A^N assignments (the objective is a sum of ratios, not separable over images),
    except in special cases such as images with disjoint class sets. Fixes over the original search
    (sea.md §2.2, §9.1.4): best single start, true best swaps, union-0 classes dropped consistently.
    """
    I, U = _np(inter).astype(np.int64), _np(union).astype(np.int64)
    A, N, C = I.shape
    if N == 0:
        return float("nan"), np.zeros(0, dtype=np.int64), 0
    singles = miou(I.sum(1), U.sum(1))
    a0 = int(np.nanargmin(singles)) if not np.all(np.isnan(singles)) else 0
    sel = np.full(N, a0, dtype=np.int64)
    pooled_inter, pooled_union = I[a0].sum(0), U[a0].sum(0)
    cur = float(miou(pooled_inter, pooled_union))
    rows = np.arange(N)
    moves = 0
    for _ in range(max_rounds):
        d_inter = I - I[sel, rows][None]        # [A,N,C] change if image n switches to a
        d_union = U - U[sel, rows][None]
        cand = miou(pooled_inter + d_inter, pooled_union + d_union)  # [A,N] exact mIoU after one swap
        cand = np.where(np.isnan(cand), np.inf, cand)
        best_a = cand.argmin(0)
        best = cand[best_a, rows]
        gain = cur - best
        improving = np.flatnonzero(gain > tol)
        if improving.size == 0:
            break
        order = improving[np.argsort(-gain[improving], kind="stable")]
        top = order[:1]
        top_val = float(best[top[0]])
        m = order.size
        chosen = top
        while m > 1:  # try many swaps at once, best first
            idx = order[:m]
            val = float(miou(pooled_inter + d_inter[best_a[idx], idx].sum(0),
                             pooled_union + d_union[best_a[idx], idx].sum(0)))
            if val < cur - tol:
                if val < top_val:
                    chosen = idx
                break
            m //= 2
        pooled_inter = pooled_inter + d_inter[best_a[chosen], chosen].sum(0)
        pooled_union = pooled_union + d_union[best_a[chosen], chosen].sum(0)
        sel[chosen] = best_a[chosen]
        cur = float(miou(pooled_inter, pooled_union))
        moves += int(chosen.size)
    return cur, sel, moves


def worst_case(inter: Array, union: Array, target_area: Array, labels: Optional[Sequence[str]] = None,
               names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Worst case over A attacks from per-attack per-image counts: inter, union [A,N,C]; target_area [N,C]
    (the labels' class areas, the same for every attack; an [A,N,C] array is accepted, first row used).

    aAcc: mean over images of the minimum over attacks of the image's pixel accuracy (sea.md §2.1;
    images without valid pixels skipped). mIoU: ``worst_case_miou`` (pooled). mIoU_img: mean over
    images of the minimum over attacks of the per-image mIoU (exact: separable over images).
    ``chosen`` holds the pooled metrics (summarize) of the assignment found, ``choice`` its attack per
    image, ``per_attack`` each attack's own summary.
    """
    I, U, T = _np(inter).astype(np.int64), _np(union).astype(np.int64), _np(target_area).astype(np.int64)
    if T.ndim == 3:
        T = T[0]
    A, N, _ = I.shape
    acc = image_accuracy(I, T[None])                    # [A,N]
    img_miou = miou(I, U)                               # [A,N]
    value, choice, moves = worst_case_miou(I, U)
    rows = np.arange(N)
    return {
        "aAcc": float(_nanmean(_min_ignoring_nan(acc))) if N else float("nan"),
        "mIoU": value,
        "mIoU_img": float(_nanmean(_min_ignoring_nan(img_miou))) if N else float("nan"),
        "choice": choice.tolist(),
        "moves": moves,
        "labels": list(labels) if labels is not None else list(range(A)),
        "chosen": summarize(I[choice, rows], U[choice, rows], T, names),
        "per_attack": [summarize(I[a], U[a], T, names) for a in range(A)],
    }


def _min_ignoring_nan(a: np.ndarray) -> np.ndarray:
    """Min over axis 0 ignoring NaN; NaN where the whole column is NaN."""
    m = np.where(np.isnan(a), np.inf, a).min(0)
    return np.where(np.isinf(m), np.nan, m)


def regression_sums(output: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-image (sum |error|, sum error^2, valid elements) [B,3] float64 of a dense regression output.

    `output`, `target`: [B,C,H,W]; `mask`: [B,1,H,W] (1 = valid; None = all valid), broadcast over
    the channels. Pooled over images these give MAE / MSE / RMSE over the valid elements (``summarize_regression``).
    """
    err = (output.detach().double() - target.double())
    w = torch.ones_like(err[:, :1]) if mask is None else mask.double()
    w = w.expand_as(err)
    return torch.stack([(err.abs() * w).flatten(1).sum(1), (err * err * w).flatten(1).sum(1), w.flatten(1).sum(1)], 1)


def summarize_regression(sums: Array) -> Dict[str, float]:
    """Pooled errors of per-image ``regression_sums`` [N,3]: mae (L1), mse (L2), rmse, over valid elements."""
    s = _np(sums).astype(np.float64).reshape(-1, 3).sum(0)
    if s[2] <= 0:
        return {"mae": float("nan"), "mse": float("nan"), "rmse": float("nan"), "elements": 0}
    mse = s[1] / s[2]
    return {"mae": float(s[0] / s[2]), "mse": float(mse), "rmse": float(np.sqrt(mse)), "elements": int(s[2])}
