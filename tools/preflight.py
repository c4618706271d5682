"""Checks a launch before any process starts; prints the experiment folder on success.

``python tools/preflight.py train|test CONFIG NPROC NNODES [section.key=value ...]``

One-line error and exit code 2 when: the config is invalid, more processes per node than
visible GPUs are asked for (or several processes on a node without GPUs, unless ``device=cpu``),
a global batch size does not divide by the number of processes, ``train.resume``, ``model.weights``
or ``model.pretrained`` names a file that does not exist, or a fresh training run would write into
an exp_dir that already holds checkpoints (see ``train.overwrite``), the training method or an
attack (``train.attack``, ``test.attacks``) is unknown or given options it does not take, the run's
output folder is held by another run (``utils/folder_lock.py``), or a path (the config, or a config
key that names a file or folder) begins with ``-`` (it would reach a command as an option). Used by
tools/launch.sh, so that such a launch fails once, before torchrun starts any process.
"""
from __future__ import annotations

import os
import sys
from typing import List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.paths import output_lock  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.folder_lock import is_held  # noqa: E402


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# config keys that name a file or folder
PATH_KEYS = ("exp_dir", "data.root", "model.pretrained", "model.weights", "train.resume", "test.checkpoint",
             "test.result_dir")


def check_paths(config: str, cfg) -> None:
    """A path that begins with '-' is refused: the launcher hands exp_dir to mkdir and tee."""
    if config.startswith("-"):
        raise SetupError(f"config path '{config}' begins with '-'; write ./{config} if that is its name")
    for key in PATH_KEYS:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if isinstance(node, str) and node.startswith("-"):
            raise SetupError(f"{key}='{node}' begins with '-' (a path, not an option); write ./{node} if that is "
                             "its name")


def check_attacks(kind: str, cfg) -> None:
    """Build the training method (and its attack) or every evaluation attack at each eps: unknown
    names and options they do not take are refused as the run would refuse them."""
    if kind == "train":
        from defenses import build_defense
        build_defense(cfg)
        return
    from attacks import build_attack
    from attacks.ensemble import expand_attacks
    from attacks.transfer import check_sources
    for group in expand_attacks(cfg.test.attacks):
        for label, name, opts in group.members:
            if name == "transfer":  # the run loads its source model (engine/evaluator.py); a stand-in here
                check_sources(label, opts)
                opts = dict(opts, source_forward=lambda x: x)
            for eps in cfg.test.eps:
                build_attack(name, seed=cfg.seed, label=label, eps=eps, **opts)


def check(kind: str, config: str, nproc: int, nnodes: int, overrides: Sequence[str]) -> str:
    """Validate the launch; returns exp_dir. Raises SetupError with a one-line message."""
    if kind not in ("train", "test"):
        raise SetupError(f"launch kind must be train or test, got '{kind}'")
    if nproc < 1 or nnodes < 1:
        raise SetupError(f"NGPU ({nproc}) and NNODES ({nnodes}) must be at least 1")
    cfg = load_config(config, overrides)
    check_paths(config, cfg)
    if cfg.device != "cpu":
        gpus = visible_gpus()
        if gpus == 0 and (cfg.device == "cuda" or nproc > 1):
            raise SetupError(f"NGPU={nproc} but no GPU is visible; add device=cpu to run {nproc} CPU process(es)"
                             if cfg.device == "auto" else "device=cuda but no GPU is visible")
        if gpus and nproc > gpus:
            raise SetupError(f"NGPU={nproc} but only {gpus} GPU(s) are visible"
                             + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                                if "CUDA_VISIBLE_DEVICES" in os.environ else ""))
    world = nproc * nnodes
    batches: List[str] = ["train.batch_size"] + (["train.val_batch_size"] if cfg.train.eval_freq else []) \
        if kind == "train" else ["test.batch_size"]
    for key in batches:
        section, name = key.split(".")
        value = cfg[section][name]
        if value % world:
            raise SetupError(f"{key}={value} is not divisible by the number of processes "
                             f"({nproc} per node x {nnodes} node(s) = {world})")
    resume = cfg.train.resume
    if kind == "train":
        from utils.checkpoint import check_fresh_run, check_init_file
        if resume not in (None, "", False, "auto") and not os.path.isfile(resume):
            raise SetupError(f"train.resume: checkpoint not found: {resume}")
        check_fresh_run(cfg.exp_dir, resume, cfg.train.overwrite)
        check_init_file(cfg.model)
    check_attacks(kind, cfg)
    lock = output_lock(kind, cfg)  # a run holding the folder refuses this one before any process starts
    holder = is_held(lock.path)
    if holder:
        raise SetupError(f"{lock.what} is in use by {holder}; wait for it to end or choose another folder")
    return cfg.exp_dir


def main(argv: Sequence[str]) -> int:
    if len(argv) < 4:
        print("usage: python tools/preflight.py train|test CONFIG NPROC NNODES [overrides]", file=sys.stderr)
        return 2
    try:
        print(check(argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4:]))
        return 0
    except ValueError:
        print(f"error: NGPU and NNODES must be integers, got '{argv[2]}' and '{argv[3]}'", file=sys.stderr)
        return 2
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
