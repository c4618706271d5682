"""Shared fixtures: a tiny synthetic experiment that trains in seconds on a CPU."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from utils.config import load_config  # noqa: E402

TINY = """
exp_dir: {exp}
data:
  name: synthetic
  root: {data}
  workers: 0
  crop_size: [33, 33]
  scale_range: [0.75, 1.25]
  synthetic: {{num_train: 16, num_val: 6, size: 41, seed: 0}}
model: {{name: pspnet, layers: 18, width: 0.25}}
train: {{epochs: 2, batch_size: 4, val_batch_size: 3, print_freq: 2, lr: 0.01}}
test:
  batch_size: 3
  eps: [8.0]
  attacks: [{{name: pgd, steps: 2, alpha: 4.0}}]
"""


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """One tiny synthetic dataset on disk shared by the session (written on first use)."""
    return str(tmp_path_factory.mktemp("data") / "synthetic")


@pytest.fixture
def tiny_config(tmp_path, synthetic_root):
    """Factory: the path of a tiny experiment config in tmp_path (extra YAML appended)."""
    def make(extra: str = "", name: str = "tiny.yaml", exp: str = "exp") -> str:
        path = tmp_path / name
        path.write_text(TINY.format(exp=tmp_path / exp, data=synthetic_root) + extra)
        return str(path)
    return make


@pytest.fixture
def tiny_cfg(tiny_config):
    def make(*overrides: str):
        return load_config(tiny_config(), overrides)
    return make
