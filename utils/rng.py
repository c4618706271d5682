"""Seeding and RNG state capture, so a resumed run continues with the same random streams.

Which draws depend on what (docs/scale.md): model initialisation comes from ``seed`` alone (the same on
every process); the data order from ``seed`` and the epoch (split over processes by the sampler);
augmentation and attack starts from ``seed`` and the image; the stochastic layers (Dropout, Dropout2d,
DropPath) from ``seed``, the process rank and the iteration (``seed_layers``), so every process draws
its own masks and a resumed run draws the masks an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def layer_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of the stochastic layers' draws of one process in one training iteration."""
    blob = f"{seed}|layers|{rank}|{iteration}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def seed_layers(seed: int, rank: int, iteration: int) -> None:
    """Seed torch's global generator (CPU and GPUs), which Dropout and DropPath draw from, for this
    process and iteration: other masks on every process, the same ones after a resume."""
    torch.manual_seed(layer_seed(seed, rank, iteration))


def get_rng_state() -> dict:
    """RNG states as plain tensors/ints (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `get_rng_state` captured."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
