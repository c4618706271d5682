"""Tiny dataset trees in the official layouts, with known values, for the dataset and resize tests."""
from __future__ import annotations

import os
import zlib

import cv2
import numpy as np
from PIL import Image

from datasets.palettes import voc_palette

H, W = 16, 24


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


def cs_label_ids(seed: int) -> np.ndarray:
    """labelIds: left third road (7), middle car (26), right unlabeled (0), row 0 bicycle (33), (1,1) license plate."""
    lbl = np.zeros((H, W), np.uint8)
    lbl[:, :8], lbl[:, 8:16] = 7, 26
    lbl[0] = 33
    lbl[1, 1] = 255  # -1 (license plate) as stored in uint8
    return lbl


CS_TRAIN_IDS = {7: 0, 26: 13, 0: 255, 33: 18, 255: 255}


def cs_disparity() -> np.ndarray:
    d = np.full((H, W), 257 + 256 * 3, np.uint16)   # (p-1)/256 = 4.0
    d[:, :W // 2] = 1 + 256 * 10                      # 10.0
    d[:6, :6] = 0                                     # invalid block
    return d


def make_cityscapes(root: str, train_ids: bool = False) -> dict:
    """2 train images (two cities), 1 val image; labelIds (or trainIds) and disparity."""
    out = {}
    for split, names in (("train", ["aachen/aachen_000000_000019", "bonn/bonn_000001_000019"]),
                         ("val", ["frankfurt/frankfurt_000000_000294"])):
        for k, name in enumerate(names):
            img = rgb(zlib.crc32(name.encode()) % 1000)
            write_rgb(os.path.join(root, "leftImg8bit", split, name + "_leftImg8bit.png"), img)
            lbl = cs_label_ids(k)
            write_gray(os.path.join(root, "gtFine", split, name + "_gtFine_labelIds.png"), lbl)
            if train_ids:
                write_gray(os.path.join(root, "gtFine", split, name + "_gtFine_labelTrainIds.png"),
                           np.vectorize(CS_TRAIN_IDS.get)(lbl).astype(np.uint8))
            write_gray(os.path.join(root, "disparity", split, name + "_disparity.png"), cs_disparity())
            with open(os.path.join(root, "gtFine", split, name + "_gtFine_polygons.json"), "w") as f:
                f.write("{}")
            out[(split, k)] = img
    return out


def voc_label(k: int) -> np.ndarray:
    lbl = np.zeros((H, W), np.uint8)
    lbl[4:12, 4:12] = 15 if k == 0 else 20
    lbl[3, 3:13] = 255   # boundary band
    return lbl


def make_voc(root: str) -> dict:
    """3 images; labels as palette ('P') PNGs; train list with paths, val list with bare ids."""
    ids = ["2007_000032", "2007_000033", "2008_000001"]
    pal = voc_palette().flatten().tolist()
    imgs = {}
    for k, i in enumerate(ids):
        img = smooth(k)
        os.makedirs(os.path.join(root, "JPEGImages"), exist_ok=True)
        Image.fromarray(img).save(os.path.join(root, "JPEGImages", i + ".jpg"), quality=100)
        os.makedirs(os.path.join(root, "SegmentationClassAug"), exist_ok=True)
        p = Image.fromarray(voc_label(k), mode="P")
        p.putpalette(pal)
        p.save(os.path.join(root, "SegmentationClassAug", i + ".png"))
        imgs[i] = img
    os.makedirs(os.path.join(root, "list"), exist_ok=True)
    with open(os.path.join(root, "list", "train_aug.txt"), "w") as f:
        f.writelines(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids[:2])
    with open(os.path.join(root, "list", "val.txt"), "w") as f:
        f.write(ids[2] + "\n")
    return imgs


def ade_label(k: int) -> np.ndarray:
    lbl = np.full((H, W), 1, np.uint8)
    lbl[:, :5] = 0
    lbl[:, 20:] = 150
    lbl[8, 8] = 3 + k
    return lbl


def make_ade20k(root: str) -> None:
    """2 training images written in reverse name order (the loader must sort), 1 validation image."""
    base = os.path.join(root, "ADEChallengeData2016")
    for split, names in (("training", ["ADE_train_00000002", "ADE_train_00000001"]),
                         ("validation", ["ADE_val_00000001"])):
        for name in names:
            k = int(name[-1])
            os.makedirs(os.path.join(base, "images", split), exist_ok=True)
            Image.fromarray(smooth(k)).save(os.path.join(base, "images", split, name + ".jpg"), quality=100)
            write_gray(os.path.join(base, "annotations", split, name + ".png"), ade_label(k))


TK_SIZE = 16


def tk_depth() -> np.ndarray:
    d = np.full((TK_SIZE, TK_SIZE), 1000, np.uint16)
    d[:, TK_SIZE // 2:] = 30000
    d[:4, :4] = 65535  # invalid
    return d


def tk_seg() -> np.ndarray:
    s = np.full((TK_SIZE, TK_SIZE), 1, np.uint8)   # class 0 (background)
    s[8:, 8:] = 17                                    # class 16
    s[:2] = 0                                         # unlabelled
    return s


def make_taskonomy(root: str, seg_folder: str = "segment_semantic") -> None:
    """Points 1 and 5 (train), 1300 (val); rgb, depth_zbuffer with invalid values, segmentation, curvature."""
    for point in (1, 5, 1300):
        name = f"point_{point}_view_0_domain_{{}}.png"
        write_rgb(os.path.join(root, "rgb", name.format("rgb")), rgb(point, TK_SIZE, TK_SIZE))
        write_gray(os.path.join(root, "depth_zbuffer", name.format("depth_zbuffer")), tk_depth())
        write_gray(os.path.join(root, seg_folder, name.format(seg_folder)), tk_seg())
        curv = np.zeros((TK_SIZE, TK_SIZE, 3), np.uint8)
        curv[..., 0], curv[..., 1], curv[..., 2] = 130, 100, 7
        write_rgb(os.path.join(root, "principal_curvature", name.format("principal_curvature")), curv)
        edge = np.full((TK_SIZE, TK_SIZE), 2000, np.uint16)
        write_gray(os.path.join(root, "edge_texture", name.format("edge_texture")), edge)
