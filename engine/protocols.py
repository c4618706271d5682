"""Evaluation protocols (test.protocol): how an image is predicted, clean and under attack.

- ``whole`` (recommended): one adversarial image per input, attacked through the same inference
  that is evaluated (whole image, or the differentiable sliding window when ``test.crop_size`` is set).
- ``semseg``: the DDC-AT / semseg reproduction (ddcat.md §5): sliding window with stride 2/3 of the
  crop, flip averaging for the clean run, and each window attacked independently with its own labels.
  No single adversarial image exists, so this is weaker than ``whole``; use it only to reproduce.
- ``sea``: SEA's protocol (sea.md §3): short side to the crop size and centre crop (done by the
  dataset's ``data.eval_transform: sea``), whole-image inference, no flip. This is also the inference of
  the released Segmenter-ViT-S (short side 512, 512 centre crop, one forward; ``*_segmenter_*.yaml``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attacks import Attack
from models.inference import merge_windows, slide_inference, split_windows, window_stride
from utils.errors import SetupError

from .common import amp_dtype

PROTOCOLS = ("whole", "semseg", "sea")
EVAL_TRANSFORM = {"semseg": "semseg", "sea": "sea"}  # data.eval_transform each protocol needs


def labels_at(y: torch.Tensor, size) -> torch.Tensor:
    """Label maps [B,H,W] resized (nearest) to `size`, e.g. attack targets at the network's input
    size when the labels are kept at their original resolution for scoring (``eval_transform: semseg``)."""
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    return F.interpolate(y[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(y.dtype)


def autocast_forward(forward: Callable, dtype: Optional[torch.dtype]) -> Callable:
    """`forward` under autocast to `dtype` (None: unchanged), its outputs back in float32, so the
    attack losses and their argmax masks are computed in fp32 (`test.amp`)."""
    if dtype is None:
        return forward

    def fwd(x: torch.Tensor):
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = forward(x)
        return {k: v.float() for k, v in out.items()} if isinstance(out, dict) else out.float()
    return fwd


class Protocol:
    """``predict(x)`` -> clean outputs; ``attacked(attack, x, y, keys)`` -> (outputs, x_adv or None).

    Outputs are scores [B,C,H,W], or {task: output} for a multitask model. Single-task attacks on a
    multitask model see only its main (segmentation) output; multitask attacks see every output.
    `keys` (one image index per row) seed the attack's random draws. `amp`: the attacks' forward and
    backward run under autocast to that dtype; clean inference and the scoring of adversarial images
    stay fp32, so only the attack's strength can change.
    """

    def __init__(self, model: nn.Module, forward: Callable, amp: Optional[torch.dtype] = None):
        self.model, self.forward, self.amp = model, forward, amp
        self.main = model.main_output if getattr(model, "multitask", False) else None

    def predict(self, x: torch.Tensor):
        return self.forward(x)

    def attack_forward(self, attack: Attack) -> Callable:
        """What the attack differentiates: every output for a multitask attack, else the main output."""
        fwd = autocast_forward(self.forward, self.amp)
        if self.main is None or attack.multitask:
            return fwd
        return lambda x: fwd(x)[self.main]

    def attacked(self, attack: Attack, x: torch.Tensor, y, keys: Sequence[int]) -> Tuple[object, Optional[torch.Tensor]]:
        if isinstance(y, torch.Tensor):
            y = labels_at(y, x.shape[-2:])
        x_adv = attack(self.attack_forward(attack), x, y, keys)
        with torch.no_grad():
            return self.forward(x_adv), x_adv


class SemsegProtocol(Protocol):
    def __init__(self, model: nn.Module, crop, stride, flip: bool, ignore: int, amp: Optional[torch.dtype] = None):
        super().__init__(model, model, amp)
        self.crop, self.stride, self.flip, self.ignore = crop, stride, flip, ignore

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xs, _, grid = split_windows(x, self.crop, self.stride)
        p = F.softmax(self.model(xs), 1)
        if self.flip:  # test-time flip averaging, clean run only (as the reference)
            p = (p + F.softmax(self.model(xs.flip(-1)), 1).flip(-1)) / 2
        return merge_windows(p, grid)

    def attacked(self, attack: Attack, x: torch.Tensor, y: torch.Tensor, keys: Sequence[int]):
        y = labels_at(y, x.shape[-2:])
        xs, ys, grid = split_windows(x, self.crop, self.stride, y=y, ignore=self.ignore)
        # every window on its own, labels padded with ignore; window k of image b is row k*B + b
        # and draws from the stream (index_b, k)
        win_keys = [(int(keys[b]), k) for k in range(len(grid.boxes)) for b in range(grid.batch)]
        xs_adv = attack(autocast_forward(self.model, self.amp), xs, ys, win_keys)
        with torch.no_grad():
            return merge_windows(F.softmax(self.model(xs_adv), 1), grid), None


def build_protocol(cfg, model: nn.Module, device: torch.device = torch.device("cpu")) -> Protocol:
    """The protocol named by ``test.protocol``; checks it matches ``data.eval_transform``."""
    t = cfg.test
    amp = amp_dtype(t.amp, device, "test.amp")
    if t.protocol not in PROTOCOLS:
        raise SetupError(f"test.protocol '{t.protocol}' unknown; valid: {', '.join(PROTOCOLS)}")
    need = EVAL_TRANSFORM.get(t.protocol)
    if need and cfg.data.eval_transform != need:
        raise SetupError(f"test.protocol {t.protocol} needs data.eval_transform: {need} "
                         f"(got '{cfg.data.eval_transform}')")
    crop = t.crop_size
    if getattr(model, "multitask", False) and (t.protocol != "whole" or crop is not None):
        raise SetupError("a multitask model is evaluated with test.protocol: whole and test.crop_size: null "
                         "(windows would average its regression outputs as probabilities)")
    stride = None if crop is None else [window_stride(c, t.stride_rate) for c in crop]
    if t.protocol == "semseg":
        if crop is None:
            raise SetupError("test.protocol semseg needs test.crop_size (the sliding window, e.g. [473, 473])")
        return SemsegProtocol(model, crop, stride, t.flip, cfg.data.ignore_label, amp)
    if crop is not None and t.protocol == "whole":
        return Protocol(model, partial(slide_inference, model, crop=crop, stride=stride), amp)
    return Protocol(model, model, amp)
