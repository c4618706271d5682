"""Class names and colour palettes of every dataset, in one place (used for colour predictions)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

SYNTHETIC_CLASSES = ["background", "disc", "square", "triangle", "ring", "cross"]


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved palette, [n,3] uint8 (also used as a generic fallback)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


CLASS_NAMES: Dict[str, List[str]] = {"synthetic": SYNTHETIC_CLASSES}
PALETTES: Dict[str, np.ndarray] = {"synthetic": voc_palette()}


def class_names(dataset: str, classes: int) -> List[str]:
    """Names for `classes` ids of `dataset`; 'class_<i>' where none are known."""
    names = CLASS_NAMES.get(dataset, [])
    return [names[i] if i < len(names) else f"class_{i}" for i in range(classes)]


def palette(dataset: str) -> np.ndarray:
    """[256,3] uint8 colours; index 255 (ignore) is drawn white."""
    pal = PALETTES.get(dataset, voc_palette()).copy()
    if len(pal) < 256:
        pal = np.concatenate([pal, voc_palette()[len(pal):]], 0)
    pal[255] = 255
    return pal
