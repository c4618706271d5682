"""Bad input through the real entry points, one row per case: every case runs `train.py` or `test.py`
in a subprocess against a copy of an exp_dir that holds a real earlier run (trained and evaluated once
per module) and must end with the expected exit code (2, or 3 for a stopped non-finite run), exactly one
`error:` line on stderr, no traceback, and every file of the earlier run byte-identical afterwards
(a new timestamped log is all a failing run may add). The cases run two at a time."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cli import main
from engine.evaluator import run_test
from engine.trainer import Trainer
from tests import data_fixtures as fx
from tests.conftest import ROOT, TINY

LOGS = r"(train|test)-[0-9_-]+\.log"
# tqdm progress bars also go to stderr ("\r"-separated); they are the only other output allowed
TQDM = re.compile(r"^[^:]*: *\d+%\|.*\| *\d+/\d+ \[")
MARKER = "code_ran"  # created by the pickled payloads below if they were ever executed
VOC = os.path.join(ROOT, "config", "voc2012", "voc2012_pspnet_none.yaml")


class RunsCode:
    """Pickles to a call of os.system (never run here: pickling only records the call)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass
class Case:
    id: str
    script: str                      # train.py | test.py
    args: Tuple[str, ...]            # after --config; {exp}, {case}, {data} are filled in
    words: Tuple[str, ...]           # must appear in the error line
    rc: int = 2
    config: str = "{tiny}"
    prepare: Optional[Callable[[Path, Path, str], None]] = None  # (case dir, exp copy, data root), before the snapshot
    may_add: str = LOGS              # new paths (relative to exp) a failing run may leave
    marks: tuple = field(default=())


# ------------------------------------------------------------------ preparations (files outside exp)
def _copy_data(case: Path, data: str) -> Path:
    shutil.copytree(data, case / "data")
    return case / "data"


def bad_label_value(case, exp, data):
    root = _copy_data(case, data)
    lbl = np.array(Image.open(root / "SegmentationClass" / "train_0003.png"))
    lbl[5, 5] = 9  # 6 classes
    Image.fromarray(lbl).save(root / "SegmentationClass" / "train_0003.png")


def label_size(case, exp, data):
    root = _copy_data(case, data)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "SegmentationClass" / "train_0003.png")


def truncated_jpeg(case, exp, data):
    root = _copy_data(case, data)
    p = root / "JPEGImages" / "train_0005.jpg"
    p.write_bytes(p.read_bytes()[:-200])


def truncated_ckpt(case, exp, data):
    (case / "cut.pth").write_bytes((exp / "model" / "epoch_1.pth").read_bytes()[:20000])


def code_pickle(case, exp, data):
    with open(case / "code.pth", "wb") as f:
        pickle.dump({"model": RunsCode(case / MARKER)}, f)


def list_file(case, exp, data):
    torch.save([1, 2, 3], case / "list.pth")


def weights_only(case, exp, data):
    torch.save(torch.load(exp / "model" / "last.pth", weights_only=True)["model"], case / "weights.pth")


def all_unreadable(case, exp, data):
    for p in (exp / "model").glob("*.pth"):
        p.write_bytes(p.read_bytes()[:1000])


def voc(case, exp, data):
    fx.make_voc(str(case / "voc"))


def other_predictions(case, exp, data):
    """Data whose 5th val label is bad (second batch of 3) and weights predicting class 3 everywhere,
    so the first batch's prediction PNGs differ from the earlier evaluation's."""
    root = _copy_data(case, data)
    lbl = np.array(Image.open(root / "SegmentationClass" / "val_0004.png"))
    lbl[0, 0] = 9
    Image.fromarray(lbl).save(root / "SegmentationClass" / "val_0004.png")
    ckpt = torch.load(exp / "model" / "last.pth", weights_only=True)
    ckpt["model"]["cls.4.bias"][3] += 1000.0
    torch.save(ckpt, case / "class3.pth")


