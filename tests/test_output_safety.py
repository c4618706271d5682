"""Nothing lost: one run per output folder (locks), and writes that keep the previous state when they
fail (a full disk, simulated with RLIMIT_FSIZE in the child process) or are replaced (train.overwrite)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from engine.cli import main
from engine.evaluator import run_test
from engine.trainer import Trainer
from tests import faults
from tests.conftest import ROOT
from utils.checkpoint import load_checkpoint, recover_model_dir, replace_model_dir
from utils.config import load_config
from utils.errors import SetupError
from utils.folder_lock import FolderLock

def snapshot(folder: Path) -> Dict[str, str]:
    """sha1 of every file under `folder` (relative path -> digest)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def tmp_files(folder: Path) -> list:
    return [str(p) for p in folder.rglob("*.tmp*")]


def error_lines(stderr: str) -> list:
    """The lines of stderr that are not progress output."""
    lines = [seg for ln in stderr.splitlines() for seg in ln.split("\r")]
    return [ln for ln in lines if ln.strip() and "%|" not in ln]


def start(script: str, config: str, *overrides: str, fsize: int = 0, **fault) -> subprocess.Popen:
    """`script` in a child process (under tests/faults.py with the keyword faults, if any); `fsize`:
    its file-size limit in bytes (0: none)."""
    def limit():
        if fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    # no .pyc writes under a file-size limit: a cut one would break later imports
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"PYTHONDONTWRITEBYTECODE": "1"} if fsize else {}))
    runner = faults.runner(**fault) if fault else []
    return subprocess.Popen([sys.executable, *runner, script, "--config", config, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def finish(p: subprocess.Popen):
    out, err = p.communicate(timeout=180)
    return p.returncode, out, err


def run(script: str, config: str, *overrides: str, fsize: int = 0, **fault):
    return finish(start(script, config, *overrides, fsize=fsize, **fault))


def one_error(err: str, *words: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ locks
def test_folder_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    path = str(tmp_path / "exp" / "train.lock")
    with FolderLock(path, "exp_dir exp"):
        assert json.loads(Path(path).read_text())["pid"] == os.getpid()
        with pytest.raises(SetupError, match=rf"exp_dir exp is in use by .*pid {os.getpid()} on host"):
            FolderLock(path, "exp_dir exp").acquire()
        holder = subprocess.run([sys.executable, "-c", f"from utils.folder_lock import is_held; print(is_held({path!r}))"],
                                cwd=ROOT, capture_output=True, text=True)
        assert f"pid {os.getpid()}" in holder.stdout
    assert not os.path.exists(path)  # removed when released
    # a lock file left by a process that was killed: no flock is held on it, so the next run takes it
    Path(path).write_text(json.dumps({"pid": 4242424, "host": "h", "command": "train.py", "started": "then"}))
    notes = []
    with FolderLock(path, "exp_dir exp", log=notes.append):
        pass
    assert len(notes) == 1 and "taking over" in notes[0] and "pid 4242424" in notes[0]


def test_two_trainings_into_one_exp_dir_one_runs_the_other_is_refused(tiny_config, tmp_path):
    path, exp = tiny_config(), tmp_path / "exp"
    common = (f"exp_dir={exp}", "train.eval_freq=0", "train.epochs=1")
    procs = {lr: start("train.py", path, *common, f"train.lr={lr}") for lr in (0.05, 0.01)}
    results = {lr: finish(p) for lr, p in procs.items()}
    codes = sorted(rc for rc, _, _ in results.values())
    assert codes == [0, 2], {lr: (rc, err[-1500:]) for lr, (rc, _, err) in results.items()}
    (winner, _), (loser, (_, _, err)) = sorted(results.items(), key=lambda kv: kv[1][0])
    one_error(err, f"exp_dir {exp} is in use by", "train.py", "pid ")
    # the survivor's outputs are complete and all its own
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "last.pth"]
    assert load_checkpoint(str(exp / "model" / "last.pth"))["config"]["train"]["lr"] == winner
    assert load_config(str(exp / "config.yaml")).train.lr == winner
    assert not (exp / "train.lock").exists()


def test_two_evaluations_into_one_result_folder_one_runs_the_other_is_refused(trained_model, tmp_path):
    common = (f"exp_dir={tmp_path / 'exp'}", f"test.checkpoint={trained_model.checkpoint}")
    procs = [start("test.py", trained_model.config, *common) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], [r[2][-1500:] for r in results]
    refused = next(r for r in results if r[0] == 2)
    one_error(refused[2], f"result folder {tmp_path / 'exp' / 'result'} is in use by", "test.py")
    result = tmp_path / "exp" / "result"
    m = json.loads((result / "metrics.json").read_text())
    assert m["num_images"] == 16 and m["attacks"]["pgd@8"]["mIoU"] < m["clean"]["mIoU"]
    assert len(glob.glob(str(result / "per_image" / "*.all.npz"))) == 1
    assert not (tmp_path / "exp" / "result.partial").exists() and not (tmp_path / "exp" / "result.lock").exists()


@pytest.mark.parametrize("kind,lock", [("train", "train.lock"), ("test", "result.lock")])
def test_launcher_refuses_a_held_folder_before_any_process_starts(tmp_path, kind, lock):
    exp = tmp_path / "exp"
    with FolderLock(str(exp / lock), "the folder"):
        before = sorted(os.listdir(exp))
        r = subprocess.run(["sh", f"tool_{kind}/synthetic/demo_none.sh", f"exp_dir={exp}"], cwd=ROOT,
                           env=dict(os.environ, NGPU="1", OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=120)
        assert sorted(os.listdir(exp)) == before  # not even the console log was opened
    assert r.returncode == 2, r.stderr[-2000:]
    one_error(r.stderr, "is in use by", f"pid {os.getpid()}")


# ----------------------------------------------------------------------------- result folder kinds
def test_result_dir_that_is_a_file_is_refused_and_a_symlink_is_followed(trained_model, tmp_path):
    common = [f"exp_dir={tmp_path / 'exp'}", f"test.checkpoint={trained_model.checkpoint}", "test.attacks=[]",
              "test.num_images=3"]
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    rc, _, err = run("test.py", trained_model.config, *common, f"test.result_dir={user_file}")
    assert rc == 2
    one_error(err, "test.result_dir", str(user_file), "is a file")
    assert user_file.read_text() == "mine" and not (tmp_path / "notes.txt.old").exists()
    for script in ("train.py", "test.py"):  # exp_dir naming a file: refused by both, before the logger
        rc, _, err = run(script, trained_model.config, f"exp_dir={user_file}")
        assert rc == 2
        one_error(err, "exp_dir", str(user_file), "is a file")
        assert user_file.read_text() == "mine"
    # a symbolic link to a folder: the folder gets the results (twice: replaced, not nested), the link stays
    target = tmp_path / "elsewhere" / "results"
    target.mkdir(parents=True)
    link = tmp_path / "exp" / "result"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    for n in (3, 2):
        assert main("test", run_test, ["--config", trained_model.config, *common[:-1], f"test.num_images={n}"]) == 0
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert json.loads((target / "metrics.json").read_text())["num_images"] == n
    assert sorted(os.listdir(target.parent)) == ["results"]  # no staging or .old folder left behind


# ------------------------------------------------------------------------------- overwrite & swap
def test_overwrite_replaces_model_dir_only_after_the_first_checkpoint_is_on_disk(tiny_config, tmp_path):
    path, exp = tiny_config(), tmp_path / "exp"
    assert main("train", lambda cfg: Trainer(cfg).fit(), ["--config", path, f"exp_dir={exp}", "train.eval_freq=0"]) == 0
    before = snapshot(exp / "model")
    seen = {}

    class Spy(Trainer):
        def _checkpoint(self, names):  # what model/ holds while the new run's first checkpoint is written
            seen.setdefault("model", sorted(os.listdir(exp / "model")))
            super()._checkpoint(names)
            seen.setdefault("after", sorted(os.listdir(exp / "model")))
    assert main("train", lambda cfg: Spy(cfg).fit(), ["--config", path, f"exp_dir={exp}", "train.eval_freq=0",
                                                       "train.overwrite=true", "train.epochs=1"]) == 0
    assert seen["model"] == sorted(before) == ["epoch_1.pth", "epoch_2.pth", "last.pth"]
    assert seen["after"] == ["epoch_1.pth", "last.pth"]
    assert not (exp / "model.next").exists() and not (exp / "model.prev").exists()
    assert load_checkpoint(str(exp / "model" / "last.pth"))["config"]["train"]["epochs"] == 1


def test_recovery_of_a_replacement_killed_between_its_renames(tmp_path):
    def layout(**folders):
        shutil.rmtree(tmp_path / "e", ignore_errors=True)
        for name, content in folders.items():
            (tmp_path / "e" / name.replace("_", ".")).mkdir(parents=True)
            (tmp_path / "e" / name.replace("_", ".") / "last.pth").write_text(content)
        return tmp_path / "e"
    # killed after model/ -> model.prev/, before model.next/ -> model/: the new, complete checkpoint wins
    e = layout(model_prev="old", model_next="new")
    recover_model_dir(str(e))
    assert sorted(os.listdir(e)) == ["model"] and (e / "model" / "last.pth").read_text() == "new"
    # killed before removing model.prev/: only the clean-up is left
    e = layout(model="new", model_prev="old")
    recover_model_dir(str(e))
    assert sorted(os.listdir(e)) == ["model"] and (e / "model" / "last.pth").read_text() == "new"
    # an overwriting run killed before its first checkpoint was complete: the earlier run stays
    e = layout(model="old", model_next="partial")
    recover_model_dir(str(e))
    assert sorted(os.listdir(e)) == ["model"] and (e / "model" / "last.pth").read_text() == "old"
    # the replacement itself
    e = layout(model="old", model_next="new")
    assert replace_model_dir(str(e)) == str(e / "model")
    assert sorted(os.listdir(e)) == ["model"] and (e / "model" / "last.pth").read_text() == "new"


# ------------------------------------------------------------------------------------ full disk
@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory, synthetic_root_module):
    """A finished 2-epoch training run and its evaluation (result/), to be copied by each case."""
    from tests.conftest import TINY
    base = tmp_path_factory.mktemp("earlier")
    path = base / "tiny.yaml"
    path.write_text(TINY.format(exp=base / "exp", data=synthetic_root_module))
    assert run("train.py", str(path), "train.eval_freq=0")[0] == 0
    assert run("test.py", str(path), "test.num_images=6")[0] == 0
    return str(path), base / "exp"


@pytest.fixture(scope="module")
def synthetic_root_module(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data") / "synthetic")


def copy_of(earlier_run, tmp_path):
    path, exp = earlier_run
    dst = tmp_path / "exp"
    shutil.copytree(exp, dst)
    return path, dst


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_full_disk_during_a_checkpoint_save_keeps_every_earlier_file(earlier_run, tmp_path, mode):
    """A resumed run with new settings saves into model/, an overwriting one into model.next/: either
    way the earlier run's files, config.yaml included (no checkpoint of the new settings exists), stay."""
    path, exp = copy_of(earlier_run, tmp_path)
    size = os.path.getsize(exp / "model" / "last.pth")
    before = snapshot(exp)
    new = ("train.resume=auto", "train.epochs=3") if mode == "resume" else ("train.overwrite=true", "train.epochs=1")
    rc, _, err = run("train.py", path, f"exp_dir={exp}", "train.eval_freq=0", *new, fsize=size // 2)
    assert rc == 2
    line = one_error(err, f"cannot write {exp}/", "file too large", "EFBIG", "earlier files are kept")
    written = line.split(": ")[1].split("/")
    assert written[-2:] in (["model", "epoch_3.pth"], ["model", "last.pth"]) if mode == "resume" else \
        written[-2] == "model.next", line
    after = snapshot(exp)
    assert {k: after[k] for k in before} == before
    assert sorted(os.listdir(exp / "model")) == ["epoch_1.pth", "epoch_2.pth", "last.pth"]
    assert not tmp_files(exp) and not (exp / "model.next").exists()


@pytest.mark.parametrize("stage", ["image", "chunk", "merge"])
def test_full_disk_during_evaluation_keeps_the_earlier_result(earlier_run, tmp_path, stage):
    """Prediction PNGs are written first; the per-image counts after every image here (1-image
    chunks); when the evaluation has finished they are merged into one file of all 6 images, just
    before the results are published."""
    path, exp = copy_of(earlier_run, tmp_path)
    merged = next((exp / "result" / "per_image").glob("*.all.npz")).stat().st_size
    before = snapshot(exp)
    rc, _, err = run("test.py", path, f"exp_dir={exp}", "test.num_images=6", "test.batch_size=1",
                     f"test.save_images={stage == 'image'}", fsize=merged - 1 if stage == "merge" else 300,
                     eval_flush_seconds=0)
    assert rc == 2, err[-2000:]
    folder = "clean" if stage == "image" else "per_image"
    line = one_error(err, "cannot write", str(exp / "result.partial" / folder), "EFBIG")
    assert line.split(": ")[1].endswith(".all.npz") == (stage == "merge"), line
    after = snapshot(exp)
    assert {k: after[k] for k in before} == before  # result/ untouched
    assert not tmp_files(exp) and not (exp / "result.lock").exists()
