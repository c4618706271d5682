"""Multitask samples: one image, several dense targets with per-pixel validity masks.

A sample is a dict::

    {"image":   [3,H,W] float RGB in [0,1],
     "label":   [H,W] long, the segmentation target (255 = ignore; all 255 when no segmentation task),
     "targets": {task: [H,W] long (segmentation) or [C,H,W] float (dense tasks)},
     "masks":   {task: [1,H,W] float, 1 where the target is valid (segmentation: label != 255)},
     "index":   int}

Losses use ``targets`` and ``masks``; single-task code keeps working on ``image`` / ``label``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.errors import SetupError

# reader(item) -> (target HxW int (segmentation) or HxWxC float, mask HxW float or None = all valid)
Reader = Callable[[Dict[str, str]], Tuple[np.ndarray, Optional[np.ndarray]]]
SEG_TASK = "segmentsemantic"
AUTOENCODER = "autoencoder"  # the target is the (augmented) input image itself


class MultiTaskDataset(Dataset):
    """`items` are dicts of paths ({"image": ..., <task>: ...}); `readers` turn an item into a task target."""

    def __init__(self, items: List[Dict[str, str]], tasks: Sequence[str], read_image: Callable[[str], np.ndarray],
                 readers: Dict[str, Reader], classes: int, ignore_label: int = 255,
                 transform: Optional[Callable] = None, seed: int = 0):
        self.items, self.tasks, self.read_image, self.readers = items, list(tasks), read_image, readers
        self.classes, self.ignore_label, self.transform, self.seed, self.epoch = classes, ignore_label, transform, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def name(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.items[index]["image"]))[0]

    def _check_label(self, lbl: np.ndarray, path: str) -> None:
        bad = ((lbl >= self.classes) & (lbl != self.ignore_label)) | (lbl < 0)
        if bad.any():
            raise SetupError(f"label {path} has values {sorted(np.unique(lbl[bad]).tolist())[:5]} "
                             f"outside 0..{self.classes - 1} and not {self.ignore_label}")

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        img = self.read_image(item["image"])
        maps: List[Tuple[np.ndarray, str]] = [(img, "image")]
        slots: List[Tuple[str, str]] = []  # (task, "target" | "mask") for maps[1:]
        for task in self.tasks:
            if task == AUTOENCODER:
                continue
            target, mask = self.readers[task](item)
            if target.shape[:2] != img.shape[:2]:
                raise SetupError(f"{task} target {item[task]} is {target.shape[1]}x{target.shape[0]} but its image "
                                 f"{item['image']} is {img.shape[1]}x{img.shape[0]}")
            if task == SEG_TASK:
                self._check_label(target, item[task])
                maps.append((target.astype(np.int32), "label"))
            else:
                maps.append((target.astype(np.float32), "dense"))
            slots.append((task, "target"))
            if task != SEG_TASK:  # explicit all-ones mask so padding by the transform is marked invalid
                mask = np.ones(img.shape[:2], np.float32) if mask is None else mask
                maps.append((mask.astype(np.float32), "mask"))
                slots.append((task, "mask"))
        if self.transform is not None:
            arrays = self.transform(maps, np.random.default_rng([self.seed, self.epoch, index]))
        else:
            arrays = [a for a, _ in maps]
        img = np.ascontiguousarray(arrays[0])
        h, w = img.shape[:2]
        targets: Dict[str, torch.Tensor] = {}
        masks: Dict[str, torch.Tensor] = {}
        for (task, slot), a in zip(slots, arrays[1:]):
            a = np.ascontiguousarray(a)
            if slot == "mask":
                masks[task] = torch.from_numpy(a).float()[None]
            elif task == SEG_TASK:
                targets[task] = torch.from_numpy(a).long()
                masks[task] = (targets[task] != self.ignore_label).float()[None]
            else:
                targets[task] = torch.from_numpy(a if a.ndim == 3 else a[..., None]).permute(2, 0, 1).float()
        image = torch.from_numpy(img.transpose(2, 0, 1).copy())
        for task in self.tasks:
            if task == AUTOENCODER:
                targets[task] = image.clone()
            masks.setdefault(task, torch.ones(1, h, w))
        label = targets.get(SEG_TASK, torch.full((h, w), self.ignore_label, dtype=torch.long))
        return {"image": image, "label": label, "targets": targets, "masks": masks, "index": index}


def check_tasks(tasks: Sequence[str], valid: Sequence[str], dataset: str) -> List[str]:
    """Validate ``data.tasks`` and return them in the dataset's fixed order (MTRobust builds them that way)."""
    for t in tasks:
        if t not in valid:
            raise SetupError(f"data.tasks: '{t}' is not a {dataset} task; valid: {', '.join(valid)}")
    if len(set(tasks)) != len(tasks):
        raise SetupError(f"data.tasks lists a task twice: {list(tasks)}")
    return [t for t in valid if t in tasks]
