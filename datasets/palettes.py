"""Class names and colour palettes of every dataset, in one place (used for colour predictions)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

SYNTHETIC_CLASSES = ["background", "disc", "square", "triangle", "ring", "cross"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
# the official cityscapesScripts colours of the 19 train ids
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]

# ADE20K SceneParsing 150 classes in id order (ids 1..150 of the annotation PNGs; 0 = other/unlabelled)
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag"]
ADE20K_CLASSES_151 = ["other"] + ADE20K_CLASSES  # SEA protocol: label 0 kept as a class

# Taskonomy semantic segmentation: raw label 0 = unlabelled (ignored), raw 1..17 -> classes 0..16
TASKONOMY_CLASSES = ["background", "bottle", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
                     "tv", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase"]


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


def spread_palette(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct, reproducible colours (HSV golden-ratio hue walk) for datasets without a standard palette."""
    rng = np.random.default_rng(seed)
    hue = (np.arange(n) * 0.6180339887) % 1.0
    sat = 0.55 + 0.45 * rng.random(n)
    val = 0.55 + 0.45 * rng.random(n)
    i = np.floor(hue * 6).astype(int) % 6
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = np.select([i[:, None] == k for k in range(6)],
                    [np.stack(c, 1) for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val),
                                              (val, p, q))])
    return (rgb * 255).round().astype(np.uint8)


CLASS_NAMES: Dict[str, List[str]] = {
    "synthetic": SYNTHETIC_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "voc2012": VOC_CLASSES,
    "ade20k": ADE20K_CLASSES, "ade20k_151": ADE20K_CLASSES_151, "taskonomy": TASKONOMY_CLASSES}
_ADE_PAL = spread_palette(150, seed=20)
PALETTES: Dict[str, np.ndarray] = {
    "synthetic": voc_palette(), "cityscapes": CITYSCAPES_PALETTE, "voc2012": voc_palette(),
    "ade20k": _ADE_PAL, "ade20k_151": np.concatenate([np.zeros((1, 3), np.uint8), _ADE_PAL]),
    "taskonomy": spread_palette(17, seed=7)}


def _key(dataset: str, classes: int) -> str:
    # ADE20K with 151 classes (label 0 kept) shifts every name and colour by one
    return "ade20k_151" if dataset == "ade20k" and classes == 151 else dataset


def class_names(dataset: str, classes: int) -> List[str]:
    """Names for `classes` ids of `dataset`; 'class_<i>' where none are known."""
    names = CLASS_NAMES.get(_key(dataset, classes), [])
    return [names[i] if i < len(names) else f"class_{i}" for i in range(classes)]


def palette(dataset: str, classes: int = 0) -> np.ndarray:
    """[256,3] uint8 colours; index 255 (ignore) is drawn white. `classes` picks ADE20K's 150/151 variant."""
    pal = PALETTES.get(_key(dataset, classes), voc_palette()).copy()
    if len(pal) < 256:
        pal = np.concatenate([pal, voc_palette()[len(pal):]], 0)
    pal[255] = 255
    return pal
