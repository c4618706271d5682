"""Bad input through the real entry points, one row per case: every case runs `train.py`, `test.py`,
`python -m utils.config`, a launcher, `benchmark.py` or `tools/compare_curves.py` in a subprocess
against a copy of an exp_dir that holds a real earlier run (trained and evaluated once per module)
and must end with the expected exit code (2, or 3 for a stopped non-finite run), exactly one
`error:` line on stderr, a line of its own (progress bars on other lines), no traceback, and every
file of the earlier run byte-identical afterwards (a new timestamped log is all a failing run may
add). The cases run two at a time; the Python entry points as forks of a process that has imported
torch once (tests/preloaded.py), the launchers and cases with their own environment as fresh processes."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import queue
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
from tests import faults
from tests.conftest import ROOT, TINY
from tests.preloaded import Preloaded

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
    script: str                      # train.py | test.py | utils.config | benchmark.py | tools/compare_curves.py
                                     # | a launcher (tool_train/... or tool_test/...)
    args: Tuple[str, ...]            # after --config (launchers: after exp_dir=); {exp}, {case}, {data} are filled in
    words: Tuple[str, ...]           # must appear in the error line
    rc: int = 2
    config: str = "{tiny}"
    prepare: Optional[Callable[[Path, Path, str], None]] = None  # (case dir, exp copy, data root), before the snapshot
    may_add: str = LOGS              # new paths (relative to exp) a failing run may leave
    marks: tuple = field(default=())
    env: Tuple[Tuple[str, str], ...] = ()  # extra environment (launchers), filled in like args
    absent: str = ""                 # a path (relative to the repository, filled in) that must not exist afterwards
    faults: Tuple[Tuple[str, int], ...] = ()  # train.py / test.py run under tests/faults.py with these


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


# -- models and data brought by the user (models/external.py, datasets/folder.py)
def hf_folder_without_transformers(case, exp, data):
    """A folder that looks like a saved model, and a transformers package that cannot be imported."""
    (case / "hf").mkdir()
    (case / "hf" / "config.json").write_text("{}")
    (case / "hf" / "model.safetensors").write_bytes(b"")
    (case / "hide" / "transformers").mkdir(parents=True)
    hidden = case / "hide" / "transformers" / "__init__.py"
    hidden.write_text("raise ImportError('transformers hidden by the test')\n")


def folder_unmatched(case, exp, data):
    fx.make_folder(str(case / "folder"))
    (case / "folder" / "labels" / "train" / "d_3.png").unlink()


FOLDER = ("data.name=folder", "data.root={case}/folder", "data.train_list=''", "data.val_list=''",
          "data.test_list=''", *fx.FOLDER_OVERRIDES)


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
    Case("nan_loss_after_resume", "train.py", ("train.resume=auto", "train.epochs=3"),
         ("non-finite loss (nan) at iteration 9",), rc=3, faults=(("nan_at_iter", 9),)),
    Case("nan_loss_with_overwrite", "train.py", (OVER,), ("non-finite loss (nan) at iteration 1",), rc=3,
         faults=(("nan_at_iter", 1),)),
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
    # ---- bring your own model and data (models/external.py, datasets/folder.py): rows kept together
    Case("entry_does_not_import", "test.py", ("model.name=external", "model.entry=no_such_package.models:build"),
         ("model.entry no_such_package.models:build", "cannot import no_such_package.models", "ModuleNotFoundError")),
    Case("entry_returns_no_module", "train.py", ("model.name=external", "model.entry=builtins:dict", OVER),
         ("model.entry builtins:dict returned a dict, not a torch.nn.Module",)),
    Case("entry_wrong_classes", "test.py", ("model.name=external", "model.entry=examples.my_model:build",
                                            "model.kwargs={classes: 4, width: 4}"),
         ("model.entry examples.my_model:build", "outputs 4 classes, data.classes is 6")),
    Case("hf_path_without_model", "test.py", ("model.name=hf", "model.hf_path={case}"),
         ("model.hf_path:", "holds no model saved with save_pretrained")),
    Case("hf_without_transformers", "test.py", ("model.name=hf", "model.hf_path={case}/hf"),
         ("model.name hf needs the transformers package", "pip install -r requirements-hf.txt"),
         prepare=hf_folder_without_transformers, env=(("PYTHONPATH", "{case}/hide"),)),
    Case("folder_unmatched_stems", "train.py", (*FOLDER, OVER),
         ("unmatched stems", "1 image(s)", "images/train without a label (d_3)"), prepare=folder_unmatched),
    # ---- end of bring-your-own rows
]


# ------------------------------------------------------------------ hostile files: images, checkpoint contents,
# config and list files, launcher values, benchmark and compare_curves arguments
def corrupt_train_jpeg(case, exp, data):
    p = _copy_data(case, data) / "JPEGImages" / "train_0005.jpg"
    p.write_bytes(fx.corrupt_jpeg_body(p.read_bytes()))


def corrupt_val_jpeg(case, exp, data):
    p = _copy_data(case, data) / "JPEGImages" / "val_0001.jpg"
    p.write_bytes(fx.corrupt_jpeg_body(p.read_bytes()))


def bomb_image(case, exp, data):
    (_copy_data(case, data) / "JPEGImages" / "train_0002.jpg").write_bytes(fx.png_claiming(60000, 60000))


def latin1_list(case, exp, data):
    p = _copy_data(case, data) / "list" / "train.txt"
    p.write_bytes(p.read_bytes() + "JPEGImages/caf\u00e9.jpg\n".encode("latin-1"))


def tiny_text(case: Path, data: str) -> str:
    return TINY.format(exp=case / "exp", data=data)


def latin1_config(case, exp, data):
    (case / "latin.yaml").write_bytes(tiny_text(case, data).encode() + "# r\u00e9sum\u00e9\n".encode("latin-1"))


def binary_config(case, exp, data):
    (case / "binary.yaml").write_bytes(fx.png_claiming(40, 30))  # 0x89 at byte 0: not UTF-8


def nul_config(case, exp, data):
    (case / "nul.yaml").write_bytes(b"exp_dir: x\n\0\0\0\0")  # valid UTF-8, not text


def base_five(case, exp, data):
    (case / "base.yaml").write_text("_base_: 5\n" + tiny_text(case, data))


def base_null(case, exp, data):
    (case / "base.yaml").write_text("_base_: [null]\n" + tiny_text(case, data))


def two_train_sections(case, exp, data):
    (case / "dup.yaml").write_text(tiny_text(case, data) + "train:\n  lr: 0.05\n")


def laughs(levels: int = 9) -> str:
    """The 'billion laughs' YAML: 9 levels of 9 aliases, 9^9 leaves once expanded, ~350 bytes."""
    names = "abcdefghij"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{c}: &{c} [" + ",".join([f"*{names[i]}"] * 9) + "]" for i, c in enumerate(names[1:levels])]
    return "\n".join(lines) + "\n"


def laughs_config(case, exp, data):
    (case / "laughs.yaml").write_text(laughs())


def laughs_in_tiny(case, exp, data):
    (case / "laughs.yaml").write_text(tiny_text(case, data) + laughs())


def _edited_checkpoint(exp: Path, out: Path, edit: Callable[[dict], None]) -> None:
    ckpt = torch.load(exp / "model" / "last.pth", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)


def all_nan(case, exp, data):
    def edit(ckpt):
        for t in ckpt["model"].values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    _edited_checkpoint(exp, case / "nan.pth", edit)


def resume_field(**fields):
    def prepare(case, exp, data):
        _edited_checkpoint(exp, case / "r.pth", lambda ckpt: ckpt.update(fields))
    return prepare


def momentum_shape(case, exp, data):
    def edit(ckpt):
        state = ckpt["optimizer"]["state"]
        k = sorted(state)[3]
        state[k]["momentum_buffer"] = torch.zeros(3)
    _edited_checkpoint(exp, case / "r.pth", edit)


def curves(value) -> Callable:
    """A result folder whose robustness.json has `value` as the pgd curve's mIoU at eps 8."""
    def prepare(case, exp, data):
        folder = case / "res"
        folder.mkdir()
        text = ('{"eps_unit": "1/255", "attacks": {"pgd": [{"eps": 0.0, "mIoU": 0.5, "aAcc": 0.8}, '
                '{"eps": 8.0, "mIoU": %s, "aAcc": 0.4}]}, "worst_case": [{"eps": 0.0, "mIoU": 0.5, "aAcc": 0.8}, '
                '{"eps": 8.0, "mIoU": 0.2, "aAcc": 0.4}]}' % value)
        (folder / "robustness.json").write_text(text)
    return prepare


