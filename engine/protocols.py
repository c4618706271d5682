"""Evaluation protocols (test.protocol): how an image is predicted, clean and under attack.

- ``whole`` (recommended): one adversarial image per input, attacked through the same inference
  that is evaluated (whole image, or the differentiable sliding window when ``test.crop_size`` is set).
- ``semseg``: the DDC-AT / semseg reproduction (ddcat.md §5): sliding window with stride 2/3 of the
  crop, flip averaging for the clean run, and each window attacked independently with its own labels.
  No single adversarial image exists, so this is weaker than ``whole``; use it only to reproduce.
- ``sea``: SEA's protocol (sea.md §3): short side to the crop size and centre crop (done by the
  dataset's ``data.eval_transform: sea``), whole-image inference, no flip.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attacks import Attack
from models.inference import merge_windows, slide_inference, split_windows
from utils.errors import SetupError

PROTOCOLS = ("whole", "semseg", "sea")
EVAL_TRANSFORM = {"semseg": "semseg", "sea": "sea"}  # data.eval_transform each protocol needs


class Protocol:
    """``predict(x)`` -> clean scores [B,C,H,W]; ``attacked(attack, x, y)`` -> (scores, x_adv or None)."""

    def __init__(self, model: nn.Module, forward: Callable):
        self.model, self.forward = model, forward

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def attacked(self, attack: Attack, x: torch.Tensor, y) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x_adv = attack(self.forward, x, y)
        with torch.no_grad():
            return self.forward(x_adv), x_adv


class SemsegProtocol(Protocol):
    def __init__(self, model: nn.Module, crop, stride, flip: bool, ignore: int):
        super().__init__(model, model)
        self.crop, self.stride, self.flip, self.ignore = crop, stride, flip, ignore

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xs, _, grid = split_windows(x, self.crop, self.stride)
        p = F.softmax(self.model(xs), 1)
        if self.flip:  # test-time flip averaging, clean run only (as the reference)
            p = (p + F.softmax(self.model(xs.flip(-1)), 1).flip(-1)) / 2
        return merge_windows(p, grid)

    def attacked(self, attack: Attack, x: torch.Tensor, y: torch.Tensor):
        xs, ys, grid = split_windows(x, self.crop, self.stride, y=y, ignore=self.ignore)
        xs_adv = attack(self.model, xs, ys)  # every window on its own, labels padded with ignore
        with torch.no_grad():
            return merge_windows(F.softmax(self.model(xs_adv), 1), grid), None


def build_protocol(cfg, model: nn.Module) -> Protocol:
    """The protocol named by ``test.protocol``; checks it matches ``data.eval_transform``."""
    t = cfg.test
    if t.protocol not in PROTOCOLS:
        raise SetupError(f"test.protocol '{t.protocol}' unknown; valid: {', '.join(PROTOCOLS)}")
    need = EVAL_TRANSFORM.get(t.protocol)
    if need and cfg.data.eval_transform != need:
        raise SetupError(f"test.protocol {t.protocol} needs data.eval_transform: {need} "
                         f"(got '{cfg.data.eval_transform}')")
    crop = t.crop_size
    stride = None if crop is None else [max(1, math.ceil(c * t.stride_rate)) for c in crop]
    if t.protocol == "semseg":
        if crop is None:
            raise SetupError("test.protocol semseg needs test.crop_size (the sliding window, e.g. [473, 473])")
        return SemsegProtocol(model, crop, stride, t.flip, cfg.data.ignore_label)
    if crop is not None and t.protocol == "whole":
        return Protocol(model, partial(slide_inference, model, crop=crop, stride=stride))
    return Protocol(model, model)
