"""Training checkpoints: written atomically, read with weights_only=True.

A checkpoint holds: model, optimizer, scheduler, epoch (completed), iteration, rng, config.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import torch

from .errors import SetupError

REQUIRED = ("model", "optimizer", "scheduler", "epoch", "iteration", "rng", "config")


def save_checkpoint(state: dict, path: str) -> None:
    """Write to a temporary file and rename, so a kill never leaves a truncated checkpoint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Read one of our training checkpoints; SetupError if missing, unreadable or incomplete."""
    if not os.path.isfile(path):
        raise SetupError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise SetupError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise SetupError(f"{path} is not a training checkpoint of this project (missing {', '.join(missing)})")
    return ckpt


def resolve_resume(resume: Optional[str], exp_dir: str) -> Optional[str]:
    """`train.resume`: null -> None; 'auto' -> model/last.pth if present; else the path (must exist)."""
    if resume in (None, "", False):
        return None
    if resume == "auto":
        last = os.path.join(exp_dir, "model", "last.pth")
        return last if os.path.isfile(last) else None
    if not os.path.isfile(resume):
        raise SetupError(f"train.resume: checkpoint not found: {resume}")
    return resume