LAUNCH_TRAIN, LAUNCH_TEST = "tool_train/synthetic/pspnet18_none.sh", "tool_test/synthetic/pspnet18_none.sh"
BENCH = "config/synthetic/synthetic_pspnet18_none.yaml"
CASES += [
    # images are read as their labels are: corrupt data and decompression bombs refused, naming the file
    Case("corrupt_jpeg_in_training", "train.py", ("data.root={case}/data", OVER),
         ("train_0005.jpg", "Corrupt JPEG data"), prepare=corrupt_train_jpeg),
    Case("corrupt_jpeg_in_evaluation", "test.py", ("data.root={case}/data", "test.attacks=[]"),
         ("val_0001.jpg", "Corrupt JPEG data"), prepare=corrupt_val_jpeg, may_add=".*"),
    Case("bomb_png_as_image", "train.py", ("data.root={case}/data", OVER),
         ("train_0002.jpg", "3600000000 pixels", "decompression bomb"), prepare=bomb_image),
    # checkpoints with non-finite weights, through every key that names one
    Case("nan_test_checkpoint", "test.py", ("test.checkpoint={case}/nan.pth",),
         ("test.checkpoint:", "nan.pth: tensor 'model.", "non-finite values (nan)"), prepare=all_nan),
    Case("nan_weights", "train.py", ("model.weights={case}/nan.pth", OVER),
         ("model.weights:", "non-finite values (nan)"), prepare=all_nan),
    Case("nan_pretrained", "train.py", ("model.pretrained={case}/nan.pth", OVER),
         ("model.pretrained:", "non-finite values (nan)"), prepare=all_nan),
    Case("nan_resume", "train.py", ("train.resume={case}/nan.pth",),
         ("train.resume:", "non-finite values (nan)"), prepare=all_nan),
    # resume checkpoints whose fields do not fit: refused before training starts
    Case("resume_epoch_text", "train.py", ("train.resume={case}/r.pth",),
         ("r.pth: 'epoch' must be an integer >= 0, got 'x'",), prepare=resume_field(epoch="x")),
    Case("resume_epoch_negative", "train.py", ("train.resume={case}/r.pth",),
         ("'epoch' must be an integer >= 0, got -4",), prepare=resume_field(epoch=-4, iteration=-16)),
    Case("resume_rng_bogus", "train.py", ("train.resume={case}/r.pth",),
         ("r.pth: 'rng' is not a random-number state",), prepare=resume_field(rng={"bogus": 1})),
    Case("resume_optimizer_empty", "train.py", ("train.resume={case}/r.pth",),
         ("r.pth: the SGD state does not fit this run",), prepare=resume_field(optimizer={})),
    Case("resume_momentum_shape", "train.py", ("train.resume={case}/r.pth",),
         ("r.pth: optimizer state 'momentum_buffer' of parameter", "has shape [3]"), prepare=momentum_shape),
    # config and list files: UTF-8, `_base_`, duplicate keys, alias bombs, value ranges
    Case("config_not_utf8", "train.py", (), ("latin.yaml is not UTF-8 text", "byte offset"),
         config="{case}/latin.yaml", prepare=latin1_config),
    Case("config_binary", "test.py", (), ("binary.yaml is not UTF-8 text (byte 0x89 at byte offset 0)",),
         config="{case}/binary.yaml", prepare=binary_config),
    Case("config_nul_bytes", "utils.config", (), ("nul.yaml is not a text file",), config="{case}/nul.yaml",
         prepare=nul_config),
    Case("data_root_a_file", "train.py", ("data.root={case}/root.txt", OVER), ("data.root", "root.txt is a file"),
         prepare=lambda case, exp, data: (case / "root.txt").write_text("not a folder\n")),
    Case("list_file_not_utf8", "train.py", ("data.root={case}/data", OVER), ("train.txt is not UTF-8 text",
                                                                           "byte offset"), prepare=latin1_list),
    Case("benchmark_config_not_utf8", "benchmark.py", (), ("latin.yaml is not UTF-8 text",),
         config="{case}/latin.yaml", prepare=latin1_config),
    Case("base_a_number", "train.py", (), ("base.yaml: `_base_` must be a file name or a list", "got 5"),
         config="{case}/base.yaml", prepare=base_five),
    Case("base_list_of_null", "utils.config", (), ("`_base_` must be", "got [None]"), config="{case}/base.yaml",
         prepare=base_null),
    Case("two_train_sections", "train.py", (), ("dup.yaml", "duplicate key 'train' (lines 11 and 17)"),
         config="{case}/dup.yaml", prepare=two_train_sections),
    Case("billion_laughs", "utils.config", (), ("laughs.yaml", "aliases expand to more than 100000 nodes"),
         config="{case}/laughs.yaml", prepare=laughs_config),
    Case("billion_laughs_in_experiment", "test.py", (), ("aliases expand to more than",),
         config="{case}/laughs.yaml", prepare=laughs_in_tiny),
    Case("duplicate_key_in_override", "utils.config", ("--get", "train.lr", "train={lr: 1, lr: 2}"),
         ("command-line override 'train={lr: 1, lr: 2}'", "duplicate key 'lr'"),),
    Case("get_into_a_number", "utils.config", ("--get", "train.lr.x"),
         ("--get train.lr.x: 'train.lr' is a float (0.01), not a section",)),
    Case("get_into_a_list", "utils.config", ("--get", "data.crop_size.0"),
         ("--get data.crop_size.0: 'data.crop_size' is a list ([33, 33])",)),
    Case("seed_beyond_64_bits", "train.py", ("seed=99999999999999999999999", OVER),
         ("'seed' must be an integer in [0, 2^63-1]", "99999999999999999999999")),
    Case("seed_two_to_the_63", "test.py", ("seed=9223372036854775808",), ("'seed'",)),
    Case("width_leaves_no_channels", "train.py", ("model.width=0.0001", OVER),
         ("model.width=0.0001 leaves layer", "with no channels"),),
    # launchers: a path that begins with '-', environment numbers that are not numbers
    Case("launch_exp_dir_option", LAUNCH_TRAIN, ("exp_dir=--version",), ("exp_dir='--version' begins with '-'",),
         absent="--version"),
    Case("launch_result_dir_option", LAUNCH_TEST, ("test.result_dir=-r",), ("test.result_dir='-r' begins with '-'",),
         absent="-r"),
    Case("launch_node_rank_command", LAUNCH_TRAIN, (), ("NODE_RANK must be a non-negative integer", "$(touch"),
         env=(("NODE_RANK", f"$(touch {{case}}/{MARKER})"),)),
    Case("launch_nnodes_word", LAUNCH_TRAIN, (), ("NNODES must be a non-negative integer, got 'two'",),
         env=(("NNODES", "two"),)),
    Case("launch_ngpu_fraction", LAUNCH_TEST, (), ("NGPU must be a non-negative integer, got '1.5'",),
         env=(("NGPU", "1.5"),)),
    Case("launch_master_port_word", LAUNCH_TRAIN, (), ("MASTER_PORT must be a non-negative integer, got 'http'",),
         env=(("MASTER_PORT", "http"),)),
    Case("launch_master_port_out_of_range", LAUNCH_TEST, (), ("MASTER_PORT must be a port number in 1..65535",
                                                            "'99999'"), env=(("MASTER_PORT", "99999"),)),
    Case("launch_node_rank_beyond_nnodes", LAUNCH_TEST, (), ("NODE_RANK=1 must be below NNODES=1",),
         env=(("NODE_RANK", "1"),)),
    # benchmark.py arguments, checked before anything is timed
    Case("benchmark_size_zero", "benchmark.py", ("--size", "0"), ("--size 0", "at least 8 pixels"), config=BENCH),
    Case("benchmark_threads_negative", "benchmark.py", ("--threads", "-1"), ("--threads must be >= 1, got -1",),
         config=BENCH),
    Case("benchmark_out_missing_folder", "benchmark.py", ("--out", "{case}/none/rows.json"),
         ("--out", "none/rows.json", "does not exist"), config=BENCH),
    # compare_curves.py: robustness.json holds fractions in [0, 1] or null
    Case("curves_nan", "tools/compare_curves.py", ("{case}/res", "--out", "{case}/c.png"),
         ("res/robustness.json", "attack 'pgd': point 1: 'mIoU' is nan"), prepare=curves("NaN")),
    Case("curves_infinity", "tools/compare_curves.py", ("{case}/res", "--out", "{case}/c.png"),
         ("res/robustness.json", "'mIoU' is inf"), prepare=curves("Infinity")),
    Case("curves_percent", "tools/compare_curves.py", ("{case}/res", "--out", "{case}/c.png"),
         ("'mIoU' is 12345", "not a fraction in [0, 1] or null"), prepare=curves("12345")),
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


def run_case(case: Case, base: Path, cfg: Path, earlier_exp: Path, data: str, servers: queue.Queue):
    """Copy the earlier run, prepare, snapshot, run the entry point, snapshot again; returns
    (result, snapshot before, snapshot after, whether the pickled payload ran). The case's copies
    are removed afterwards: each holds megabytes of checkpoints. A Python entry point run in the
    test's own environment runs as a fork of a `tests/preloaded.py` server from `servers`
    (torch already imported); launchers, faults and extra environment get a fresh process."""
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
    args = [*map(fill, case.args)]
    if case.script.endswith(".sh"):  # a launcher: its own config, overrides after it
        cmd = ["sh", case.script, f"exp_dir={exp}", f"data.root={data}", *args]
    elif case.script == "utils.config":
        cmd = [sys.executable, "-m", "utils.config", fill(case.config), *args]
    elif case.script == "benchmark.py":
        cmd = [sys.executable, case.script, "--config", fill(case.config), *args]
    elif case.script == "tools/compare_curves.py":
        cmd = [sys.executable, case.script, *args]
    else:
        runner = faults.runner(**dict(case.faults)) if case.faults else []
        cmd = [sys.executable, *runner, case.script, "--config", fill(case.config), f"exp_dir={exp}", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **{k: fill(v) for k, v in case.env})
    if cmd[0] == sys.executable and not case.env and not case.faults:
        server = servers.get()
        try:
            r = server.run(cmd, ROOT, env)
        finally:
            servers.put(server)
    else:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300, env=env)
    # decoded here: text mode would turn the progress bars' "\r" into line ends
    r.stdout, r.stderr = (b.decode("utf-8", "replace") for b in (r.stdout, r.stderr))
    after, code_ran = snapshot(exp), (folder / MARKER).exists()
    if case.absent:
        code_ran = code_ran or os.path.lexists(os.path.join(ROOT, fill(case.absent)))
    shutil.rmtree(folder)
    return r, before, after, code_ran


