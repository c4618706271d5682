"""Colour prediction PNGs (evaluation output)."""
from __future__ import annotations

import os

import cv2
import numpy as np
from PIL import Image


def save_color(pred: np.ndarray, palette: np.ndarray, path: str) -> None:
    """Write an HxW id map as a palette PNG (ids readable back with PIL, colours from `palette`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    im.save(path)


def example_panel(image, x_adv, clean_pred: np.ndarray, adv_pred: np.ndarray, label: np.ndarray,
                  palette: np.ndarray) -> np.ndarray:
    """One row: image | perturbation (scaled to the full range) | adversarial image | ground truth |
    clean prediction | adversarial prediction; HxWx3 uint8. Id maps at another resolution than the
    image (labels kept at their original size) are resized to it (nearest)."""
    img = image.detach().float().cpu().permute(1, 2, 0).numpy()
    h, w = img.shape[:2]
    label, clean_pred, adv_pred = (cv2.resize(a.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                                   if a.shape != (h, w) else a for a in (label, clean_pred, adv_pred))
    adv = x_adv.detach().float().cpu().permute(1, 2, 0).numpy()
    delta = adv - img
    scale = max(float(np.abs(delta).max()), 1e-12)
    tiles = [img, 0.5 + 0.5 * delta / scale, adv] + [palette[p] / 255.0 for p in (label, clean_pred, adv_pred)]
    return (np.concatenate(tiles, 1).clip(0, 1) * 255).round().astype(np.uint8)
