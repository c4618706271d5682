#!/usr/bin/env python
"""Resize a Taskonomy tree (root/<domain>/point_<P>_view_<V>_domain_<domain>.png) into a mirror folder.

rgb and continuous targets (normal, reshading, edges, keypoints, curvature): area / bilinear.
Segmentation: nearest. depth_zbuffer / depth_euclidean (16-bit, >= 64500 invalid): valid-weighted, invalid
pixels stay 65535. Other files are copied. --rename-segment writes segment_semantic as segmentsemantic
(folder and file names), the spelling MTRobust's loader expects. Finished outputs are skipped.

    python data_resize_taskonomy.py --src data/taskonomy_full --dst data/taskonomy --size 256
"""
from __future__ import annotations

import argparse
import os

from data_resize_common import Job, check_args, main_guard, parse_size, run, walk

SEG = ("segmentsemantic", "segment_semantic")
DEPTH = ("depth_zbuffer", "depth_euclidean")


def kind_of(rel: str) -> str:
    domain = rel.split(os.sep)[0]
    if not rel.lower().endswith((".png", ".jpg", ".jpeg")):
        return "copy"
    if domain in SEG:
        return "label"
    if domain in DEPTH:
        return "depth"
    return "image"


def dst_rel(rel: str, rename_segment: bool) -> str:
    parts = rel.split(os.sep)
    if rename_segment and parts[0] == "segment_semantic":
        parts[0] = "segmentsemantic"
        parts[-1] = parts[-1].replace("_domain_segment_semantic.", "_domain_segmentsemantic.")
    return os.path.join(*parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="Taskonomy root (holds rgb/, depth_zbuffer/, ...)")
    ap.add_argument("--dst", required=True, help="output root (mirrors --src)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--size", default=None, help="output size N or WxH (default 256)")
    g.add_argument("--factor", type=float, help="divide both sides by this factor")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rename-segment", action="store_true", help="segment_semantic -> segmentsemantic")
    a = ap.parse_args()
    check_args(a)
    size = None if a.factor else parse_size(a.size or "256")
    files = walk(a.src)
    if not any(kind_of(f) != "copy" for f in files):
        raise ValueError(f"no images under {a.src}")
    jobs = [Job(os.path.join(a.src, f), os.path.join(a.dst, dst_rel(f, a.rename_segment)), kind_of(f), "high")
            for f in files]
    return run(jobs, size, a.factor, max(1, a.workers), "taskonomy")


if __name__ == "__main__":
    main_guard(main)
