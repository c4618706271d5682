"""Whole-image and sliding-window inference as differentiable functions of the input.

An attack can run through exactly the inference that is evaluated: pass
``lambda x: slide_inference(model, x, ...)`` as its forward.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def whole_inference(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """Logits of the whole image in one pass."""
    return forward(x)


def _starts(length: int, crop: int, stride: int) -> list:
    n = max(math.ceil((length - crop) / stride), 0) + 1
    return [min(i * stride, length - crop) for i in range(n)]  # last window ends at the border


def slide_inference(forward: Callable, x: torch.Tensor, crop: Sequence[int], stride: Sequence[int],
                    pad_value: Sequence[float] = (0.485, 0.456, 0.406)) -> torch.Tensor:
    """semseg sliding window (ddcat.md §5): windows of `crop` every `stride`, softmax averaged.

    The image is padded symmetrically with `pad_value` (the mean colour, i.e. 0 after normalisation)
    when smaller than the crop. All windows of the batch go through the model as one batch.
    Returns log of the averaged probabilities [B,C,H,W], so CE on it is the NLL of the ensemble.
    """
    b, _, h, w = x.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        fill = torch.as_tensor(pad_value, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        canvas = fill.expand(b, x.shape[1], h + ph, w + pw).clone()
        canvas[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w] = x
        x = canvas
    H, W = x.shape[-2:]
    boxes = [(i, j) for i in _starts(H, ch, stride[0]) for j in _starts(W, cw, stride[1])]
    windows = torch.cat([x[:, :, i:i + ch, j:j + cw] for i, j in boxes], 0)  # [n*B,3,ch,cw]
    probs = F.softmax(forward(windows), 1).split(b, 0)
    acc = x.new_zeros(b, probs[0].shape[1], H, W)
    count = x.new_zeros(1, 1, H, W)
    for (i, j), p in zip(boxes, probs):
        acc = acc + F.pad(p, (j, W - j - cw, i, H - i - ch))
        count[:, :, i:i + ch, j:j + cw] += 1
    acc = acc / count
    acc = acc[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    return torch.log(acc.clamp_min(1e-12))
