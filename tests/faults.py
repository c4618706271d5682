"""Faults injected from the test side: a NaN loss, SIGKILL at a training iteration, inside a checkpoint
write or after an evaluation batch, per-image counts written after every batch.

In the test process, with pytest's monkeypatch (undone after the test)::

    faults.nan_at_iter(5, monkeypatch.setattr)

In a child process, as the runner in front of an entry point (also as torchrun's script)::

    python tests/faults.py --kill-at-iter 3 --nan-at-iter 5 -- train.py --config ... [key=value ...]

The runner patches each module right after the entry point first imports it (torch and the models
still load only once the config has been validated) and runs the entry point as ``__main__``.
The kills are hard stops (SIGKILL): no handler, no cleanup, like a killed machine.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import runpy
import shlex
import signal
import sys
from typing import Callable, Dict, List

SetAttr = Callable[[object, str, object], None]
HERE = os.path.abspath(__file__)


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _module(name: str):
    return sys.modules.get(name) or importlib.import_module(name)


def nan_at_iter(n: int, setattr: SetAttr = setattr) -> None:
    """Make every loss of the (1-based) iteration `n` NaN where the trainer checks it (`_optimize`), so
    its own non-finite handling (stop, or skip with train.skip_nonfinite) runs."""
    trainer = _module("engine.trainer").Trainer
    optimize = trainer._optimize

    def _optimize(self, loss, phase=None):
        if self.iteration + 1 == n:
            loss = loss * float("nan")
        return optimize(self, loss, phase)

    setattr(trainer, "_optimize", _optimize)


def kill_at_iter(n: int, setattr: SetAttr = setattr) -> None:
    """SIGKILL at the end of the (1-based) iteration `n`, after its iteration checkpoint (if any) and
    before an epoch's end checkpoint; a job that torchrun has restarted goes on."""
    trainer = _module("engine.trainer").Trainer
    maybe_save_iter = trainer.maybe_save_iter

    def wrapped(self) -> None:
        maybe_save_iter(self)
        from utils import dist
        if self.iteration == n and not dist.restart_count():
            _sigkill()

    setattr(trainer, "maybe_save_iter", wrapped)


class _KillAfter:
    """File wrapper that SIGKILLs the process once `limit` bytes have reached the disk."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.n = f, limit, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.n += n
        if self.n >= self.limit:
            self.f.flush()
            os.fsync(self.f.fileno())
            _sigkill()
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def kill_in_save(n: int, setattr: SetAttr = setattr) -> None:
    """SIGKILL inside the `n`-th `save_checkpoint` call of this process, once 4096 bytes of its
    temporary file are on disk. Install before a module binds `save_checkpoint` by name (the runner
    does); modules that already hold it are patched too."""
    ckpt = _module("utils.checkpoint")
    original, calls = ckpt.save_checkpoint, [0]

    def save_checkpoint(state: dict, path: str) -> None:
        calls[0] += 1
        if calls[0] != n:
            return original(state, path)
        atomic_write = ckpt.atomic_write

        @contextlib.contextmanager
        def cut_short(*args, **kwargs):
            with atomic_write(*args, **kwargs) as f:
                yield _KillAfter(f, 4096)

        ckpt.atomic_write = cut_short  # for this one call: the body of save_checkpoint stays the real one
        try:
            original(state, path)
        finally:
            ckpt.atomic_write = atomic_write

    for module in list(sys.modules.values()):
        if (getattr(module, "__dict__", None) or {}).get("save_checkpoint") is original:
            setattr(module, "save_checkpoint", save_checkpoint)


def kill_at_eval_batch(n: int, setattr: SetAttr = setattr) -> None:
    """SIGKILL right after the `n`-th batch of an evaluation (its counts written if a write was due)."""
    progress = _module("engine.eval_resume").EvalProgress
    on_batch = progress.on_batch

    def wrapped(self, stats) -> None:
        on_batch(self, stats)
        if self.batches == n:
            _sigkill()

    setattr(progress, "on_batch", wrapped)


def eval_flush_seconds(seconds: float, setattr: SetAttr = setattr) -> None:
    """Seconds between two writes of an evaluation's per-image counts (0: after every batch)."""
    setattr(_module("engine.eval_resume"), "FLUSH_SECONDS", float(seconds))


# option: (module the fault patches, function, type of its value)
FAULTS = {
    "nan-at-iter": ("engine.trainer", nan_at_iter, int),
    "kill-at-iter": ("engine.trainer", kill_at_iter, int),
    "kill-in-save": ("utils.checkpoint", kill_in_save, int),
    "kill-at-eval-batch": ("engine.eval_resume", kill_at_eval_batch, int),
    "eval-flush-seconds": ("engine.eval_resume", eval_flush_seconds, float),
}


def runner(**faults) -> List[str]:
    """``[tests/faults.py, --option, value, ..., --]`` for the keyword faults (``kill_at_iter=3``):
    put it between the interpreter and the entry point."""
    args = [HERE]
    for key, value in faults.items():
        if key.replace("_", "-") not in FAULTS:
            raise TypeError(f"unknown fault {key!r}; known: {', '.join(FAULTS)}")
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args + ["--"]


def launcher_python(folder: str, **faults) -> str:
    """Write ``<folder>/python``, an interpreter for tools/launch.sh (its PYTHON) that runs the entry
    point (the first ``train.py`` / ``test.py`` argument, also torchrun's script) under the runner
    with these faults; every other command (the launch check, torchrun itself) runs unchanged."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "python")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                "wrapped=\n"
                "for a do\n"
                "    shift\n"
                "    if [ -z \"$wrapped\" ] && { [ \"$a\" = train.py ] || [ \"$a\" = test.py ]; }; then\n"
                f"        set -- \"$@\" {' '.join(map(shlex.quote, runner(**faults)))} \"$a\"\n"
                "        wrapped=1\n"
                "    else\n"
                "        set -- \"$@\" \"$a\"\n"
                "    fi\n"
                "done\n"
                f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    os.chmod(path, 0o755)
    return path


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs the patches of a module right after its first import has executed it."""

    def __init__(self, pending: Dict[str, List[Callable[[], None]]]):
        self.pending = pending

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patches = spec.loader.exec_module, self.pending.pop(name)

        def run(module) -> None:
            exec_module(module)
            for patch in patches:
                patch()

        spec.loader.exec_module = run  # (this spec's own loader object)
        return spec


def main(argv: List[str]) -> None:
    """``faults.py [--fault value ...] -- SCRIPT [ARG ...]``: run SCRIPT as ``python SCRIPT ARG ...``
    would, with the faults installed."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise SystemExit("usage: faults.py [--fault value ...] -- SCRIPT [ARG ...]")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="faults.py")
    for option, (_, _, kind) in FAULTS.items():
        parser.add_argument(f"--{option}", type=kind)
    args = vars(parser.parse_args(argv[:cut]))
    pending: Dict[str, List[Callable[[], None]]] = {}
    for option, (module, install, _) in FAULTS.items():
        value = args[option.replace("-", "_")]
        if value is not None:
            pending.setdefault(module, []).append(lambda install=install, value=value: install(value))
    script = argv[cut + 1]
    sys.argv = argv[cut + 1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` has it, not tests/
    sys.meta_path.insert(0, _PatchAfterImport(pending))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
