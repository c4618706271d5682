"""Your own labelled images: the `folder` dataset (datasets/folder.py), its label map and config rules.
(The generic experiment config/folder/folder_pspnet_none.yaml runs end to end in tests/test_launchers.py.)"""
from __future__ import annotations

import os

import numpy as np
import pytest

from datasets import build_dataset
from tests import data_fixtures as fx
from tests.conftest import ROOT
from utils.config import load_config
from utils.errors import SetupError


def test_folder_dataset_matches_stems_and_maps_labels(tmp_path):
    images = fx.make_folder(str(tmp_path))
    cfg = load_config(os.path.join(ROOT, "config", "folder", "folder_pspnet_none.yaml"),
                      [f"data.root={tmp_path}", *fx.FOLDER_OVERRIDES])
    for split in ("train", "val"):
        ds = build_dataset(cfg, split) if split == "val" else build_dataset(load_config(
            cfg.path, [f"data.root={tmp_path}", *fx.FOLDER_OVERRIDES, "data.transform=none"]), split)
        order = sorted(fx.FOLDER_NAMES[split])                  # by the path below the split folder
        assert [ds.name(i) for i in range(len(ds))] == [os.path.basename(n) for n in order]
        for i, name in enumerate(order):
            s, k = ds[i], fx.FOLDER_NAMES[split].index(name)
            h, w = fx.SHAPES[k]
            raw = fx.folder_raw_label(k, h, w)
            want = np.vectorize(fx.FOLDER_LABEL_MAP.get)(raw)
            assert s["label"].shape == (h, w) and np.array_equal(s["label"].numpy(), want), (split, k)
            assert s["image"].shape == (3, h, w)
            if k % 2 == 0:                                    # PNG images: exact pixels
                assert np.array_equal((s["image"].permute(1, 2, 0).numpy() * 255).round(), images[(split, k)])
    # a list file of bare stems reads the same pairs
    (tmp_path / "val.txt").write_text("".join(f"val/{n}\n" for n in fx.FOLDER_NAMES["val"]))
    listed = build_dataset(load_config(cfg.path, [f"data.root={tmp_path}", *fx.FOLDER_OVERRIDES,
                                                  f"data.val_list={tmp_path / 'val.txt'}"]), "val")
    scanned = build_dataset(cfg, "val")
    assert sorted(listed.items) == sorted(scanned.items) and len(listed) == 4  # (in the list's order)
    # a raw value the label map does not list is an error naming the file and the value
    bad = load_config(cfg.path, [f"data.root={tmp_path}", *fx.FOLDER_OVERRIDES,
                                 "data.label_map={0: 255, 7: 0, 26: 1, 255: 255}"])
    with pytest.raises(SetupError, match=r"labels/val/city/f_1.png has values \[33\] that data.label_map does not"):
        build_dataset(bad, "val")[0]


def test_folder_config_rules():
    path = os.path.join(ROOT, "config", "folder", "folder_pspnet_none.yaml")
    with pytest.raises(SetupError, match=r"'data.class_names' needs one name per class \(data.classes = 3\), got 2"):
        load_config(path, ["data.classes=3", "data.class_names=[a, b]"])
    with pytest.raises(SetupError, match=r"'data.label_map' maps to \[3\], neither a class of 0..2"):
        load_config(path, ["data.classes=3", "data.label_map={7: 3}"])
    with pytest.raises(SetupError, match="'data.label_map' must be a mapping of raw label values"):
        load_config(path, ["data.label_map={road: 1}"])
