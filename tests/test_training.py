"""Training end to end on the tiny synthetic set: determinism, resume, checkpoints, tensorboard."""
import glob
import os
import shutil

import pytest
import torch

from engine.cli import main
from engine.trainer import PolyWithWarmup, StepWithWarmup, Trainer
from utils.checkpoint import REQUIRED, load_checkpoint
from utils.config import load_config
from utils.errors import SetupError


def train(path, *overrides):
    assert main("train", lambda cfg: Trainer(cfg).fit(), ["--config", path, *overrides]) == 0


def scalars(exp_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(exp_dir, "events"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def weights(path):
    return load_checkpoint(path)["model"]


def test_same_seed_same_curve_and_event_tags(tiny_config, tmp_path):
    path = tiny_config()
    train(path, f"exp_dir={tmp_path / 'a'}")
    train(path, f"exp_dir={tmp_path / 'b'}")
    a, b = scalars(tmp_path / "a"), scalars(tmp_path / "b")
    for tag in ("train/loss", "train/loss_main", "train/loss_aux", "train/lr", "train_epoch/loss",
                "val/mIoU", "val/mAcc", "val/aAcc"):
        assert tag in a, tag
    assert len(a["train/loss"]) == 4          # 16 images / batch 4 = 4 iterations per epoch, 2 epochs, print every 2
    assert a["train/loss"] == b["train/loss"]  # same seed, same curve
    assert len(a["val/mIoU"]) == 2
    train(path, f"exp_dir={tmp_path / 'c'}", "seed=1")
    assert scalars(tmp_path / "c")["train/loss"] != a["train/loss"]  # the seed matters


def test_resume_gives_same_weights_and_checkpoint_contents(tiny_config, tmp_path):
    path = tiny_config()
    full = tmp_path / "full"
    train(path, f"exp_dir={full}")
    ckpt = load_checkpoint(str(full / "model" / "last.pth"))
    assert set(REQUIRED) <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 8
    assert ckpt["scheduler"]["last_epoch"] == 8
    assert ckpt["config"]["train"]["epochs"] == 2 and ckpt["config"]["exp_dir"] == str(full)
    assert len(ckpt["optimizer"]["state"]) > 0 and "momentum_buffer" in next(iter(ckpt["optimizer"]["state"].values()))
    assert sorted(os.path.basename(p) for p in glob.glob(str(full / "model" / "*.pth"))) == \
        ["epoch_1.pth", "epoch_2.pth", "last.pth"]
    assert os.path.isfile(full / "config.yaml")
    assert len(glob.glob(str(full / "train-*.log"))) == 1
    # interrupted after epoch 1: its checkpoint as last.pth, then resume=auto finishes the run
    part = tmp_path / "part"
    os.makedirs(part / "model")
    shutil.copy(full / "model" / "epoch_1.pth", part / "model" / "last.pth")
    train(path, f"exp_dir={part}", "train.resume=auto")
    a, b = weights(str(full / "model" / "last.pth")), weights(str(part / "model" / "last.pth"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(str(part / "model" / "last.pth"))["iteration"] == 8  # continued, not restarted


def test_one_run_per_exp_dir_and_overwrite_replaces_it_at_its_first_checkpoint(tiny_config, tmp_path):
    path, exp = tiny_config(), tmp_path / "exp"
    Trainer(load_config(path, [f"exp_dir={exp}"]))
    assert not exp.exists()  # building a run writes nothing: config.yaml and events come with the first checkpoint
    train(path, f"exp_dir={exp}", "train.eval_freq=0")
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "epoch_2.pth", "last.pth"]
    with pytest.raises(SetupError, match="already holds checkpoints .*train.resume=auto.*train.overwrite=true"):
        Trainer(load_config(path, [f"exp_dir={exp}"]))
    train(path, f"exp_dir={exp}", "train.eval_freq=0", "train.overwrite=true", "train.epochs=1")
    # the earlier run's epoch_2.pth is gone instead of sitting next to the new run's files
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "last.pth"]
    assert load_checkpoint(str(exp / "model" / "last.pth"))["config"]["train"]["epochs"] == 1
    assert load_config(str(exp / "config.yaml")).train.epochs == 1


def test_poly_schedule_values():
    f = PolyWithWarmup(max_iters=10, power=0.9)
    assert f(0) == pytest.approx((1 - 1 / 10) ** 0.9)   # iteration 1 uses (1 - 1/max)^0.9, as semseg
    assert f(9) == 0.0
    w = PolyWithWarmup(max_iters=10, power=1.0, warmup=2, ratio=0.0)
    assert [w(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1 - 1 / 8, 1 - 2 / 8])


def test_step_schedule_values():
    """MTRobust's step schedules (mtl_fpd.md §A2.4): x gamma after each milestone epoch, stepped per iteration."""
    f = StepWithWarmup(iters_per_epoch=3, milestones=[2, 4], gamma=0.1)
    assert [f(s) for s in range(15)] == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01] * 3)
    w = StepWithWarmup(iters_per_epoch=2, milestones=[1], gamma=0.5, warmup=2, ratio=0.0)
    assert [w(s) for s in range(4)] == pytest.approx([0.5, 1.0, 0.5, 0.5])


def test_outputs_and_training_targets_must_match(tmp_path):
    from tests import data_fixtures as fx
    from utils.config import load_config
    from utils.errors import SetupError
    fx.make_cityscapes(str(tmp_path / "cs"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(root, "config", "cityscapes", "cityscapes_drn_multitask_none.yaml")
    common = [f"data.root={tmp_path / 'cs'}", f"exp_dir={tmp_path / 'exp'}", "data.workers=0", "data.crop_size=[17,17]",
              "train.batch_size=2"]
    with pytest.raises(SetupError, match=r"model.tasks \['segmentsemantic', 'depth_zbuffer', 'autoencoder'\] and "
                                         r"data.tasks \['segmentsemantic', 'depth_zbuffer'\] must list the same"):
        Trainer(load_config(cfg, [*common, "data.tasks=[segmentsemantic,depth_zbuffer]"]))
    single = os.path.join(root, "config", "cityscapes", "cityscapes_drn_none.yaml")
    with pytest.raises(SetupError, match="has a single segmentation output"):
        Trainer(load_config(single, [*common, "data.tasks=[segmentsemantic,depth_zbuffer]"]))
    assert not os.path.exists(tmp_path / "exp" / "model")
