"""Tiny dataset trees in the official layouts, with known values, for the dataset, resize and launcher tests
(and the tiny-model settings that run experiment configs on them).

Like the real data, every split mixes image sizes and orientations (landscape and portrait; square for
Taskonomy, whose loader resizes to a square), and every label holds several classes plus ignore pixels
where the real annotations have them. Sizes stay within tens of pixels so tests run fast.
"""
from __future__ import annotations

import os
import zlib
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

from datasets.palettes import voc_palette

Shape = Tuple[int, int]
# (h, w) of the k-th image of every split: two landscape sizes, one portrait, and a repeated size so an
# evaluation batch holds a same-size group of two besides single images
SHAPES: Tuple[Shape, ...] = ((16, 24), (24, 16), (20, 30), (16, 24))
H, W = SHAPES[0]
SPLIT_SIZE = len(SHAPES)  # images per split in every fixture


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A flat colour (survives JPEG nearly unchanged)."""
    c = np.random.default_rng(seed).integers(30, 226, 3, dtype=np.uint8)
    return np.broadcast_to(c, (h, w, 3)).copy()


def write_rgb(path: str, img: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, img[..., ::-1].copy())


def write_gray(path: str, a: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, a)


# ---------------------------------------------------------------- cityscapes
CS_NAMES: Dict[str, List[str]] = {  # sorted, as the loader lists them
    "train": ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bonn/bonn_000001_000019",
              "bremen/bremen_000000_000019"],
    "val": ["frankfurt/frankfurt_000000_000294", "frankfurt/frankfurt_000001_000538",
            "lindau/lindau_000000_000019", "munster/munster_000000_000019"],
}
CS_BOTTOM = (11, 21, 23, 24)  # building, vegetation, sky, person: a class band at the bottom of image k


def cs_label_ids(k: int, h: int = H, w: int = W) -> np.ndarray:
    """labelIds: left third road (7), middle car (26), right unlabeled (0), row 0 bicycle (33), (1,1) license
    plate, bottom three rows of the left third CS_BOTTOM[k]."""
    lbl = np.zeros((h, w), np.uint8)
    lbl[:, :w // 3], lbl[:, w // 3:2 * w // 3] = 7, 26
    lbl[0] = 33
    lbl[1, 1] = 255  # -1 (license plate) as stored in uint8
    lbl[h - 3:, :w // 3] = CS_BOTTOM[k % len(CS_BOTTOM)]
    return lbl


CS_TRAIN_IDS = {7: 0, 26: 13, 0: 255, 33: 18, 255: 255, 11: 2, 21: 8, 23: 10, 24: 11}


def cs_train_ids(k: int, h: int = H, w: int = W) -> np.ndarray:
    return np.vectorize(CS_TRAIN_IDS.get)(cs_label_ids(k, h, w)).astype(np.uint8)


def cs_disparity(h: int = H, w: int = W) -> np.ndarray:
    d = np.full((h, w), 257 + 256 * 3, np.uint16)   # (p-1)/256 = 4.0
    d[:, :w // 2] = 1 + 256 * 10                      # 10.0
    d[:6, :6] = 0                                     # invalid block
    return d


def make_cityscapes(root: str, train_ids: bool = False) -> dict:
    """CS_NAMES per split (image k of SHAPES[k]); labelIds (or trainIds too) and disparity.
    Returns {(split, k): image}."""
    out = {}
    for split, names in CS_NAMES.items():
        for k, name in enumerate(names):
            h, w = SHAPES[k]
            img = rgb(zlib.crc32(name.encode()) % 1000, h, w)
            write_rgb(os.path.join(root, "leftImg8bit", split, name + "_leftImg8bit.png"), img)
            write_gray(os.path.join(root, "gtFine", split, name + "_gtFine_labelIds.png"), cs_label_ids(k, h, w))
            if train_ids:
                write_gray(os.path.join(root, "gtFine", split, name + "_gtFine_labelTrainIds.png"),
                           cs_train_ids(k, h, w))
            write_gray(os.path.join(root, "disparity", split, name + "_disparity.png"), cs_disparity(h, w))
            with open(os.path.join(root, "gtFine", split, name + "_gtFine_polygons.json"), "w") as f:
                f.write("{}")
            out[(split, k)] = img
    return out


# ---------------------------------------------------------------- voc2012
VOC_IDS: Dict[str, List[str]] = {
    "train": ["2007_000032", "2007_000033", "2007_000039", "2007_000042"],
    "val": ["2008_000001", "2008_000002", "2008_000003", "2008_000004"],
}
VOC_OBJECTS = {"train": ((15, 9), (20, 1), (12, 3), (7, 15)), "val": ((20, 5), (15, 11), (1, 12), (9, 18))}


def voc_label(split: str, k: int) -> np.ndarray:
    """Background, two objects (classes VOC_OBJECTS[split][k]) each inside a 255 boundary ring."""
    h, w = SHAPES[k]
    lbl = np.zeros((h, w), np.uint8)
    first, second = VOC_OBJECTS[split][k]
    lbl[3:13, 3:13] = 255
    lbl[4:12, 4:12] = first
    lbl[h - 7:h - 1, w - 8:w - 1] = 255
    lbl[h - 6:h - 2, w - 7:w - 2] = second
    return lbl


def make_voc(root: str) -> dict:
    """VOC_IDS per split; labels as palette ('P') PNGs; train list with paths, val list with bare ids."""
    pal = voc_palette().flatten().tolist()
    imgs = {}
    os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
    os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
    for split, ids in VOC_IDS.items():
        for k, i in enumerate(ids):
            img = smooth(zlib.crc32(i.encode()) % 1000, *SHAPES[k])
            Image.fromarray(img).save(os.path.join(root, "JPEGImages", i + ".jpg"), quality=100)
            p = Image.fromarray(voc_label(split, k), mode="P")
            p.putpalette(pal)
            p.save(os.path.join(root, "SegmentationClassAug", i + ".png"))
            imgs[i] = img
    os.makedirs(os.path.join(root, "list"), exist_ok=True)
    with open(os.path.join(root, "list", "train_aug.txt"), "w") as f:
        f.writelines(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in VOC_IDS["train"])
    with open(os.path.join(root, "list", "val.txt"), "w") as f:
        f.writelines(i + "\n" for i in VOC_IDS["val"])
    return imgs


# ---------------------------------------------------------------- ade20k
ADE_SPLITS = {"training": "ADE_train", "validation": "ADE_val"}


def ade_label(k: int, h: int = H, w: int = W) -> np.ndarray:
    """Image k (1-based): 0 (other) in the left 5 columns, 1 (wall), 150 in the right 4 columns,
    a 10+k block at the bottom, 3+k at (8, 8)."""
    lbl = np.full((h, w), 1, np.uint8)
    lbl[:, :5] = 0
    lbl[:, w - 4:] = 150
    lbl[h - 4:, 5:9] = 10 + k
    lbl[8, 8] = 3 + k
    return lbl


def make_ade20k(root: str) -> None:
    """SPLIT_SIZE images per split (image k of SHAPES[k-1]), written in reverse name order (the loader must sort)."""
    base = os.path.join(root, "ADEChallengeData2016")
    for split, prefix in ADE_SPLITS.items():
        for k in range(SPLIT_SIZE, 0, -1):
            name = f"{prefix}_{k:08d}"
            h, w = SHAPES[k - 1]
            os.makedirs(os.path.join(base, "images", split), exist_ok=True)
            Image.fromarray(smooth(k, h, w)).save(os.path.join(base, "images", split, name + ".jpg"), quality=100)
            write_gray(os.path.join(base, "annotations", split, name + ".png"), ade_label(k, h, w))


# ---------------------------------------------------------------- taskonomy
TK_SIZE = 16
# point -> (h, w): train points < 1200, val >= 1200; the first of each split is square TK_SIZE
TK_POINTS: Dict[int, Shape] = {1: (16, 16), 5: (12, 20), 7: (20, 12), 9: (16, 24),
                               1300: (16, 16), 1301: (20, 12), 1302: (12, 20), 1303: (24, 16)}


def tk_depth(h: int = TK_SIZE, w: int = TK_SIZE) -> np.ndarray:
    d = np.full((h, w), 1000, np.uint16)
    d[:, w // 2:] = 30000
    d[:4, :4] = 65535  # invalid
    return d


def tk_seg(h: int = TK_SIZE, w: int = TK_SIZE) -> np.ndarray:
    s = np.full((h, w), 1, np.uint8)   # class 0 (background)
    s[h // 2:, w // 2:] = 17          # class 16
    s[h // 2:, :w // 4] = 3           # class 2 (chair)
    s[:2] = 0                         # unlabelled
    return s


# semseg_prior_factor.npy: 17 rebalancing weights (class 0 about 0.5 as published, the others 7..9)
TK_PRIOR = np.array([0.542] + [7.0 + 0.125 * k for k in range(16)], np.float32)


def make_taskonomy(root: str, seg_folder: str = "segment_semantic") -> None:
    """TK_POINTS; rgb, depth_zbuffer with invalid values, segmentation, curvature, edge texture; the other
    dense domains of the MTRobust test models (flat values) and semseg_prior_factor.npy (TK_PRIOR)."""
    os.makedirs(root, exist_ok=True)
    np.save(os.path.join(root, "semseg_prior_factor.npy"), TK_PRIOR)
    for point, (h, w) in TK_POINTS.items():
        name = f"point_{point}_view_0_domain_{{}}.png"
        write_rgb(os.path.join(root, "rgb", name.format("rgb")), rgb(point, h, w))
        write_gray(os.path.join(root, "depth_zbuffer", name.format("depth_zbuffer")), tk_depth(h, w))
        write_gray(os.path.join(root, seg_folder, name.format(seg_folder)), tk_seg(h, w))
        curv = np.zeros((h, w, 3), np.uint8)
        curv[..., 0], curv[..., 1], curv[..., 2] = 130, 100, 7
        write_rgb(os.path.join(root, "principal_curvature", name.format("principal_curvature")), curv)
        edge = np.full((h, w), 2000, np.uint16)
        write_gray(os.path.join(root, "edge_texture", name.format("edge_texture")), edge)
        euclid = tk_depth(h, w)
        euclid[euclid < 64500] += 7
        write_gray(os.path.join(root, "depth_euclidean", name.format("depth_euclidean")), euclid)
        for domain, value in (("edge_occlusion", 40), ("keypoints2d", 100), ("keypoints3d", 30000)):
            write_gray(os.path.join(root, domain, name.format(domain)), np.full((h, w), value, np.uint16))
        write_gray(os.path.join(root, "reshading", name.format("reshading")), np.full((h, w), 180, np.uint8))
        write_rgb(os.path.join(root, "normal", name.format("normal")), np.full((h, w, 3), (128, 100, 200), np.uint8))


# ---------------------------------------------------------------- folder (your own data)
# raw ids as in Cityscapes' labelIds: road 7, car 26, bicycle 33, unlabelled 0, and 255; FOLDER_OVERRIDES
# map them to 3 train ids and ignore
FOLDER_NAMES: Dict[str, List[str]] = {"train": ["a_0", "b_1", "city/c_2", "d_3"],
                                      "val": ["e_0", "city/f_1", "g_2", "h_3"]}
FOLDER_LABEL_MAP = {0: 255, 7: 0, 26: 1, 33: 2, 255: 255}
FOLDER_OVERRIDES = ["data.classes=3", "data.label_map={0: 255, 7: 0, 26: 1, 33: 2, 255: 255}",
                    "data.class_names=[road, car, bicycle]"]


def folder_raw_label(k: int, h: int, w: int) -> np.ndarray:
    """Left half road (7), right half car (26), row 0 bicycle (33), column 0 unlabelled (0), (1, 1) 255;
    image k has k more bicycle rows."""
    lbl = np.full((h, w), 7, np.uint8)
    lbl[:, w // 2:] = 26
    lbl[:1 + k] = 33
    lbl[:, 0] = 0
    lbl[1, 1] = 255
    return lbl


def make_folder(root: str) -> dict:
    """FOLDER_NAMES per split under images/<split>/ (PNG and JPEG, landscape and portrait: SHAPES) and
    labels/<split>/ (raw ids, folder_raw_label). Returns {(split, k): image}."""
    out = {}
    for split, names in FOLDER_NAMES.items():
        for k, name in enumerate(names):
            h, w = SHAPES[k]
            img = rgb(zlib.crc32(name.encode()) % 1000, h, w)
            ext = ".png" if k % 2 == 0 else ".jpg"
            write_rgb(os.path.join(root, "images", split, name + ext), img)
            write_gray(os.path.join(root, "labels", split, name + ".png"), folder_raw_label(k, h, w))
            out[(split, k)] = img
    return out


# The smallest settings each model builder accepts, without ImageNet weights, to run experiment configs on
# these fixtures: ResNet-18 at quarter width for PSPNet, DeepLabv3 and the Taskonomy ResNet; ConvNeXt-T at
# quarter width (inputs of at least 32 pixels); DRN-D-22, the smallest DRN (no width option); FPD-Seg on ResNet-18
# at quarter width with a restoration FPN of width 16.
TINY_MODELS = {
    "pspnet": ["model.layers=18", "model.width=0.25", "model.pretrained=null"],
    "deeplabv3": ["model.layers=18", "model.width=0.25", "model.pretrained=null"],
    "pspnet_ddcat": ["model.layers=18", "model.width=0.25", "model.pretrained=null"],
    "deeplabv3_ddcat": ["model.layers=18", "model.width=0.25", "model.pretrained=null"],
    "upernet_convnext": ["model.backbone=convnext_t_cvst", "model.width=0.25", "model.pretrained=null"],
    "drn_seg": ["model.arch=drn_d_22", "model.pretrained=null"],
    "drn_multitask": ["model.arch=drn_d_22", "model.pretrained=null"],
    "taskonomy_resnet": ["model.layers=18", "model.width=0.25", "model.pretrained=null"],
    "fpd_seg": ["model.layers=18", "model.width=0.25", "model.fpd.fpn_width=16", "model.pretrained=null"],
    "segmenter": ["model.vit.embed_dim=32", "model.vit.depth=2", "model.vit.heads=2", "model.vit.decoder_layers=1",
                  "model.pretrained=null"],
}
MAKERS = {"cityscapes": make_cityscapes, "voc2012": make_voc, "ade20k": make_ade20k, "taskonomy": make_taskonomy,
          "folder": make_folder}
# settings a fixture needs beyond the experiment config's (the folder config's classes are a placeholder)
MAKER_OVERRIDES = {"folder": FOLDER_OVERRIDES}


# ---------------------------------------------------------------- hostile image files
def corrupt_jpeg_body(data: bytes, seed: int = 0) -> bytes:
    """`data` (a JPEG) with 40 bytes of its entropy-coded data replaced by random bytes other than 0xFF:
    the length, every marker and the end-of-image marker are kept, so only the decoder can tell."""
    b = bytearray(data)
    sos = b.rfind(b"\xff\xda")
    start = sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")
    assert b.rfind(b"\xff\xd9") > start + 100
    b[start + 20:start + 60] = np.random.default_rng(seed).integers(0, 255, 40, dtype=np.uint8).tobytes()
    return bytes(b)


def png_claiming(w: int, h: int) -> bytes:
    """A small, valid-looking PNG whose header claims w x h pixels."""
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
