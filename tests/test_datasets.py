"""Dataset loaders on tiny fixtures in the official layouts, checked value by value."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_fixtures as fx
from datasets import build_dataset
from datasets.palettes import class_names, palette
from datasets.transforms import build_train_transform, pirat_train, sea_eval, semseg_eval
from utils.config import Config, load_config
from utils.errors import SetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "config", "_base_", "default.yaml")


def cfg_for(fragment: str, root: str, *overrides: str) -> Config:
    return load_config(os.path.join(ROOT, "config", "_base_", "datasets", fragment + ".yaml"),
                       [f"data.root={root}", *overrides])


def one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


# ---------------------------------------------------------------- cityscapes
def test_cityscapes_label_ids_converted(tmp_path):
    imgs = fx.make_cityscapes(str(tmp_path))
    ds = build_dataset(cfg_for("cityscapes", str(tmp_path), "data.eval_transform=none"), "val")
    assert len(ds) == fx.SPLIT_SIZE and ds.classes == 19 and ds.name(0) == "frankfurt_000000_000294_leftImg8bit"
    s = ds[0]
    assert s["image"].shape == (3, fx.H, fx.W) and s["image"].dtype == torch.float32
    assert torch.allclose(s["image"], torch.from_numpy(imgs[("val", 0)]).permute(2, 0, 1).float() / 255)
    expect = np.vectorize(fx.CS_TRAIN_IDS.get)(fx.cs_label_ids(0))
    assert s["label"].dtype == torch.long and (s["label"].numpy() == expect).all()
    assert s["label"][5, 2] == 0 and s["label"][5, 10] == 13 and s["label"][5, 20] == 255
    assert s["label"][0, 3] == 18 and s["label"][1, 1] == 255 and s["label"][15, 2] == 2
    # every image at its own size and orientation, labels converted value by value
    for k, shape in enumerate(fx.SHAPES):
        s = ds[k]
        assert s["image"].shape == (3, *shape) and s["label"].shape == shape
        assert torch.allclose(s["image"], torch.from_numpy(imgs[("val", k)]).permute(2, 0, 1).float() / 255)
        assert (s["label"].numpy() == fx.cs_train_ids(k, *shape)).all()
    assert ds[2]["label"][19, 0] == 10 and ds[1]["label"][23, 0] == 8 and ds[1]["label"][5, 12] == 255


def test_cityscapes_train_ids_preferred_and_sorted(tmp_path):
    fx.make_cityscapes(str(tmp_path), train_ids=True)
    # make the labelIds files wrong: the trainIds files must be the ones read
    for k, name in enumerate(fx.CS_NAMES["train"]):
        fx.write_gray(str(tmp_path / "gtFine" / "train" / f"{name}_gtFine_labelIds.png"),
                      np.full(fx.SHAPES[k], 99, np.uint8))
    ds = build_dataset(cfg_for("cityscapes", str(tmp_path), "data.transform=none"), "train")
    assert [ds.name(i) for i in range(len(ds))] == [os.path.basename(n) + "_leftImg8bit" for n in fx.CS_NAMES["train"]]
    assert ds.name(2) == "bonn_000001_000019_leftImg8bit" and ds[2]["label"][5, 10] == 13
    for k, shape in enumerate(fx.SHAPES):
        assert (ds[k]["label"].numpy() == fx.cs_train_ids(k, *shape)).all()


def test_cityscapes_list_file(tmp_path):
    fx.make_cityscapes(str(tmp_path))
    os.makedirs(tmp_path / "list")
    (tmp_path / "list" / "fine_val.txt").write_text(
        "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png "
        "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png\n")
    ds = build_dataset(cfg_for("cityscapes", str(tmp_path), "data.val_list=list/fine_val.txt",
                               "data.eval_transform=none"), "val")
    assert ds[0]["label"][5, 10] == 13 and ds[0]["label"][5, 20] == 255


def test_cityscapes_disparity_multitask(tmp_path):
    fx.make_cityscapes(str(tmp_path))
    cfg = cfg_for("cityscapes", str(tmp_path), "data.tasks=[segmentsemantic,depth_zbuffer]",
                  "data.eval_transform=none")
    s = build_dataset(cfg, "val")[0]
    d, m = s["targets"]["depth_zbuffer"], s["masks"]["depth_zbuffer"]
    assert d.shape == (1, fx.H, fx.W) and m.shape == (1, fx.H, fx.W)
    assert d[0, 10, 2] == 10.0 and d[0, 10, 20] == 4.0            # (p - 1) / 256
    assert (m[0, :6, :6] == 0).all() and (d[0, :6, :6] == 0).all() and m[0, 10, 2] == 1
    assert m.sum() == fx.H * fx.W - 36
    assert torch.equal(s["targets"]["segmentsemantic"], s["label"]) and s["label"][5, 10] == 13
    assert torch.equal(s["masks"]["segmentsemantic"][0], (s["label"] != 255).float())
    s = build_dataset(cfg, "val")[1]                                  # portrait: 24 x 16
    d, m = s["targets"]["depth_zbuffer"], s["masks"]["depth_zbuffer"]
    assert d.shape == (1, 24, 16) and s["label"].shape == (24, 16) and s["image"].shape == (3, 24, 16)
    assert d[0, 20, 7] == 10.0 and d[0, 20, 8] == 4.0 and m.sum() == 24 * 16 - 36
    # crop_flip pads dense targets as invalid and labels as ignore, identically for all maps
    cfg = cfg_for("cityscapes", str(tmp_path), "data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]",
                  "data.transform=crop_flip", "data.crop_size=[20,30]")
    s = build_dataset(cfg, "train")[0]
    assert s["image"].shape == (3, 20, 30) and s["label"].shape == (20, 30)
    pad = s["label"] == 255
    assert (s["masks"]["depth_zbuffer"][0][s["image"].sum(0) == 0] == 0).all()
    assert pad[:2].all() and pad[-2:].all()          # 4 rows of padding, split 2 / 2
    assert torch.equal(s["targets"]["autoencoder"], s["image"])


# ---------------------------------------------------------------- voc2012
def test_voc_palette_png_gives_class_ids(tmp_path):
    imgs = fx.make_voc(str(tmp_path))
    ds = build_dataset(cfg_for("voc2012", str(tmp_path), "data.transform=none"), "train")
    assert len(ds) == fx.SPLIT_SIZE and ds.classes == 21
    with Image.open(tmp_path / "SegmentationClassAug" / "2007_000032.png") as im:
        assert im.mode == "P"
    s = ds[0]
    assert (s["label"].numpy() == fx.voc_label("train", 0)).all()
    assert s["label"][5, 5] == 15 and s["label"][3, 5] == 255 and s["label"][0, 0] == 0 and s["label"][12, 18] == 9
    assert (s["image"] - torch.from_numpy(imgs["2007_000032"]).permute(2, 0, 1) / 255).abs().max() < 0.02
    for k, (i, shape) in enumerate(zip(fx.VOC_IDS["train"], fx.SHAPES)):
        s = ds[k]
        assert s["image"].shape == (3, *shape) and (s["label"].numpy() == fx.voc_label("train", k)).all()
        assert (s["image"] - torch.from_numpy(imgs[i]).permute(2, 0, 1) / 255).abs().max() < 0.02
    val = build_dataset(cfg_for("voc2012", str(tmp_path), "data.eval_transform=none"), "val")
    assert [val.name(k) for k in range(len(val))] == fx.VOC_IDS["val"]
    assert val[0]["label"][5, 5] == 20 and val[1]["label"][5, 5] == 15 and val[1]["label"][19, 11] == 11
    assert val[1]["label"].shape == (24, 16) and val[2]["image"].shape == (3, 20, 30)


def test_voc_boundary_as_background(tmp_path):
    fx.make_voc(str(tmp_path))
    ds = build_dataset(cfg_for("voc2012", str(tmp_path), "data.eval_transform=none",
                               "data.boundary_as_background=true"), "val")
    for k in range(len(ds)):
        lbl = ds[k]["label"].numpy()
        expect = fx.voc_label("val", k)
        assert (expect == 255).any()
        expect[expect == 255] = 0
        assert (lbl == expect).all() and 255 not in lbl


# ---------------------------------------------------------------- ade20k
def test_ade20k_reduce_zero_label_and_sorted(tmp_path):
    fx.make_ade20k(str(tmp_path))
    ds = build_dataset(cfg_for("ade20k", str(tmp_path), "data.transform=none"), "train")
    assert ds.classes == 150 and [ds.name(i) for i in range(len(ds))] == [f"ADE_train_{k:08d}" for k in (1, 2, 3, 4)]
    lbl = ds[0]["label"].numpy()
    expect = np.where(fx.ade_label(1) == 0, 255, fx.ade_label(1).astype(np.int64) - 1)
    assert (lbl == expect).all() and lbl[0, 0] == 255 and lbl[0, 10] == 0 and lbl[0, 22] == 149 and lbl[8, 8] == 3
    assert lbl[14, 6] == 10
    for k, shape in enumerate(fx.SHAPES, 1):
        raw = fx.ade_label(k, *shape).astype(np.int64)
        assert (ds[k - 1]["label"].numpy() == np.where(raw == 0, 255, raw - 1)).all()
        assert ds[k - 1]["image"].shape == (3, *shape)
    cfg = cfg_for("ade20k", str(tmp_path), "data.transform=none", "data.reduce_zero_label=false", "data.classes=151")
    lbl = build_dataset(cfg, "train")[1]["label"].numpy()
    assert (lbl == fx.ade_label(2, *fx.SHAPES[1])).all() and lbl[0, 0] == 0 and lbl[0, 14] == 150 and lbl[21, 6] == 12
    # wrong class count for the chosen convention
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("ade20k", str(tmp_path), "data.reduce_zero_label=false"), "train")
    one_line(e, "data.classes", "151")


def test_ade20k_sea_eval_protocol(tmp_path):
    fx.make_ade20k(str(tmp_path))
    cfg = cfg_for("ade20k", str(tmp_path), "data.eval_crop=[8,8]")
    val = build_dataset(cfg, "val")
    s = val[0]
    # 16x24 -> short side 8: 8x12 -> centre crop columns 2..9; nearest labels only
    assert s["image"].shape == (3, 8, 8) and s["label"].shape == (8, 8)
    assert set(np.unique(s["label"].numpy())) <= {255, 0, 149, 3, 10}
    for k in range(1, len(val)):  # every size and orientation ends as the same centre crop
        assert val[k]["image"].shape == (3, 8, 8) and val[k]["label"].shape == (8, 8)
    # portrait 24x16 -> 12x8, centre rows 2..9: row r of the crop is source row (r + 2) * 2
    expect = np.where(fx.ade_label(2, 24, 16) == 0, 255, fx.ade_label(2, 24, 16).astype(np.int64) - 1)
    assert (val[1]["label"].numpy() == expect[4:20:2, ::2]).all()


# ---------------------------------------------------------------- taskonomy
@pytest.mark.parametrize("seg_folder", ["segment_semantic", "segmentsemantic"])
def test_taskonomy_targets(tmp_path, seg_folder):
    fx.make_taskonomy(str(tmp_path), seg_folder)
    cfg = cfg_for("taskonomy", str(tmp_path), "data.taskonomy.size=16",
                  "data.tasks=[segmentsemantic,depth_zbuffer,principal_curvature,edge_texture,autoencoder]")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    points = sorted(fx.TK_POINTS, key=str)
    assert [train.name(i) for i in range(len(train))] == [f"point_{p}_view_0_domain_rgb" for p in points if p < 1200]
    assert [val.name(i) for i in range(len(val))] == [f"point_{p}_view_0_domain_rgb" for p in points if p >= 1200]
    s = train[0]
    seg = s["label"].numpy()
    assert (seg[:2] == 255).all() and seg[5, 2] == 0 and seg[10, 10] == 16 and seg[10, 2] == 2
    assert set(np.unique(seg)) == {0, 2, 16, 255}
    assert torch.equal(s["masks"]["segmentsemantic"][0], (s["label"] != 255).float())
    d, m = s["targets"]["depth_zbuffer"][0], s["masks"]["depth_zbuffer"][0]
    assert abs(float(d[10, 2]) - np.log1p(1000) / np.log(2 ** 16)) < 1e-5
    assert abs(float(d[10, 12]) - np.log1p(30000) / np.log(2 ** 16)) < 1e-5
    assert (m[:4, :4] == 0).all() and (d[:4, :4] == 0).all() and m.sum() == 16 * 16 - 16
    c = s["targets"]["principal_curvature"]
    assert c.shape == (2, 16, 16)                                  # colour: R and G channels
    assert abs(float(c[0, 0, 0]) - (130 - 123.572) / 31.922) < 1e-5
    assert abs(float(c[1, 0, 0]) - (100 - 120.1) / 21.658) < 1e-5
    assert torch.equal(s["masks"]["principal_curvature"], s["masks"]["depth_zbuffer"])
    e = s["targets"]["edge_texture"]
    assert abs(float(e[0, 0, 0]) - (min(2000 / 65535, 0.08) / 0.08 * 2 - 1)) < 1e-5
    assert (s["masks"]["edge_texture"] == 1).all()
    assert torch.equal(s["targets"]["autoencoder"], s["image"])
    # landscape 12x20 and portrait 24x16 files: every map resized to the square size
    for i, (h, w) in ((1, (12, 20)), (3, (16, 24))):
        s = train[i]
        assert fx.TK_POINTS[int(train.name(i).split("_")[1])] == (h, w)
        assert s["image"].shape == (3, 16, 16) and s["label"].shape == (16, 16)
        assert set(np.unique(s["label"].numpy())) == {0, 2, 16, 255} and (s["label"][:1] == 255).all()
        d, m = s["targets"]["depth_zbuffer"][0], s["masks"]["depth_zbuffer"][0]
        assert d.shape == (16, 16) and m[0, 0] == 0 and m[15, 15] == 1 and m[15, 0] == 1
        assert abs(float(d[15, 15]) - np.log1p(30000) / np.log(2 ** 16)) < 1e-5
        assert abs(float(d[15, 0]) - np.log1p(1000) / np.log(2 ** 16)) < 1e-5
        assert s["targets"]["principal_curvature"].shape == (2, 16, 16)


def test_taskonomy_resize_nearest_and_split(tmp_path):
    fx.make_taskonomy(str(tmp_path))
    cfg = cfg_for("taskonomy", str(tmp_path), "data.taskonomy.size=8", "data.taskonomy.split_point=3",
                  "data.tasks=[segmentsemantic,depth_zbuffer]")
    train = build_dataset(cfg, "train")
    assert len(train) == 1 and train.name(0) == "point_1_view_0_domain_rgb"
    s = train[0]
    assert s["image"].shape == (3, 8, 8) and set(np.unique(s["label"].numpy())) == {0, 2, 16, 255}
    m = s["masks"]["depth_zbuffer"][0]
    assert (m[:2, :2] == 0).all() and m.sum() == 64 - 4      # 2x2 blocks: fully invalid or fully valid


# ---------------------------------------------------------------- synthetic multitask targets
def test_synthetic_renders_unchanged_with_depth_maps(tiny_cfg):
    """Images and labels are bit for bit those rendered before depth maps existed (the README's demo numbers
    depend on them: sha256 of renders taken then); the depth map of the same render is read back in metres:
    the ground 4 m at the bottom row, 16 m at the top, every shape flat, in front of the ground."""
    import hashlib
    from datasets.synthetic import render
    h = hashlib.sha256()
    for split in (0, 1):
        for i in range(6):
            img, lbl = render(np.random.default_rng([0, split, i]), 41)
            h.update(img.tobytes())
            h.update(lbl.tobytes())
    img, lbl, depth = render(np.random.default_rng([0, 0, 7]), 97, depth=True)
    h.update(img.tobytes())
    h.update(lbl.tobytes())
    assert h.hexdigest() == "9d593fa7c950c5f5337730e4c13fdb01ab5b698967451609c73c10d7dc68665b"
    cfg = tiny_cfg("data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]", "data.transform=none")
    ds = build_dataset(cfg, "train")
    s = ds[1]
    img, lbl, depth = render(np.random.default_rng([0, 0, 1]), 41, depth=True)
    assert torch.equal(s["label"], torch.from_numpy(lbl).long())
    d = s["targets"]["depth_zbuffer"][0].numpy()
    assert np.abs(d - depth).max() <= 0.0005 and (s["masks"]["depth_zbuffer"] == 1).all()
    assert torch.equal(s["targets"]["autoencoder"], s["image"]) and list(s["targets"]) == list(ds.tasks)
    ground = lbl == 0
    assert np.allclose(d[40][ground[40]], 4.0) and np.allclose(d[0][ground[0]], 16.0)
    shapes = (lbl > 0) & (lbl < 255)
    assert 1 <= len(np.unique(depth[shapes])) <= 3 and (depth[shapes] < 15).all()   # 1-3 flat shapes
    rows = np.nonzero(shapes.any(1))[0]
    assert (depth[shapes].max() < 16 - 12 * rows.min() / 40)   # in front of the ground behind their top row


def test_synthetic_without_depth_maps_is_one_line_error(tmp_path):
    """A synthetic dataset written before depth maps existed: segmentation and reconstruction still load;
    asking for depth is a one-line error saying what to do."""
    import shutil
    root = tmp_path / "syn"
    over = [f"data.root={root}", "data.synthetic.num_train=2", "data.synthetic.num_val=1", "data.synthetic.size=17",
            "data.transform=none"]
    build_dataset(load_config(DEFAULT, over), "train")
    shutil.rmtree(root / "Depth")
    ds = build_dataset(load_config(DEFAULT, [*over, "data.tasks=[segmentsemantic,autoencoder]"]), "train")
    assert ds[0]["targets"]["autoencoder"].shape == (3, 17, 17)
    with pytest.raises(SetupError) as e:
        build_dataset(load_config(DEFAULT, [*over, "data.tasks=[segmentsemantic,depth_zbuffer]"]), "train")
    one_line(e, str(root), "without depth maps", "delete it")


# ---------------------------------------------------------------- transforms
def test_pirat_transform_pads_label_with_ignore():
    cfg = load_config(DEFAULT, ["data.base_size=10", "data.crop_size=[30,30]", "data.scale_range=[1.0,1.0]"])
    t = pirat_train(cfg.data)
    img = np.full((10, 20, 3), 0.5, np.float32)
    lbl = np.tile(np.arange(20) % 5, (10, 1)).astype(np.int64)
    out_i, out_l = t(img, lbl, np.random.default_rng(0))
    assert out_i.shape == (30, 30, 3) and out_l.shape == (30, 30)
    assert (out_l[10:] == 255).all() and (out_i[10:] == 0).all()   # short side 10: rows 10.. are padding
    assert (out_l[:, 20:] == 255).all() and set(np.unique(out_l[:10, :20])) == set(range(5))
    a = t(img, lbl, np.random.default_rng(3))
    b = t(img, lbl, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    cfg = load_config(DEFAULT, ["data.transform=pirat", "data.base_size=16", "data.crop_size=[9,9]"])
    tt = build_train_transform(cfg.data)
    for seed in range(5):
        oi, ol = tt(np.random.rand(16, 16, 3).astype(np.float32), lbl[:, :16].repeat(2, 0)[:16], np.random.default_rng(seed))
        assert oi.shape == (9, 9, 3) and set(np.unique(ol)) <= set(range(5)) | {255}


def test_eval_transforms():
    lbl = np.tile(np.arange(40), (20, 1)).astype(np.int64)
    img = np.random.rand(20, 40, 3).astype(np.float32)
    i, l = semseg_eval(img, lbl, 10)                   # image long side 40 -> 10; label kept for scoring
    assert i.shape == (5, 10, 3) and l is lbl
    i, l = sea_eval(img, lbl, (10, 10))                # short side 20 -> 10: 10x20, centre columns 5..14
    assert i.shape == (10, 10, 3) and (l[0] == lbl[0, 10:30:2]).all()


def test_palettes_and_names():
    assert class_names("cityscapes", 19)[13] == "car" and class_names("voc2012", 21)[15] == "person"
    assert class_names("ade20k", 150)[0] == "wall" and class_names("ade20k", 151)[0] == "other"
    assert class_names("taskonomy", 17)[2] == "chair"
    assert tuple(palette("cityscapes")[0]) == (128, 64, 128) and tuple(palette("voc2012")[1]) == (128, 0, 0)
    assert len({tuple(c) for c in palette("ade20k", 150)[:150]}) == 150
    assert tuple(palette("ade20k", 151)[1]) == tuple(palette("ade20k", 150)[0])


# ---------------------------------------------------------------- bad input
def test_missing_split_folder(tmp_path):
    fx.make_cityscapes(str(tmp_path))
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("cityscapes", str(tmp_path)), "test")
    one_line(e, os.path.join("leftImg8bit", "test"), "not found")


def test_empty_list(tmp_path):
    fx.make_voc(str(tmp_path))
    (tmp_path / "list" / "val.txt").write_text("\n")
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("voc2012", str(tmp_path)), "val")
    one_line(e, "val.txt", "empty")


def test_image_without_label(tmp_path):
    fx.make_ade20k(str(tmp_path))
    os.remove(tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png")
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("ade20k", str(tmp_path)), "train")
    one_line(e, "ADE_train_00000002.jpg", "no label")
    fx.make_taskonomy(str(tmp_path / "tk"))
    os.remove(tmp_path / "tk" / "segment_semantic" / "point_5_view_0_domain_segment_semantic.png")
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("taskonomy", str(tmp_path / "tk")), "train")
    one_line(e, "point_5_view_0_domain_rgb.png", "segmentsemantic")


def test_label_value_out_of_range(tmp_path):
    fx.make_voc(str(tmp_path))
    bad = fx.voc_label("val", 0)
    bad[0, 0] = 30
    fx.write_gray(str(tmp_path / "SegmentationClassAug" / "2008_000001.png"), bad)
    ds = build_dataset(cfg_for("voc2012", str(tmp_path)), "val")
    with pytest.raises(SetupError) as e:
        ds[0]
    one_line(e, "2008_000001.png", "[30]")
    fx.make_cityscapes(str(tmp_path / "cs"), train_ids=True)
    p = str(tmp_path / "cs" / "gtFine" / "val" / f"{fx.CS_NAMES['val'][0]}_gtFine_labelTrainIds.png")
    fx.write_gray(p, np.full((fx.H, fx.W), 19, np.uint8))
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("cityscapes", str(tmp_path / "cs"), "data.tasks=[segmentsemantic]",
                                   "data.eval_transform=none"), "val")[0]
    one_line(e, os.path.basename(p), "[19]")


def test_unreadable_image(tmp_path):
    fx.make_voc(str(tmp_path))
    (tmp_path / "JPEGImages" / "2008_000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SetupError) as e:   # caught when the dataset is built, from the file header
        build_dataset(cfg_for("voc2012", str(tmp_path)), "val")
    one_line(e, "2008_000001.jpg", "not a readable image")
    fx.make_taskonomy(str(tmp_path / "tk"))
    (tmp_path / "tk" / "depth_zbuffer" / "point_1_view_0_domain_depth_zbuffer.png").write_bytes(b"xx")
    ds = build_dataset(cfg_for("taskonomy", str(tmp_path / "tk"), "data.tasks=[depth_zbuffer]"), "train")
    with pytest.raises(SetupError) as e:
        ds[0]
    one_line(e, "point_1_view_0_domain_depth_zbuffer.png", "not a readable image")


def test_truncated_images_and_labels_are_errors(tmp_path):
    import cv2
    fx.make_voc(str(tmp_path))
    jpg = tmp_path / "JPEGImages" / "2008_000001.jpg"
    Image.fromarray(fx.rgb(1)).save(jpg, quality=95)  # noise: a long scan to cut into
    data = jpg.read_bytes()
    jpg.write_bytes(data[:(data.rfind(b"\xff\xda") + len(data)) // 2])
    assert cv2.imread(str(jpg)).shape == (fx.H, fx.W, 3)  # what cv2 makes of it: half an image, no error
    ds = build_dataset(cfg_for("voc2012", str(tmp_path)), "val")   # the header is intact
    with pytest.raises(SetupError) as e:
        ds[0]
    one_line(e, "cannot read image", "2008_000001.jpg: the file is truncated")
    fx.make_voc(str(tmp_path / "v2"))
    lbl = tmp_path / "v2" / "SegmentationClassAug" / "2008_000001.png"
    lbl.write_bytes(lbl.read_bytes()[:-30])
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("voc2012", str(tmp_path / "v2")), "val")[0]
    one_line(e, "cannot read label", "2008_000001.png: image file is truncated")
    fx.make_taskonomy(str(tmp_path / "tk"))
    png = tmp_path / "tk" / "depth_zbuffer" / "point_1_view_0_domain_depth_zbuffer.png"
    png.write_bytes(png.read_bytes()[:-12])  # only the IEND chunk missing
    ds = build_dataset(cfg_for("taskonomy", str(tmp_path / "tk"), "data.tasks=[depth_zbuffer]"), "train")
    with pytest.raises(SetupError) as e:
        ds[0]
    one_line(e, "point_1_view_0_domain_depth_zbuffer.png: the file is truncated")


def test_strict_decoding_gives_the_pixels_of_cv2_imread(tiny_cfg):
    import cv2
    from datasets.list_dataset import decode_image, read_image
    ds = build_dataset(tiny_cfg(), "val")
    for img_path, lbl_path in ds.items:
        for path, flags in ((img_path, cv2.IMREAD_COLOR), (lbl_path, cv2.IMREAD_UNCHANGED)):
            a, b = decode_image(path, flags), cv2.imread(path, flags)
            assert a.dtype == b.dtype and np.array_equal(a, b), path
        ref = cv2.cvtColor(cv2.imread(img_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        assert np.array_equal(read_image(img_path), ref)
    d16 = fx.tk_depth()
    path = os.path.join(os.path.dirname(ds.items[0][1]), "..", "d16.png")
    fx.write_gray(path, d16)  # 16-bit PNG through the taskonomy reader's flags
    try:
        assert np.array_equal(decode_image(path, cv2.IMREAD_UNCHANGED), d16)
    finally:
        os.remove(path)


def test_unknown_task(tmp_path):
    fx.make_cityscapes(str(tmp_path))
    with pytest.raises(SetupError) as e:
        build_dataset(cfg_for("cityscapes", str(tmp_path), "data.tasks=[normal]"), "val")
    one_line(e, "data.tasks", "normal")


# ---------------------------------------------------------------- experiment configs
FIXTURES = fx.MAKERS
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "config", "*", "*_none.yaml"))
                 if "synthetic" not in p)  # the synthetic configs run end to end in test_training / test_launchers


def test_every_dataset_has_a_config():
    assert {os.path.basename(os.path.dirname(p)) for p in CONFIGS} >= set(FIXTURES)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_experiment_config_builds_dataset_and_trains(path, tmp_path):
    name = os.path.basename(os.path.dirname(path))
    FIXTURES[name](str(tmp_path))
    small = ["data.crop_size=[33,33]", "data.base_size=32", "data.eval_crop=[32,32]", "data.taskonomy.size=16",
             *fx.MAKER_OVERRIDES.get(name, [])]
    cfg = load_config(path, [f"data.root={tmp_path}", *small])
    assert cfg.data.name == name
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    batch = torch.utils.data.default_collate([train[i] for i in range(len(train))])
    assert batch["image"].shape[1] == 3 and batch["label"].dtype == torch.long
    lbl = batch["label"]
    assert ((lbl >= 0) & (lbl < cfg.data.classes) | (lbl == 255)).all()
    for k in range(len(val)):
        img, lbl = val[k]["image"], val[k]["label"]
        if cfg.data.eval_transform == "semseg":  # image long side to base_size, label kept for scoring
            assert max(img.shape[-2:]) == 32 and lbl.shape == fx.SHAPES[k]
        else:
            assert img.shape[-2:] == lbl.shape
    train.set_epoch(1)

    # one real training iteration (defense loss, backward, optimiser step) through the trainer
    from engine.trainer import Trainer
    cfg = load_config(path, [f"data.root={tmp_path}", *small, f"exp_dir={tmp_path / 'exp'}", "data.workers=0",
                             "train.epochs=1", f"train.batch_size={len(train)}", "train.val_batch_size=2",
                             *fx.TINY_MODELS[cfg.model.name], "train.print_freq=1"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.iteration == 1
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert os.path.isfile(tmp_path / "exp" / "model" / "last.pth")
    assert 0 <= trainer.validate()["aAcc"] <= 1  # validation runs on every dataset (multitask outputs too)
