"""Runtime pieces shared by training and evaluation: device, process group, loaders, batches."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils import dist
from utils.errors import SetupError


def setup_runtime(cfg) -> torch.device:
    """Pick the device and join the process group (torchrun) if there is one."""
    device = dist.select_device(cfg.device)
    dist.init_distributed(device)
    return device


def per_process_batch(global_batch: int, key: str) -> int:
    """Split a global batch across processes; refuse sizes that do not divide."""
    w = dist.world_size()
    if global_batch < 1 or global_batch % w:
        raise SetupError(f"{key}={global_batch} is not divisible by the number of processes ({w})")
    return global_batch // w


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy from it so no two
    # workers share a stream (augmentation itself is seeded per sample, see datasets/list_dataset.py)
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, workers: int, seed: int, sampler: Optional[Sampler] = None,
                drop_last: bool = False) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init,
                      generator=g)


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """Shuffled, sharded by rank (also with one process), reshuffled by ``set_epoch``."""
    return DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                              seed=seed, drop_last=True)


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

