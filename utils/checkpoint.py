"""Checkpoints: written atomically; every checkpoint or weights file (train.resume, test.checkpoint,
model.weights, model.pretrained) read by one function with weights_only=True; newest valid one found on resume.

A checkpoint holds: model, optimizer, scheduler, epoch (completed), iteration, rng, config, env (the
environment it was made in, `utils/env.py`; not required, older checkpoints lack it) (and `scaler` with
fp16 mixed precision). Files in ``<exp_dir>/model``: ``last.pth`` (newest),
``epoch_<E>.pth`` (every ``train.save_freq`` epochs) and ``iter_<I>.pth`` (every
``train.save_iter_freq`` iterations; only the newest two are kept).
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import shutil
import warnings
from typing import Any, List, Mapping, Optional, Tuple

from .atomic import fsync_folder, atomic_write, describe
from .errors import SetupError

REQUIRED = ("model", "optimizer", "scheduler", "epoch", "iteration", "rng", "config")


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically (`utils.atomic.atomic_write`): a kill, crash or full disk at any moment leaves
    either the previous file or the complete new one under `path`, never a truncated one."""
    import torch  # here, not at module level: the launch check (tools/preflight.py) reads folders without torch
    with atomic_write(path) as f:
        torch.save(state, f)


def first_sentence(e: BaseException) -> str:
    """'RuntimeError: PytorchStreamReader failed ...': the type and the first sentence, kept short."""
    text = " ".join(str(e).split()).split(". ")[0][:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def first_nonfinite(obj: Any, prefix: str = "") -> Optional[Tuple[str, str]]:
    """(dotted name, 'nan' or 'inf') of the first floating-point tensor in the nested dicts / lists
    `obj` that holds a NaN or an infinity; None when every one is finite."""
    import torch
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return prefix or "(the file itself)", "nan" if bool(torch.isnan(obj).any()) else "inf"
        return None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


def read_checkpoint(path: str, key: Optional[str] = None) -> Any:
    """The one reader of every checkpoint and weights file: ``torch.load(weights_only=True)`` on CPU.

    SetupError with one line, prefixed with the config `key` when given, if the file is missing, a
    folder, empty, truncated or not a PyTorch file, or holds pickled code (objects other than
    tensors and plain containers: such a file is refused and nothing of it is loaded), or holds a
    floating-point tensor with a NaN or an infinity (weights or optimiser state that can only give
    NaN predictions and metrics).
    """
    where = f"{key}: " if key else ""
    if os.path.isdir(path):
        raise SetupError(f"{where}{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise SetupError(f"{where}checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise SetupError(f"{where}cannot read {path}: the file is empty")
    import torch
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: our message says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise SetupError(f"{where}{path} holds code (pickled objects other than tensors"
                             + (f", e.g. {found.group(1)}" if found else "")
                             + "); refused: it was not loaded") from None
        raise SetupError(f"{where}cannot read {path}: truncated or not a PyTorch file ({first_sentence(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            UnicodeDecodeError) as e:  # what torch.load raises on a cut or foreign file
        raise SetupError(f"{where}cannot read {path}: truncated or not a PyTorch file ({first_sentence(e)})") from None
    bad = first_nonfinite(obj)
    if bad:
        raise SetupError(f"{where}{path}: tensor '{bad[0]}' holds non-finite values ({bad[1]}); refused")
    return obj


def load_weights_file(path: str, key: Optional[str] = None) -> dict:
    """A file of weights (a state dict, or a checkpoint holding one); see `read_checkpoint`."""
    obj = read_checkpoint(path, key)
    if not isinstance(obj, Mapping):
        raise SetupError(f"{key + ': ' if key else ''}{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def load_checkpoint(path: str, key: Optional[str] = None) -> dict:
    """One of our training checkpoints (`REQUIRED` keys); see `read_checkpoint`."""
    ckpt = read_checkpoint(path, key)
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SetupError(f"{key + ': ' if key else ''}{path} is not a training checkpoint of this project "
                         f"(missing {', '.join(missing)})")
    return ckpt


_NAME = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def checkpoint_progress(path: str, iters_per_epoch: int) -> Optional[int]:
    """The training iteration a file name stands for (epoch_E -> E * iters_per_epoch, iter_I -> I);
    None for other names (e.g. last.pth)."""
    m = _NAME.match(os.path.basename(path))
    if not m:
        return None
    n = int(m.group(2))
    return n * iters_per_epoch if m.group(1) == "epoch" else n


def list_checkpoints(folder: str, iters_per_epoch: int = 1) -> List[str]:
    """The .pth files of `folder`, newest first: last.pth, then epoch_/iter_ files by progress
    (then any other .pth by name). Temporary files of interrupted writes are not listed."""
    files = [p for p in glob.glob(os.path.join(folder, "*.pth")) if os.path.isfile(p)]

    def key(p: str) -> Tuple[int, int, str]:
        name = os.path.basename(p)
        if name == "last.pth":
            return (0, 0, name)
        prog = checkpoint_progress(p, iters_per_epoch)
        return (1, -prog, name) if prog is not None else (2, 0, name)
    return sorted(files, key=key)


def remove_stale_temporaries(folder: str) -> None:
    """Delete `*.pth.tmp.<pid>` leftovers of writes that were killed."""
    for p in glob.glob(os.path.join(folder, "*.pth.tmp.*")):
        try:
            os.remove(p)
        except OSError:
            pass


MODEL, NEXT, PREV = "model", "model.next", "model.prev"


def replace_model_dir(exp_dir: str, start: bool = False) -> str:
    """`train.overwrite`: the new run's checkpoints go to ``model.next/`` (`start`: returns that folder);
    once its first checkpoint is complete, ``model.next/`` becomes ``model/`` and the earlier run's
    files are removed (returns ``model/``). The earlier checkpoints are never deleted before the new
    one is safely on disk; `recover_model_dir` finishes a replacement that a kill interrupted."""
    model, nxt, prev = (os.path.join(exp_dir, d) for d in (MODEL, NEXT, PREV))
    try:
        if start:
            shutil.rmtree(nxt, ignore_errors=True)
            return nxt
        if os.path.isdir(model):
            os.replace(model, prev)
        os.replace(nxt, model)
        shutil.rmtree(prev, ignore_errors=True)
    except OSError as e:
        raise SetupError(f"train.overwrite: cannot replace {model} by {nxt}: {describe(e)}") from None
    fsync_folder(exp_dir)
    return model


def recover_model_dir(exp_dir: str) -> None:
    """Finish a `replace_model_dir` that was killed between its renames (model.next/ then holds a
    complete checkpoint of the new run), and drop the model.next/ of an overwriting run killed before
    its first checkpoint was complete (model/ still holds the earlier run)."""
    model, nxt, prev = (os.path.join(exp_dir, d) for d in (MODEL, NEXT, PREV))
    try:
        if os.path.isdir(prev):
            if not os.path.isdir(model):
                os.replace(nxt if os.path.isdir(nxt) else prev, model)
            shutil.rmtree(prev, ignore_errors=True)
        if os.path.isdir(nxt):
            shutil.rmtree(nxt)
    except OSError as e:
        raise SetupError(f"exp_dir {exp_dir}: cannot finish replacing {model} (train.overwrite): {describe(e)}") from None


def newest_valid(folder: str, iters_per_epoch: int, log=None) -> Optional[Tuple[str, dict]]:
    """(path, checkpoint) of the newest readable training checkpoint in `folder`; None when the
    folder holds no checkpoint, SetupError when it holds some but none is readable.

    last.pth first; if it cannot be read, the epoch_/iter_ checkpoint with the most progress.
    """
    files = list_checkpoints(folder, iters_per_epoch)
    first_error = ""
    for path in files:
        try:
            return path, load_checkpoint(path)
        except SetupError as e:
            first_error = first_error or str(e)
            if log is not None:
                log.warning(f"skipping unreadable checkpoint: {e}")
    if files:  # starting afresh would write over them
        raise SetupError(f"train.resume=auto: none of the {len(files)} checkpoint(s) in {folder} is readable "
                         f"({first_error}); resume from a good file with train.resume=PATH, or start afresh "
                         f"with train.resume=null train.overwrite=true")
    return None


def resolve_resume(resume: Optional[str], exp_dir: str, iters_per_epoch: int = 1,
                   log=None) -> Optional[Tuple[str, dict]]:
    """`train.resume`: null -> None; 'auto' -> the newest valid checkpoint in <exp_dir>/model
    (None when there is none, see `newest_valid`); else that path, which must be readable."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        return newest_valid(os.path.join(exp_dir, "model"), iters_per_epoch, log)
    return resume, load_checkpoint(resume, "train.resume")


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex)."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shared_resume(resume: Optional[str], exp_dir: str, iters_per_epoch: int = 1,
                  log=None) -> Optional[Tuple[str, dict]]:
    """`resolve_resume` on rank 0, which broadcasts its choice (path and sha256); every other process
    loads that file and checks its digest, so that all resume from the same bytes. A process that
    cannot read them stops every process with one line: the processes of one run must see exp_dir
    (and train.resume) on a shared file system. One process: `resolve_resume`."""
    from . import dist
    if not dist.is_dist():
        return resolve_resume(resume, exp_dir, iters_per_epoch, log)
    found, choice, error = None, None, None
    if dist.is_main():
        try:
            found = resolve_resume(resume, exp_dir, iters_per_epoch, log)
            choice = (found[0], file_digest(found[0])) if found else None
        except (SetupError, OSError) as e:
            error = str(e)
    dist.agree(error)
    choice = dist.broadcast_object(choice)
    problem = None
    if choice is not None and not dist.is_main():
        path, digest = choice
        try:
            if file_digest(path) != digest:
                problem = "holds other bytes there"
        except OSError as e:
            problem = f"cannot be read there ({describe(e)})"
        if problem:
            problem = (f"train.resume: rank 0 resumes from {path}, which on rank {dist.rank()} {problem}: every "
                       f"process of a run must see exp_dir and train.resume on a shared file system")
    dist.agree(problem)
    if choice is None or dist.is_main():
        return found
    return choice[0], load_checkpoint(choice[0], "train.resume")


def check_fresh_run(exp_dir: str, resume: Optional[str], overwrite: bool) -> None:
    """Refuse a fresh run (`resume` null) into an exp_dir whose model/ already holds checkpoints,
    unless `overwrite`: its files would be replaced one by one and mixed with the new run's."""
    if resume not in (None, "", False) or overwrite:
        return
    found = list_checkpoints(os.path.join(exp_dir, "model"))
    if found:
        names = ", ".join(os.path.basename(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise SetupError(f"exp_dir {exp_dir} already holds checkpoints of a run (model/: {names}): continue it "
                         f"with train.resume=auto, pick another exp_dir, or set train.overwrite=true to replace it")


def check_init_file(model_cfg: Mapping) -> None:
    """The file a fresh model starts from (`model.weights`, else `model.pretrained`, e.g. the robust ImageNet
    backbone of PIR-AT in initmodel/) must exist: a missing one is the reader's one-line error naming the
    key, raised before any data is read or process started (its contents are checked when it is loaded)."""
    key, path = ("model.weights", model_cfg["weights"]) if model_cfg["weights"] else \
        ("model.pretrained", model_cfg["pretrained"])
    if path and not os.path.exists(path):
        raise SetupError(f"{key}: checkpoint not found: {path}")
