"""Config loading: inheritance, overrides, validation errors, resolved output."""
import os

import pytest
import yaml

from utils.config import load_config, parse_overrides, save_config
from utils.errors import SetupError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    os.makedirs(tmp_path / "_base_")
    write(tmp_path / "_base_" / "a.yaml", "data: {classes: 19, crop_size: [9, 9]}\ntrain: {lr: 0.5}\n")
    write(tmp_path / "_base_" / "b.yaml", "_base_: a.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(write(tmp_path / "exp.yaml", "_base_: [_base_/b.yaml]\ntrain: {lr: 0.25}\n"),
                      ["train.epochs=7", "test.eps=[4, 8]", "model.mean=null"])
    assert cfg.data.classes == 19 and cfg.data.crop_size == [9, 9]   # from a.yaml through b.yaml
    assert cfg.train.lr == 0.25                                      # the file beats its base
    assert cfg.train.epochs == 7 and cfg.test.eps == [4, 8]          # the command line beats the file
    assert cfg.model.mean is None
    assert cfg.train.momentum == 0.9                                 # untouched default


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path / "e.yaml", "train: {lrr: 0.1}\n")
    with pytest.raises(SetupError, match=r"unknown config key 'train.lrr'; closest valid key: 'train.lr'"):
        load_config(path)
    with pytest.raises(SetupError, match=r"'trian'.*closest valid key: 'train'"):
        load_config(write(tmp_path / "f.yaml", ""), ["trian.lr=1"])


def test_wrong_type(tmp_path):
    path = write(tmp_path / "e.yaml", "")
    with pytest.raises(SetupError, match=r"'train.epochs' must be int"):
        load_config(path, ["train.epochs=2.5"])
    with pytest.raises(SetupError, match=r"'data.crop_size' must be list"):
        load_config(path, ["data.crop_size=65"])
    assert load_config(path, ["train.lr=1"]).train.lr == 1   # an int where a float is expected is fine


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(SetupError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(SetupError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_saved_config_reads_back(tmp_path):
    cfg = load_config(write(tmp_path / "e.yaml", "test: {attacks: [pgd, {name: pgd, steps: 3}]}\n"))
    save_config(cfg, str(tmp_path / "out" / "config.yaml"))
    back = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert back == cfg.to_dict()
    assert back["test"]["attacks"][1] == {"name": "pgd", "steps": 3}
    assert load_config(str(tmp_path / "out" / "config.yaml")).to_dict() == back  # resolved config is loadable


def test_every_shipped_config_loads():
    root = os.path.join(os.path.dirname(__file__), "..", "config")
    found = 0
    for d, _, files in os.walk(root):
        if "_base_" in d:
            continue
        for f in files:
            if f.endswith(".yaml"):
                load_config(os.path.join(d, f))
                found += 1
    assert found >= 1