OVER = "train.overwrite=true"  # past the fresh-run check: the failure must still come before any write
CASES = [
    # configuration values, refused before anything is loaded
    Case("missing_config", "train.py", (), ("config file not found", "nope.yaml"), config="{case}/nope.yaml"),
    Case("unknown_key", "train.py", ("train.lrr=0.1",), ("unknown config key 'train.lrr'", "closest valid key: 'train.lr'")),
    Case("wrong_type", "train.py", ("train.epochs=2.5",), ("'train.epochs' must be int",)),
    Case("negative_lr", "train.py", ("train.lr=-0.1",), ("'train.lr'", "> 0", "-0.1")),
    Case("save_freq_zero", "train.py", ("train.save_freq=0",), ("'train.save_freq'", ">= 1")),
    Case("epochs_zero", "train.py", ("train.epochs=0",), ("'train.epochs'", ">= 1")),
    Case("negative_eval_freq", "train.py", ("train.eval_freq=-1",), ("'train.eval_freq'", ">= 0")),
    Case("scale_range_reversed", "train.py", ("data.scale_range=[1.5,0.5]",), ("'data.scale_range'", "lo <= hi")),
    Case("num_images_zero", "test.py", ("test.num_images=0",), ("'test.num_images'", ">= 1")),
    Case("empty_eps", "test.py", ("test.eps=[]",), ("'test.eps'",)),
    Case("stride_rate_above_one", "test.py", ("test.stride_rate=1.5",), ("'test.stride_rate'", "(0, 1]")),
    # values only the model / attacks / registries can judge
    Case("crop_not_8k_plus_1", "train.py", ("data.crop_size=[34,34]", OVER),
         ("'data.crop_size'", "divisible by 8", "[33, 33]")),
    Case("unknown_model", "train.py", ("model.name=pspnett", OVER), ("unknown model 'pspnett'", "pspnet")),
    Case("attack_option_type", "test.py", ("test.attacks=[{name: pgd, alpha: fast}]",),
         ("attack 'pgd': alpha must be a number or null, got 'fast'",)),
    Case("unknown_attack", "test.py", ("test.attacks=[pgdd]",), ("unknown attack 'pgdd'",)),
    # data
    Case("missing_data_root", "train.py", ("data.root={case}/no_such_root", "model.pretrained=null", "data.workers=0",
                                           OVER), ("no_such_root",), config=VOC),
    Case("missing_list_file", "train.py", ("data.root={case}/voc", "data.train_list=list/missing.txt",
                                           "model.pretrained=null", "data.workers=0", OVER),
         ("missing.txt",), config=VOC, prepare=voc),
    Case("label_size_mismatch", "train.py", ("data.root={case}/data", OVER), ("train_0003.png", "12x10", "41x41"),
         prepare=label_size),
    Case("bad_label_value", "train.py", ("data.root={case}/data", OVER), ("train_0003.png", "[9]"),
         prepare=bad_label_value),
    Case("truncated_jpeg", "train.py", ("data.root={case}/data", OVER), ("train_0005.jpg: the file is truncated",),
         prepare=truncated_jpeg),
    # runs that stop part-way
    Case("nan_loss_after_resume", "train.py", ("train.resume=auto", "train.epochs=3", "train.debug_nan_at_iter=9"),
         ("non-finite loss (nan) at iteration 9",), rc=3),
    Case("nan_loss_with_overwrite", "train.py", (OVER, "train.debug_nan_at_iter=1"),
         ("non-finite loss (nan) at iteration 1",), rc=3),
    # one run per exp_dir
    Case("fresh_run_into_checkpoints", "train.py", (), ("already holds checkpoints", "train.resume=auto",
                                                        "train.overwrite=true")),
    Case("resume_auto_all_unreadable", "train.py", ("train.resume=auto",),
         ("train.resume=auto: none of the 3 checkpoint(s)", "truncated or not a PyTorch file"), prepare=all_unreadable),
    # checkpoint files, through every key that names one
    Case("missing_test_checkpoint", "test.py", ("test.checkpoint={case}/none.pth",), ("checkpoint not found", "none.pth")),
    Case("truncated_test_checkpoint", "test.py", ("test.checkpoint={case}/cut.pth",),
         ("test.checkpoint: cannot read", "cut.pth: truncated or not a PyTorch file"), prepare=truncated_ckpt),
    Case("truncated_weights", "train.py", ("model.weights={case}/cut.pth", OVER),
         ("model.weights: cannot read", "cut.pth: truncated or not a PyTorch file"), prepare=truncated_ckpt),
    Case("truncated_pretrained", "train.py", ("model.pretrained={case}/cut.pth", OVER),
         ("model.pretrained: cannot read", "cut.pth: truncated or not a PyTorch file"), prepare=truncated_ckpt),
    Case("truncated_resume", "train.py", ("train.resume={case}/cut.pth",),
         ("train.resume: cannot read", "cut.pth: truncated or not a PyTorch file"), prepare=truncated_ckpt),
    Case("code_as_test_checkpoint", "test.py", ("test.checkpoint={case}/code.pth",),
         ("test.checkpoint:", "code.pth holds code", "not loaded"), prepare=code_pickle),
    Case("code_as_weights", "train.py", ("model.weights={case}/code.pth", OVER),
         ("model.weights:", "code.pth holds code", "not loaded"), prepare=code_pickle),
    Case("code_as_resume", "train.py", ("train.resume={case}/code.pth",),
         ("train.resume:", "code.pth holds code", "not loaded"), prepare=code_pickle),
    Case("list_as_weights", "train.py", ("model.weights={case}/list.pth", OVER),
         ("model.weights:", "holds a list, not a state dict"), prepare=list_file),
    Case("weights_as_resume", "train.py", ("train.resume={case}/weights.pth",),
         ("train.resume:", "not a training checkpoint", "missing model, optimizer"), prepare=weights_only),
    Case("eval_bad_label_in_second_batch", "test.py",
         ("data.root={case}/data", "test.checkpoint={case}/class3.pth", "test.batch_size=3", "test.attacks=[]"),
         ("val_0004.png", "[9]"), prepare=other_predictions, may_add=".*"),
]


