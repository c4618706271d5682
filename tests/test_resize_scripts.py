"""The resize scripts, run as subprocesses on tiny official-layout fixtures."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import cv2
import numpy as np

import data_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def read(p) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_UNCHANGED)


def test_cityscapes_resize(tmp_path):
    src, dst = tmp_path / "cs", tmp_path / "cs_small"
    fx.make_cityscapes(str(src))
    r = run("data_resize_cityscape.py", "--src", str(src), "--dst", str(dst), "--factor", "2", "--workers", "2")
    assert r.returncode == 0, r.stderr
    n = len(glob.glob(str(src / "**" / "*.*"), recursive=True))
    assert f"{n} written, 0 skipped, 0 failed" in r.stdout
    rel = "frankfurt/frankfurt_000000_000294"
    img = read(dst / "leftImg8bit" / "val" / f"{rel}_leftImg8bit.png")
    assert img.shape == (fx.H // 2, fx.W // 2, 3)
    lbl = read(dst / "gtFine" / "val" / f"{rel}_gtFine_labelIds.png")
    assert lbl.shape == (fx.H // 2, fx.W // 2) and set(np.unique(lbl)) <= set(np.unique(fx.cs_label_ids(0)))
    disp = read(dst / "disparity" / "val" / f"{rel}_disparity.png")
    assert disp.dtype == np.uint16 and disp.shape == (fx.H // 2, fx.W // 2)
    assert (disp[:3, :3] == 0).all() and (disp[3:] > 0).all()             # invalid 6x6 block stays invalid
    assert set(np.unique(disp[3:])) <= set(np.unique(fx.cs_disparity()[6:]))  # no invalid zero mixed in
    assert (dst / "gtFine" / "val" / f"{rel}_gtFine_polygons.json").read_text() == "{}"
    portrait = fx.CS_NAMES["val"][1]                                       # 24x16 -> 12x8, labels still ids
    assert read(dst / "leftImg8bit" / "val" / f"{portrait}_leftImg8bit.png").shape == (12, 8, 3)
    lbl = read(dst / "gtFine" / "val" / f"{portrait}_gtFine_labelIds.png")
    assert lbl.shape == (12, 8) and set(np.unique(lbl)) <= set(np.unique(fx.cs_label_ids(1, 24, 16)))
    again = run("data_resize_cityscape.py", "--src", str(src), "--dst", str(dst), "--factor", "2", "--workers", "1")
    assert again.returncode == 0 and f"0 written, {n} skipped, 0 failed" in again.stdout
    r = run("data_resize_cityscape.py", "--src", str(src), "--dst", str(tmp_path / "fixed"), "--size", "10x6")
    assert r.returncode == 0 and read(tmp_path / "fixed" / "leftImg8bit" / "val" / f"{rel}_leftImg8bit.png").shape == (6, 10, 3)


def test_taskonomy_resize_and_rename(tmp_path):
    src, dst = tmp_path / "tk", tmp_path / "tk_small"
    fx.make_taskonomy(str(src))
    r = run("data_resize_taskonomy.py", "--src", str(src), "--dst", str(dst), "--size", "8", "--rename-segment",
            "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert not (dst / "segment_semantic").exists()
    seg = read(dst / "segmentsemantic" / "point_1_view_0_domain_segmentsemantic.png")
    assert seg.shape == (8, 8) and set(np.unique(seg)) == {0, 1, 3, 17}
    depth = read(dst / "depth_zbuffer" / "point_1_view_0_domain_depth_zbuffer.png")
    assert depth.dtype == np.uint16 and depth.shape == (8, 8)
    assert (depth[:2, :2] == 65535).all() and (depth[2:] < 64500).all() and set(np.unique(depth[2:])) == {1000, 30000}
    assert read(dst / "rgb" / "point_1_view_0_domain_rgb.png").shape == (8, 8, 3)
    again = run("data_resize_taskonomy.py", "--src", str(src), "--dst", str(dst), "--size", "8", "--rename-segment")
    assert again.returncode == 0 and " 0 written" in again.stdout and "0 failed" in again.stdout


def test_bad_input(tmp_path):
    r = run("data_resize_cityscape.py", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o"), "--factor", "2")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("data_resize_taskonomy.py", "--src", str(tmp_path / "empty"), "--dst", str(tmp_path / "o"))
    assert r.returncode == 2 and "no images" in r.stderr
    src = tmp_path / "tk"
    fx.make_taskonomy(str(src))
    (src / "rgb" / "point_1_view_0_domain_rgb.png").write_bytes(b"broken")
    r = run("data_resize_taskonomy.py", "--src", str(src), "--dst", str(tmp_path / "o2"), "--size", "8")
    assert r.returncode == 1 and "1 failed" in r.stdout and "point_1_view_0_domain_rgb.png" in r.stderr