@pytest.fixture(scope="module")
def outcomes(request, earlier, tmp_path_factory, synthetic_root):
    """Every selected case, run two at a time."""
    cfg, earlier_exp = earlier
    base = tmp_path_factory.mktemp("cases")
    wanted = [it.callspec.params["case"] for it in request.session.items
              if it.module is sys.modules[__name__] and hasattr(it, "callspec") and "case" in it.callspec.params]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    servers: queue.Queue = queue.Queue()
    for _ in range(2):
        servers.put(Preloaded(str(tmp_path_factory.mktemp("streams")), env))
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            futures = {c.id: pool.submit(run_case, c, base, cfg, earlier_exp, synthetic_root, servers) for c in wanted}
            return {k: f.result() for k, f in futures.items()}
    finally:
        while not servers.empty():
            servers.get().close()


def message_lines(stderr: str) -> list:
    """The lines of `stderr` other than progress output. A line is split at newlines only: a line that
    holds a progress bar ("\\r"-redrawn) and a message is kept whole, so it fails the checks."""
    out = []
    for ln in stderr.split("\n"):
        pieces = [p.strip() for p in ln.split("\r") if p.strip()]
        if not all(TQDM.match(p) for p in pieces):
            out.append(ln)
    return out


def test_message_lines():
    bar = "\repoch 1/2:   0%|          | 0/4 [00:00<?, ?it/s]\r                    \r"
    assert message_lines(bar + "\nerror: x\n") == ["error: x"]
    assert message_lines(bar + "error: x\n") == [bar + "error: x"]  # sharing the bar's line: not alone
    assert message_lines("warning: y\nerror: x") == ["warning: y", "error: x"]


