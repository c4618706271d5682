"""Where a run writes, without importing torch: the entry point takes its folder's lock
(`utils/folder_lock.py`) before anything else loads.

A training run writes into ``exp_dir``; an evaluation into its result folder, ``test.result_dir``
(default ``<exp_dir>/result``), which it replaces as a whole when it has finished (staged in
``<result>.partial`` next to it; see `engine/eval_resume.py`). A result folder that is a symbolic
link is followed: the folder it points to gets the new results and the link stays.
"""
from __future__ import annotations

import os

from utils.folder_lock import FolderLock, check_folder

STAGING_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
TRAIN_LOCK = "train.lock"


def result_dir(cfg) -> str:
    """Where test.py's results end up: ``test.result_dir``, by default ``<exp_dir>/result`` (shard i of n:
    ``<exp_dir>/result-shard<i>of<n>``); a symbolic link is resolved, so that publishing replaces the
    folder it points to, not the link."""
    default = "result" if not cfg.test.shard else "result-shard{}of{}".format(*cfg.test.shard)
    path = os.path.normpath(cfg.test.result_dir or os.path.join(cfg.exp_dir, default))
    return os.path.realpath(path) if os.path.islink(path) else path


def staging_dir(cfg) -> str:
    """Where a running evaluation writes: ``<result>.partial``."""
    return result_dir(cfg) + STAGING_SUFFIX


def output_lock(kind: str, cfg) -> FolderLock:
    """The lock of the folder a `kind` ("train" | "test") run writes into; checks that the folder
    is a folder (or absent) first."""
    if kind == "train":
        check_folder(cfg.exp_dir, "exp_dir")
        return FolderLock(os.path.join(cfg.exp_dir, TRAIN_LOCK), f"exp_dir {cfg.exp_dir}")
    check_folder(cfg.exp_dir, "exp_dir")
    folder = result_dir(cfg)
    check_folder(folder, "test.result_dir")
    return FolderLock(folder + LOCK_SUFFIX, f"result folder {folder}")
