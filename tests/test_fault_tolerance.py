"""Runs that survive faults: SIGKILL mid-run and mid-checkpoint-write, unreadable last.pth, NaN loss,
killed evaluations, folders of checkpoints; plus the bf16 / channels_last switches on CPU."""
import glob
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.eval_resume import saved_counts
from engine.evaluator import run_test
from engine.trainer import Trainer
from tests import faults
from utils.checkpoint import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 images / batch 4 = 4 iterations per epoch, 2 epochs; an iteration checkpoint every 3 iterations
RUN = ("train.save_iter_freq=3", "train.print_freq=1")


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def train(path, *overrides) -> int:
    return main("train", lambda cfg: Trainer(cfg).fit(), ["--config", path, *overrides])


def train_subprocess(path, *overrides, **fault) -> subprocess.CompletedProcess:
    """train.py in a child process, under tests/faults.py with the keyword faults (kill_at_iter=3)."""
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *faults.runner(**fault), "train.py", "--config", path, *overrides],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def same_weights(a_path, b_path) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.fixture
def reference(tiny_config, tmp_path):
    """An uninterrupted run (in this process) and the config path."""
    path = tiny_config()
    assert train(path, f"exp_dir={tmp_path / 'full'}", *RUN) == 0
    return path, str(tmp_path / "full" / "model" / "last.pth")


def test_sigkill_mid_epoch_and_mid_save_then_resume_gives_same_weights(reference, tmp_path):
    path, full = reference
    exp = tmp_path / "killed"
    # 1) killed at the end of a random iteration that is not a checkpoint iteration (mid-epoch resume
    #    through the sampler skip), 2) killed inside the write of the next checkpoint
    kill_iter = random.Random(os.getpid()).choice([4, 5, 7])
    r = train_subprocess(path, f"exp_dir={exp}", *RUN, kill_at_iter=kill_iter)
    assert r.returncode == -9, r.stderr[-2000:]
    # checkpoints: iter_3, epoch_1 (after iteration 4, written once the epoch loop has ended), iter_6
    assert load_checkpoint(str(exp / "model" / "last.pth"))["iteration"] == {4: 3, 5: 4, 7: 6}[kill_iter]
    # resumed; its 2nd checkpoint write is killed part-way: last.pth must still be the previous, loadable one
    r = train_subprocess(path, f"exp_dir={exp}", *RUN, "train.resume=auto", kill_in_save=2)
    assert r.returncode == -9, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    tmps = glob.glob(str(exp / "model" / "*.tmp.*"))
    assert tmps and os.path.getsize(tmps[0]) >= 4096  # the write was indeed cut short mid-file
    with pytest.raises(Exception):
        torch.load(tmps[0], weights_only=True)
    before = load_checkpoint(str(exp / "model" / "last.pth"))["iteration"]
    assert 3 <= before < 8
    assert train(path, f"exp_dir={exp}", *RUN, "train.resume=auto") == 0
    assert not glob.glob(str(exp / "model" / "*.tmp.*"))  # leftovers cleaned on resume
    same_weights(full, str(exp / "model" / "last.pth"))
    # only the two newest iteration checkpoints are kept
    assert sorted(os.path.basename(p) for p in glob.glob(str(exp / "model" / "iter_*.pth"))) == \
        ["iter_3.pth", "iter_6.pth"]


def test_kill_during_save_keeps_previous_file(tmp_path):
    path = str(tmp_path / "m" / "last.pth")
    save_checkpoint({"a": torch.zeros(3)}, path)
    code = ("import sys, torch; sys.path.insert(0, %r); from tests import faults; faults.kill_in_save(1)\n"
            "from utils.checkpoint import save_checkpoint\n"
            "save_checkpoint({'a': torch.ones(100000)}, %r)" % (ROOT, path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -9
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))


def test_unreadable_last_falls_back_to_newest_valid(reference, tmp_path, capsys):
    path, full = reference
    exp = tmp_path / "fallback"
    shutil.copytree(os.path.dirname(full), exp / "model")
    for name in ("epoch_2.pth", "iter_7.pth"):  # keep epoch_1 (iteration 4) and iter_6 (iteration 6)
        p = exp / "model" / name
        if p.exists():
            os.remove(p)
    (exp / "model" / "last.pth").write_bytes(b"garbage, not a zip archive")
    assert train(path, f"exp_dir={exp}", *RUN, "train.resume=auto") == 0
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in out
    assert "iter_6.pth at epoch 1, iteration 6" in out  # newest readable: iteration 6 beats epoch_1
    same_weights(full, str(exp / "model" / "last.pth"))


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_config, tmp_path, capsys, monkeypatch):
    path = tiny_config()
    faults.nan_at_iter(5, monkeypatch.setattr)
    rc = train(path, f"exp_dir={tmp_path / 'nan'}", *RUN)
    assert rc == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]  # (tqdm writes there too)
    assert len(err) == 1 and "non-finite loss (nan) at iteration 5 (epoch 2)" in err[0]
    ckpt = load_checkpoint(str(tmp_path / "nan" / "model" / "last.pth"))
    assert ckpt["iteration"] == 4  # epoch 1's checkpoint; the NaN step never reached the weights
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_skipped_when_asked(tiny_config, tmp_path, capsys, monkeypatch):
    path = tiny_config()
    faults.nan_at_iter(2, monkeypatch.setattr)
    rc = train(path, f"exp_dir={tmp_path / 'skip'}", *RUN, "train.skip_nonfinite=true", "train.epochs=1")
    assert rc == 0
    out = capsys.readouterr().out
    assert "non-finite loss at iteration 2: step skipped (1 skipped so far)" in out
    assert "iter 4/4" in out and "skipped 1" in out
    ckpt = load_checkpoint(str(tmp_path / "skip" / "model" / "last.pth"))
    assert ckpt["iteration"] == 4 and ckpt["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_bad_resume_path_is_one_line_error(tiny_config, tmp_path, capsys):
    rc = train(tiny_config(), f"exp_dir={tmp_path / 'x'}", f"train.resume={tmp_path / 'missing.pth'}")
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"error: train.resume: checkpoint not found: {tmp_path / 'missing.pth'}"]


