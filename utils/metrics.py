"""Segmentation metrics from per-image per-class integer counts (pooled over a split)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, classes: int,
                     ignore: int = 255) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (intersection, union, target area), each [B, classes] int64, ignore pixels dropped.

    One bincount over ``image * classes + class`` for the whole batch (no loop over images/classes).
    """
    b = pred.shape[0]
    valid = target != ignore
    offset = torch.arange(b, device=pred.device).view(b, *([1] * (pred.dim() - 1))) * classes
    t = (target.clamp(0, classes - 1) + offset)[valid]
    p = (pred + offset)[valid]
    hit = pred[valid] == target[valid]
    n = b * classes
    inter = torch.bincount(t[hit], minlength=n).view(b, classes)
    area_t = torch.bincount(t, minlength=n).view(b, classes)
    area_p = torch.bincount(p, minlength=n).view(b, classes)
    return inter, area_t + area_p - inter, area_t


def summarize(inter: np.ndarray, union: np.ndarray, target: np.ndarray,
              names: Optional[List[str]] = None) -> dict:
    """Pooled metrics over images (axis 0 summed): mIoU over classes with union > 0,
    mAcc over classes present in the ground truth, aAcc over all valid pixels.

    Classes absent from both prediction and ground truth are left out of the means and reported
    as None in ``iou_per_class`` (a class predicted but absent from the ground truth has IoU 0).
    """
    i, u, t = (np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1]).sum(0) for a in (inter, union, target))
    iou = np.where(u > 0, i / np.maximum(u, 1), np.nan)
    acc = np.where(t > 0, i / np.maximum(t, 1), np.nan)
    out = {"mIoU": float(np.nanmean(iou)) if (u > 0).any() else 0.0,
           "mAcc": float(np.nanmean(acc)) if (t > 0).any() else 0.0,
           "aAcc": float(i.sum() / t.sum()) if t.sum() > 0 else 0.0,
           "iou_per_class": [None if np.isnan(v) else float(v) for v in iou],
           "acc_per_class": [None if np.isnan(v) else float(v) for v in acc]}
    if names is not None:
        out["class_names"] = list(names)
    return out
