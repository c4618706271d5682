"""Runtime pieces shared by training and evaluation: device, process group, loaders, batches."""
from __future__ import annotations

import random
from typing import Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from utils import dist
from utils.errors import SetupError
from utils.perf import keep_cpu_memory


def setup_runtime(cfg) -> torch.device:
    """Pick the device and join the process group (torchrun) if there is one. CPU runs keep freed
    memory for reuse (utils.perf.keep_cpu_memory)."""
    device = dist.select_device(cfg.device)
    if device.type == "cpu":
        keep_cpu_memory()
    dist.init_distributed(device, cfg.dist.timeout_min)
    return device


def amp_dtype(value, device: torch.device, key: str) -> Optional[torch.dtype]:
    """An amp setting (`train.amp`, `test.amp`) -> autocast dtype (None = fp32). fp16 needs a GPU."""
    if value in (None, False, "off", "none", "fp32"):
        return None
    if value == "bf16":
        return torch.bfloat16
    if value == "fp16":
        if device.type != "cuda":
            raise SetupError(f"{key}=fp16 needs a GPU; use {key}=bf16 on CPU")
        return torch.float16
    raise SetupError(f"{key} '{value}' unknown; valid: bf16, fp16, off")


def per_process_batch(global_batch: int, key: str) -> int:
    """Split a global batch across processes; refuse sizes that do not divide."""
    w = dist.world_size()
    if global_batch < 1 or global_batch % w:
        raise SetupError(f"{key}={global_batch} is not divisible by the number of processes ({w})", everywhere=True)
    return global_batch // w


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy from it so no two
    # workers share a stream (augmentation itself is seeded per sample, see datasets/list_dataset.py)
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, sampler: Optional[Sampler] = None,
                drop_last: bool = False, collate_fn: Optional[Callable] = None) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                      generator=g, collate_fn=collate_fn)


def _shapes(sample: dict) -> tuple:
    """Every tensor shape of a sample (nested dicts included), the key images are grouped by."""
    out = []
    for k in sorted(sample):
        v = sample[k]
        if isinstance(v, torch.Tensor):
            out.append((k, tuple(v.shape)))
        elif isinstance(v, dict):
            out.append((k, _shapes(v)))
    return tuple(out)


def group_collate(samples: List[dict]) -> List[dict]:
    """Evaluation batches of images of different sizes: a list of sub-batches, each stacking the
    samples whose image, label and target shapes all agree (in order of first appearance).

    Nothing is padded, so no padding pixel is ever scored or attacked, and a model sees each
    image as it would alone (batch-independent outputs in eval mode).
    """
    groups: dict = {}
    for s in samples:
        groups.setdefault(_shapes(s), []).append(s)
    return [default_collate(g) for g in groups.values()]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way: ``skip(n)`` drops the first n indices of
    this process's order for the current epoch only, so a run resumed mid-epoch sees exactly the
    batches it had not yet trained on, without loading and discarding the others."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._skip = 0

    def skip(self, n: int) -> None:
        """Leave out the first `n` indices of the next iteration (call after ``set_epoch``)."""
        self._skip = n

    def __iter__(self):
        indices = list(super().__iter__())[self._skip:]
        self._skip = 0  # one partial epoch only; later epochs are whole
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self._skip


def train_sampler(dataset: Dataset, seed: int) -> ResumableSampler:
    """Shuffled, sharded by rank (also with one process), reshuffled by ``set_epoch``."""
    return ResumableSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                            seed=seed, drop_last=True)


def channels_last(batch: dict) -> dict:
    """The batch with its 4-d image tensor in channels_last memory format."""
    x = batch.get("image")
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        batch = dict(batch, image=x.contiguous(memory_format=torch.channels_last))
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a (possibly nested) batch dict to `device`."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        else:
            out[k] = v
    return out