def test_bf16_and_channels_last_step_on_cpu(tiny_cfg):
    cfg = tiny_cfg("train.amp=bf16", "train.channels_last=true", "train.epochs=1")
    t = Trainer(cfg)
    batch = next(iter(t.loader))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    seen = {}
    hook = t.model.cls[-1].register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    logs = t.train_step(batch)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the convolutions ran in bf16
    assert torch.isfinite(logs["loss"]) and logs["loss"].dtype == torch.float32  # CE autocasts to fp32
    assert t.scaler is None
    changed = [k for k, v in t.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed and all(p.dtype == torch.float32 for p in t.model.parameters())
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        Trainer(tiny_cfg("train.amp=fp16"))


def test_killed_evaluation_resumes_to_identical_metrics(trained_model, tmp_path):
    path, ckpt = trained_model.config, trained_model.checkpoint
    common = [f"test.checkpoint={ckpt}", "test.batch_size=2", "test.save_images=false"]
    whole = tmp_path / "whole"
    assert main("test", run_test, ["--config", path, f"exp_dir={whole}", *common]) == 0
    exp = tmp_path / "resumed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *faults.runner(eval_flush_seconds=0, kill_at_eval_batch=2), "test.py",
                        "--config", path, f"exp_dir={exp}", *common], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    chunks = glob.glob(str(exp / "result.partial" / "per_image" / "*.npz"))  # staged until the run ends
    assert len(chunks) == 2 and not (exp / "result").exists()
    done = sorted(i for c in chunks for i in saved_counts(c)["clean"]["index"].tolist())
    assert done == [0, 1, 2, 3]
    assert main("test", run_test, ["--config", path, f"exp_dir={exp}", *common]) == 0
    a = json.loads((whole / "result" / "metrics.json").read_text())
    b = json.loads((exp / "result" / "metrics.json").read_text())
    assert a["attacks"]["pgd@8"]["mIoU"] < a["clean"]["mIoU"] - 0.1  # random-start PGD changes the result
    for key in ("mIoU", "mAcc", "aAcc", "iou_per_class"):
        assert a["clean"][key] == b["clean"][key]
        assert a["attacks"]["pgd@8"][key] == b["attacks"]["pgd@8"][key]
    assert a["attacks"]["pgd@8"]["forward_passes"] == b["attacks"]["pgd@8"]["forward_passes"] == 16 * 3
    # the chunks were merged into one file holding every image's counts
    files = glob.glob(str(exp / "result" / "per_image" / "*.npz"))
    assert len(files) == 1 and files[0].endswith(".all.npz") and not (exp / "result.partial").exists()
    counts = saved_counts(files[0])
    assert counts["clean"]["index"].tolist() == list(range(16))
    ref = saved_counts(glob.glob(str(whole / "result" / "per_image" / "*.all.npz"))[0])
    assert sorted(counts) == sorted(ref) == ["clean", "pgd@8"]
    for run in counts:
        assert sorted(counts[run]) == ["index", "inter", "target", "union"]
        for col in counts[run]:
            np.testing.assert_array_equal(counts[run][col], ref[run][col])


def test_folder_of_checkpoints(reference, tmp_path):
    path, ckpt = reference
    folder = os.path.dirname(ckpt)
    exp = tmp_path / "many"
    assert main("test", run_test, ["--config", path, f"exp_dir={exp}", f"test.checkpoint={folder}",
                                   "test.attacks=[]", "test.save_images=false", "test.num_images=3"]) == 0
    stems = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(folder, "*.pth")))
    summary = json.loads((exp / "result" / "checkpoints.json").read_text())
    assert sorted(summary) == stems
    for s in stems:
        m = json.loads((exp / "result" / s / "metrics.json").read_text())
        assert m["checkpoint"].endswith(s + ".pth") and m["clean"]["mIoU"] == summary[s]["clean_mIoU"]
    # last.pth and epoch_2.pth hold the same weights, hence the same numbers
    assert summary["last"]["clean_mIoU"] == summary["epoch_2"]["clean_mIoU"]
    # each equals a single-checkpoint evaluation of that file
    one = tmp_path / "one"
    assert main("test", run_test, ["--config", path, f"exp_dir={one}", f"test.checkpoint={folder}/epoch_1.pth",
                                   "test.attacks=[]", "test.save_images=false", "test.num_images=3"]) == 0
    a = json.loads((one / "result" / "metrics.json").read_text())["clean"]
    b = json.loads((exp / "result" / "epoch_1" / "metrics.json").read_text())["clean"]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
