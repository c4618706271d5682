"""The environment a run was made in, as plain data: Python, platform, torch and its build (CPU/CUDA/ROCm,
cuDNN), the CPU capability torch dispatches to, GPU names, the installed version of every package of
``requirements.lock`` (and which differ from it), the git commit and whether the checkout had changes.

Checkpoints and ``metrics.json`` record it as ``env``; ``tools/env_report.py`` prints it (docs/environment.md).
Only str/int/float/bool/None/list/dict, so checkpoints stay loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, "requirements.lock")


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): 'PyYAML' -> 'pyyaml', 'typing_extensions' ->
    'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label: '2.13.0+cpu' -> '2.13.0' (torch's build is not locked)."""
    return version.split("+", 1)[0]


def read_lock(path: str = LOCK) -> Dict[str, str]:
    """{canonical name: version} of the ``name==version`` lines of a lock file; {} when there is none.
    Other lines are skipped rather than refused: the record must never stop a run (tests/test_env.py
    checks that the lock names every package it should)."""
    pins = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return pins
    for line in lines:
        name, sep, version = line.split("#", 1)[0].partition("==")
        if sep and name.strip() and version.strip():
            pins[canonical_name(name.strip())] = version.strip()
    return pins


def installed_version(name: str) -> Optional[str]:
    """The installed version of distribution `name`, None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return None
    return r.stdout if r.returncode == 0 else None


def git_state() -> Dict[str, object]:
    """{"commit": sha or None, "dirty": bool or None}: None outside a git checkout or without git.
    Dirty means tracked files differ from the commit (untracked files such as new configs do not count)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def torch_state() -> Dict[str, object]:
    """torch's version and build, the CPU capability its kernels use and the visible GPUs' names."""
    try:
        import torch
    except Exception as e:  # a broken install is what a bug report may be about: say so, report the rest
        return {"error": f"import torch failed: {type(e).__name__}: {e}"}
    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build = f"cuda {cuda}" if cuda else f"rocm {hip}" if hip else "cpu"
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a CUDA build whose cuDNN library cannot be loaded
        cudnn = None
    gpus = []
    if torch.cuda.is_available():  # initialises CUDA, as saving a checkpoint's RNG states does (utils/rng.py)
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"version": torch.__version__, "build": build, "cuda": cuda, "hip": hip, "cudnn": cudnn,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpus": gpus}


def _plain(value):
    """`value` in built-in types only: torch.load(weights_only=True) refuses subclasses such as
    torch.__version__'s TorchVersion (a str), so they become their base type (anything else: str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (type(None), bool, int, float, str):
        if isinstance(value, kind):
            return value if kind is type(None) else kind(value)
    return str(value)


@functools.lru_cache(maxsize=1)
def _record() -> dict:
    lock = read_lock()
    torch_info = torch_state()
    gpus = torch_info.pop("gpus", [])
    packages = {name: installed_version(name) for name in sorted(lock)}
    differs = {name: {"locked": lock[name], "installed": v} for name, v in packages.items()
               if v is None or public_version(v) != lock[name]}
    return _plain({"python": platform.python_version(), "implementation": platform.python_implementation(),
                   "platform": platform.platform(), "torch": torch_info, "gpus": gpus, "packages": packages,
                   "differs_from_lock": differs, "git": git_state()})


def env_record() -> dict:
    """The record (module docstring). Collected once per process (git and package metadata are read
    on the first call), so later checkpoints cost nothing; each call returns a copy."""
    return copy.deepcopy(_record())
