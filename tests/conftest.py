"""Shared fixtures: a tiny synthetic experiment that trains in seconds on a CPU, and a small trained
model whose clean and attacked results differ."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

# The suite tests the CPU build's behaviour, bit-for-bit comparisons included (cuDNN kernels are not
# deterministic), and the launchers' CPU paths; a visible GPU would move `device: auto` runs onto it.
# Hidden before torch initialises CUDA, for this process and every launcher it starts.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# at most 2 intra-op threads; OMP_NUM_THREADS=1 when other jobs share the cores (oversubscribed OpenMP
# threads spin and can make a step 20x slower)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))

from utils.config import load_config  # noqa: E402
from utils.perf import keep_cpu_memory  # noqa: E402

keep_cpu_memory()  # as every CPU run of train.py / test.py does (engine.common.setup_runtime)

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
  plots: false              # (drawn in test_evaluation / test_plots; matplotlib costs ~1 s a run)
  attacks: [{{name: pgd, steps: 2, alpha: 4.0}}]
"""


@pytest.fixture
def one_thread():
    """One intra-op thread here and in the subprocesses: bit-exact comparisons need the same float
    reduction order, and a single thread does not stall when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# A model that is right often enough for an attack to visibly change its result. Trained once per
# session without augmentation on 16 images and evaluated on those same images (val_list is the
# training list): memorising a small set is what gets it accurate within ~120 iterations on a CPU;
# the tests need an accurate model, not one that generalises.
FIXTURE_MODEL = """
exp_dir: {exp}
seed: 0
data:
  name: synthetic
  root: {data}
  workers: 0
  transform: none
  val_list: list/train.txt
  test_list: list/train.txt
  synthetic: {{num_train: 16, num_val: 4, size: 41, seed: 0}}
model: {{name: pspnet, layers: 18, width: 0.25}}
train: {{epochs: 60, batch_size: 8, val_batch_size: 8, lr: 0.1, head_lr_mult: 1.0, eval_freq: 60, save_freq: 60,
        print_freq: 1000}}
test:
  batch_size: 4
  eps: [8.0]
  save_images: false
  examples: 0
  plots: false
  attacks: [{{name: pgd, steps: 3, alpha: 4.0}}]
"""


@dataclass
class TrainedModel:
    config: str        # its experiment config (test.attacks: random-start PGD-3 at 8/255)
    checkpoint: str
    metrics: dict      # metrics.json of its evaluation with that config


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    """The session's trained fixture model; fails loudly if it is not accurate enough for the tests
    that compare attacked results (clean mIoU > 0.6, PGD at least 0.1 below)."""
    from engine.cli import main
    from engine.evaluator import run_test
    from engine.trainer import Trainer
    tmp = tmp_path_factory.mktemp("fixture_model")
    path = tmp / "fixture.yaml"
    path.write_text(FIXTURE_MODEL.format(exp=tmp / "exp", data=tmp / "synthetic"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine (and no thread oversubscription)
    assert main("train", lambda cfg: Trainer(cfg).fit(), ["--config", str(path)]) == 0
    metrics = run_test(load_config(str(path)))
    torch.set_num_threads(n)
    clean, pgd = metrics["clean"]["mIoU"], metrics["attacks"]["pgd@8"]["mIoU"]
    assert clean > 0.6 and pgd < clean - 0.1, (clean, pgd)
    return TrainedModel(str(path), str(tmp / "exp" / "model" / "last.pth"), metrics)


# ---------------------------------------------------------------- launcher pairs in the background
@pytest.fixture(scope="session")
def launches(tmp_path_factory):
    """The pool that runs every experiment's launcher pair (tests/test_launchers.py)."""
    from test_launchers import Launches
    pool = Launches(tmp_path_factory.mktemp("launch"))
    yield pool
    pool.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def launches_from_the_start(request):
    """When the launcher pair tests are selected, their launches start with the session, so they run
    (one process each, two at a time) while the other tests do, instead of after them."""
    configs = [item.callspec.params["config"] for item in request.session.items
               if getattr(item, "originalname", "") == "test_launcher_pair_end_to_end"]
    if configs:
        request.getfixturevalue("launches").start(configs)
    yield
