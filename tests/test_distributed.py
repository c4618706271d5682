"""Two CPU (gloo) processes under torchrun against one process: same weights, same metrics.

Training: the model is made batch-independent with ``train.freeze_bn=true`` (BatchNorm in eval mode, running
statistics fixed) and ``model.dropout=0``: then 2 processes with per-process batch B must end with the
weights of 1 process that runs the same two micro-batches of B separately through forward/backward and
averages their gradients (DistributedDataParallel averages over processes). Evaluation: the trained
fixture model gives the same clean and attacked per-image counts with 1 and 2 processes."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import default_collate

import rounding

from engine.cli import main
from engine.evaluator import run_test
from engine.trainer import Trainer
from utils.checkpoint import load_checkpoint
from utils.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ("device=cpu", "train.freeze_bn=true", "model.dropout=0.0", "train.epochs=1", "train.batch_size=4",
          "train.val_batch_size=2", "train.lr=0.05")


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_two_gloo_processes_match_one_process_accumulating(tiny_config, tmp_path):
    path = tiny_config()
    exp = tmp_path / "ddp"
    cfg = load_config(path, [*COMMON, f"exp_dir={tmp_path / 'ref'}"])
    ref = Trainer(cfg)  # also writes the synthetic data before the two processes read it
    r = torchrun(2, "train.py", "--config", path, *COMMON, f"exp_dir={exp}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "val mIoU" in r.stdout  # validation ran sharded over both

    # reference: rank r's i-th batch is perm[r::2][2i:2i+2] (DistributedSampler order for epoch 0)
    g = torch.Generator()
    g.manual_seed(cfg.seed)
    perm = torch.randperm(len(ref.train_set), generator=g).tolist()
    ref.train_set.set_epoch(0)
    model = ref.model
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    for i in range(ref.iters_per_epoch):
        ref.optimizer.zero_grad(set_to_none=True)
        for rank in range(2):
            batch = default_collate([ref.train_set[j] for j in perm[rank::2][2 * i:2 * i + 2]])
            loss, _ = ref.defense.loss(model, batch)
            (loss / 2).backward()
        ref.optimizer.step()
        ref.scheduler.step()
    ddp = load_checkpoint(str(exp / "model" / "last.pth"))
    assert ddp["iteration"] == ref.iters_per_epoch == 4
    own = model.state_dict()
    for k, v in ddp["model"].items():
        assert torch.allclose(v.float(), own[k].float(), atol=1e-5, rtol=0), k
    moved = max(float((own[k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-3  # training did move the weights (the comparison is not trivially true)



def test_two_processes_evaluate_like_one(trained_model, tmp_path):
    """Clean and random-start PGD results of 2 gloo processes (each its shard of the images, in batches
    of 2) agree with those of 1 process in batches of 4 up to rounding (docs/reproducibility.md), every
    image counted once."""
    from engine.eval_resume import saved_counts
    common = [f"test.checkpoint={trained_model.checkpoint}", "device=cpu"]
    r = torchrun(2, "test.py", "--config", trained_model.config, *common, f"exp_dir={tmp_path / 'two'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert main("test", run_test, ["--config", trained_model.config, *common, f"exp_dir={tmp_path / 'one'}"]) == 0
    a, b = (json.loads((tmp_path / d / "result" / "metrics.json").read_text()) for d in ("two", "one"))
    assert a["num_images"] == b["num_images"] == 16
    assert b["attacks"]["pgd@8"]["mIoU"] < b["clean"]["mIoU"] - 0.1  # the attack changes the result
    assert a["attacks"]["pgd@8"]["forward_passes"] == b["attacks"]["pgd@8"]["forward_passes"] == 16 * 3
    ca, cb = (saved_counts(glob.glob(str(tmp_path / d / "result" / "per_image" / "*.all.npz"))[0]) for d in ("two", "one"))
    assert ca["clean"]["index"].tolist() == list(range(16))
    rounding.assert_agree_up_to_rounding(ca, cb, a, b)


def test_batch_not_divisible_by_world_size_is_one_line_error(tiny_config, tmp_path):
    r = torchrun(3, "train.py", "--config", tiny_config(), "device=cpu", f"exp_dir={tmp_path / 'x'}")
    assert r.returncode != 0
    errors = sorted(set(ln for ln in r.stderr.splitlines() if ln.startswith("error:")))
    # every rank reports the same line (under heavy load torchrun may add its own lines after it)
    assert "error: train.batch_size=4 is not divisible by the number of processes (3)" in errors
    assert not (tmp_path / "x" / "model").exists()


def test_several_processes_without_gpu_need_device_cpu(monkeypatch):
    from utils import dist
    from utils.errors import SetupError
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SetupError, match="set device=cpu"):
        dist.select_device("auto")
    assert dist.select_device("cpu").type == "cpu"


def test_legacy_local_rank_argument_is_accepted(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"})
    seen = {}
    assert main("train", lambda cfg: seen.update(rank=os.environ.get("LOCAL_RANK")),
                ["--local-rank=0", "--config", tiny_config(), f"exp_dir={tmp_path / 'x'}"]) == 0
    assert seen["rank"] == "0"
