"""Bad input through the real entry points: one `error:` line, non-zero exit, no traceback, and
nothing already in exp_dir is overwritten (a new timestamped log is all a failing run may add)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import data_fixtures as fx
from tests.conftest import ROOT


def run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def previous_run(tmp_path):
    """An exp_dir holding results of an earlier run; returns (path, snapshot of its files)."""
    exp = tmp_path / "exp"
    os.makedirs(exp / "model")
    (exp / "config.yaml").write_text("earlier: run\n")
    (exp / "model" / "last.pth").write_bytes(b"earlier checkpoint")
    snap = {p: open(os.path.join(d, p), "rb").read() for d, _, fs in os.walk(exp) for p in fs}
    return exp, snap


def assert_clean_failure(r, exp, snap, *words):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    now = {p: open(os.path.join(d, p), "rb").read() for d, _, fs in os.walk(exp) for p in fs}
    assert {p: now.get(p) for p in snap} == snap                         # nothing overwritten
    assert all(p.startswith("train-") and p.endswith(".log") for p in set(now) - set(snap))  # only a new log


def test_fresh_run_into_an_exp_dir_with_checkpoints(previous_run, tiny_config):
    exp, snap = previous_run
    assert_clean_failure(run("--config", tiny_config(), f"exp_dir={exp}"), exp, snap,
                         "already holds checkpoints", "train.resume=auto", "train.overwrite=true")


def test_missing_config_and_unknown_key(tmp_path, previous_run, tiny_config):
    exp, snap = previous_run
    assert_clean_failure(run("--config", str(tmp_path / "nope.yaml"), f"exp_dir={exp}"), exp, snap,
                         "config file not found", "nope.yaml")
    assert_clean_failure(run("--config", tiny_config(), f"exp_dir={exp}", "train.lrr=0.1"), exp, snap,
                         "unknown config key 'train.lrr'", "closest valid key: 'train.lr'")


def test_missing_data_root_and_list_file(tmp_path, previous_run):
    exp, snap = previous_run
    cfg = os.path.join(ROOT, "config", "voc2012", "voc2012_pspnet_none.yaml")
    common = [f"exp_dir={exp}", "model.pretrained=null", "data.workers=0", "train.overwrite=true"]
    assert_clean_failure(run("--config", cfg, f"data.root={tmp_path / 'no_such_root'}", *common), exp, snap,
                         "no_such_root")
    voc = tmp_path / "voc"
    fx.make_voc(str(voc))
    assert_clean_failure(run("--config", cfg, f"data.root={voc}", "data.train_list=list/missing.txt", *common),
                         exp, snap, "missing.txt")


def test_label_of_another_size_than_its_image(tmp_path, previous_run, tiny_config, synthetic_root):
    from utils.config import load_config
    from datasets import build_dataset
    exp, snap = previous_run
    build_dataset(load_config(tiny_config()), "val")          # make sure the shared dataset exists
    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    label = root / "SegmentationClass" / "train_0003.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(label)
    r = run("--config", tiny_config(), f"exp_dir={exp}", f"data.root={root}", "train.overwrite=true")
    assert_clean_failure(r, exp, snap, "train_0003.png", "12x10", "41x41")