# ------------------------------------------------------------------ harness
def snapshot(folder: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, synthetic_root) -> Tuple[Path, Path]:
    """(config, exp_dir) of a real earlier run: trained 2 epochs, evaluated clean and under PGD with PNGs."""
    top = tmp_path_factory.mktemp("earlier")
    cfg = top / "tiny.yaml"
    cfg.write_text(TINY.format(exp=top / "exp", data=synthetic_root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cases' subprocesses get one thread each too
    try:
        assert main("train", lambda c: Trainer(c).fit(), ["--config", str(cfg)]) == 0
        assert main("test", run_test, ["--config", str(cfg)]) == 0
    finally:
        torch.set_num_threads(threads)
    files = set(snapshot(top / "exp"))
    assert {"model/epoch_2.pth", "config.yaml", "result/metrics.json", "result/clean/val_0000.png"} <= files
    return cfg, top / "exp"


def run_case(case: Case, base: Path, cfg: Path, earlier_exp: Path, data: str):
    """Copy the earlier run, prepare, snapshot, run the entry point, snapshot again; returns
    (result, snapshot before, snapshot after, whether the pickled payload ran). The case's copies
    are removed afterwards: each holds megabytes of checkpoints."""
    folder = base / case.id
    exp = folder / "exp"
    shutil.copytree(earlier_exp, exp)
    if case.prepare:
        case.prepare(folder, exp, data)
    before = snapshot(exp)
    def fill(a: str) -> str:  # (not str.format: YAML flow mappings use braces too)
        for k, v in (("{exp}", exp), ("{case}", folder), ("{data}", data), ("{tiny}", cfg)):
            a = a.replace(k, str(v))
        return a
    args = [fill(case.config), f"exp_dir={exp}", *map(fill, case.args)]
    r = subprocess.run([sys.executable, case.script, "--config", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    after, code_ran = snapshot(exp), (folder / MARKER).exists()
    shutil.rmtree(folder)
    return r, before, after, code_ran


@pytest.fixture(scope="module")
def outcomes(request, earlier, tmp_path_factory, synthetic_root):
    """Every selected case, run two at a time."""
    cfg, earlier_exp = earlier
    base = tmp_path_factory.mktemp("cases")
    wanted = [it.callspec.params["case"] for it in request.session.items
              if it.module is sys.modules[__name__] and hasattr(it, "callspec") and "case" in it.callspec.params]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(run_case, c, base, cfg, earlier_exp, synthetic_root) for c in wanted}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, outcomes):
    r, before, after, code_ran = outcomes[case.id]
    assert r.returncode == case.rc, r.stderr[-3000:]
    lines = [s for ln in r.stderr.splitlines() for s in ln.split("\r") if s.strip() and not TQDM.match(s.strip())]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    for w in case.words:
        assert w in lines[0], (w, lines[0])
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"changed or removed: {changed}"
    added = sorted(p for p in set(after) - set(before) if not re.fullmatch(case.may_add, p))
    assert not added, f"new files: {added}"
    assert not code_ran  # the pickled call was never executed


def test_enough_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
