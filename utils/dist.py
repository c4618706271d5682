"""Distributed helpers in one place (torchrun / env:// rendezvous; gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import SetupError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def restart_count() -> int:
    """How often torchrun has restarted this job's processes (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)


def select_device(name: str) -> torch.device:
    """`device` config: auto | cpu | cuda; with several processes each takes cuda:LOCAL_RANK.

    Several processes on a node without GPUs run on CPU (gloo) only with ``device: cpu``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))) > 1:
            # several processes per node without a GPU is almost always a mistake (NGPU on a CPU node);
            # CPU (gloo) processes must be asked for explicitly
            raise SetupError("several processes per node but no GPU is visible; set device=cpu to run them on CPU")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("device: cuda requested but no GPU is visible")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise SetupError(f"process LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    if name != "cpu":
        raise SetupError(f"device must be auto, cpu or cuda, got '{name}'")
    return torch.device("cpu")


PARENT_POLL_SECONDS = 1.0
_watching = False


def exit_with_parent(poll: float = PARENT_POLL_SECONDS) -> None:
    """End this process soon after its parent dies (a daemon thread polls the parent pid).

    torchrun starts every rank in a session of its own, so when the launcher itself is killed
    (SIGKILL, OOM killer) nothing would stop the ranks: they would go on training and writing
    checkpoints. Checkpoints are written atomically, so exiting at any moment leaves no partial file.
    """
    global _watching
    if _watching:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != parent:  # re-parented: the launcher is gone
                try:
                    print(f"error: the launcher (pid {parent}) has ended; stopping rank {rank()}", file=sys.stderr,
                          flush=True)
                finally:
                    os._exit(1)
            time.sleep(poll)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def init_distributed(device: torch.device, timeout_min: float = 60.0) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise.
    A collective that waits longer than `timeout_min` minutes for another rank fails (``dist.timeout_min``;
    NCCL's own default, 10 minutes, would stop a job whose ranks finish an evaluation far apart).
    Such a process also ends when its launcher dies (`exit_with_parent`)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        exit_with_parent()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_min))


def agree(error: Optional[str]) -> None:
    """Every process passes its problem (None if none); if any has one, every process raises the
    first one (lowest rank) as a SetupError, so that no process goes on alone into a collective."""
    if not is_dist():
        if error:
            raise SetupError(error)
        return
    errors: List[Optional[str]] = [None] * world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise SetupError(first, everywhere=True)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where `t` must be for a collective: NCCL moves CUDA tensors only, so CPU tensors (counts,
    timings) travel through this process's GPU."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes (on a copy, returned on `t`'s device)."""
    if not is_dist():
        return t
    r = t.to(_comm_device(t), copy=True)
    dist.all_reduce(r)
    return r.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate row blocks of different lengths from every process, in rank order (on `t`'s device)."""
    if not is_dist():
        return t
    dev = _comm_device(t)
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    x = t.to(dev)
    pad = x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))
    out: List[torch.Tensor] = [x.new_zeros((m,) + tuple(x.shape[1:])) for _ in sizes]
    dist.all_gather(out, torch.cat([x, pad]))
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)]).to(t.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / compiled wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
