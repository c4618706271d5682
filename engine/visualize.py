"""Colour prediction PNGs (evaluation output)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def save_color(pred: np.ndarray, palette: np.ndarray, path: str) -> None:
    """Write an HxW id map as a palette PNG (ids readable back with PIL, colours from `palette`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    im.save(path)
