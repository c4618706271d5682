#!/usr/bin/env python
"""Resize a Cityscapes tree (leftImg8bit, gtFine/gtCoarse, disparity, ...) into a mirror folder.

Images: area / bilinear. Label PNGs (*labelIds, *TrainIds, *instanceIds, *color): nearest. Disparity
(16-bit, 0 = invalid): valid-weighted, so invalid zeros never mix into valid values. Other files are
copied. Finished outputs are skipped, so an interrupted run can be resumed.

    python data_resize_cityscape.py --src data/cityscapes --dst data/cityscapes_small --factor 3
    python data_resize_cityscape.py --src data/cityscapes --dst data/cityscapes_1024 --size 1024x512
"""
from __future__ import annotations

import argparse
import os

from data_resize_common import Job, check_args, main_guard, parse_size, run, walk

LABEL_ENDINGS = ("labelIds.png", "TrainIds.png", "trainIds.png", "instanceIds.png", "_color.png")


def kind_of(rel: str) -> str:
    top = rel.split(os.sep)[0]
    if not rel.endswith(".png"):
        return "copy"
    if top.startswith("disparity") or rel.endswith("_disparity.png"):
        return "depth"
    if top.startswith(("gtFine", "gtCoarse")) or rel.endswith(LABEL_ENDINGS):
        return "label"
    return "image"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="Cityscapes root (holds leftImg8bit/, gtFine/, ...)")
    ap.add_argument("--dst", required=True, help="output root (mirrors --src)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", help="output size WxH, e.g. 1024x512")
    g.add_argument("--factor", type=float, help="divide both sides by this factor, e.g. 3")
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    check_args(a)
    size = parse_size(a.size) if a.size else None
    files = walk(a.src)
    if not any(f.endswith(".png") for f in files):
        raise ValueError(f"no PNG files under {a.src}")
    jobs = [Job(os.path.join(a.src, f), os.path.join(a.dst, f), kind_of(f), "zero") for f in files]
    return run(jobs, size, a.factor, max(1, a.workers), "cityscapes")


if __name__ == "__main__":
    main_guard(main)