def test_preloaded_server_runs_a_script_as_a_fresh_process_does(tmp_path):
    """Exit code, stdout, stderr, working directory, environment and argv of a script run by the
    preloaded server equal those of `python script` for a normal end, sys.exit(code), sys.exit(message)
    and an uncaught exception; atexit handlers run."""
    script = tmp_path / "probe.py"
    script.write_text("import atexit, os, sys\n"
                      "atexit.register(lambda: print('bye'))\n"
                      "print(os.getcwd(), os.environ.get('PROBE'), sys.argv[1:], end=' ')\n"
                      "print('err', file=sys.stderr)\n"
                      "mode = sys.argv[1]\n"
                      "if mode == 'code': sys.exit(3)\n"
                      "if mode == 'message': sys.exit('error: stop')\n"
                      "if mode == 'raise': raise ValueError('boom')\n")
    env = dict(os.environ, PROBE="x")
    server = Preloaded(str(tmp_path), env)
    try:
        for mode, rc in (("end", 0), ("code", 3), ("message", 1), ("raise", 1)):
            cmd = [sys.executable, str(script), mode, "a b"]
            fresh = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True)
            forked = server.run(cmd, str(tmp_path), env)
            assert fresh.returncode == forked.returncode == rc, (mode, fresh, forked)
            assert fresh.stdout == forked.stdout == f"{tmp_path} x ['{mode}', 'a b'] bye\n".encode()
            if mode == "raise":
                assert b"Traceback" in forked.stderr and forked.stderr.endswith(b"ValueError: boom\n")
                assert fresh.stderr.splitlines()[-1] == forked.stderr.splitlines()[-1]
            else:
                assert fresh.stderr == forked.stderr
    finally:
        server.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, outcomes):
    r, before, after, code_ran = outcomes[case.id]
    assert r.returncode == case.rc, r.stderr[-3000:]
    lines = message_lines(r.stderr)
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
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
