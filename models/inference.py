"""Whole-image and sliding-window inference as differentiable functions of the input.

An attack can run through exactly the inference that is evaluated: pass
``lambda x: slide_inference(model, x, ...)`` as its forward. ``split_windows`` / ``merge_windows``
expose the two halves, for protocols that treat each window separately (semseg's per-window attack).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

MEAN_RGB = (0.485, 0.456, 0.406)


def whole_inference(forward: Callable, x: torch.Tensor) -> torch.Tensor:
    """Logits of the whole image in one pass."""
    return forward(x)


def window_stride(crop: int, rate: Optional[float] = None) -> int:
    """The sliding-window stride for `crop`: semseg's ceil(2 crop / 3) in integers when `rate` is None
    (a float such as 0.6667 gives one more at every crop divisible by 3: 343 for 513, not 342), else
    ceil(crop * rate), at least 1."""
    if rate is None:
        return -(-2 * int(crop) // 3)
    return max(1, math.ceil(int(crop) * rate))


def _starts(length: int, crop: int, stride: int) -> list:
    n = max(math.ceil((length - crop) / stride), 0) + 1
    return [min(i * stride, length - crop) for i in range(n)]  # last window ends at the border


@dataclass
class WindowGrid:
    """Where the windows of a (padded) batch lie; produced by `split_windows`."""
    batch: int
    size: Tuple[int, int]          # original h, w
    padded: Tuple[int, int]        # padded H, W
    pad: Tuple[int, int]           # total padding (h, w), half before
    crop: Tuple[int, int]
    boxes: List[Tuple[int, int]]   # top-left corners, window k of image b is row k*batch + b


def split_windows(x: torch.Tensor, crop: Sequence[int], stride: Sequence[int], pad_value=MEAN_RGB,
                  y: Optional[torch.Tensor] = None, ignore: int = 255):
    """Pad `x` symmetrically to at least `crop` (with `pad_value`; labels with `ignore`) and cut the
    semseg windows (ddcat.md §5): returns (windows [n*B,...], label windows or None, grid)."""
    b, c, h, w = x.shape
    ch, cw = int(crop[0]), int(crop[1])
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        fill = torch.as_tensor(pad_value, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        canvas = fill.expand(b, c, h + ph, w + pw).clone()
        canvas[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w] = x
        x = canvas
        if y is not None:
            y = F.pad(y, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=ignore)
    H, W = x.shape[-2:]
    boxes = [(i, j) for i in _starts(H, ch, int(stride[0])) for j in _starts(W, cw, int(stride[1]))]
    xs = torch.cat([x[:, :, i:i + ch, j:j + cw] for i, j in boxes], 0)
    ys = None if y is None else torch.cat([y[:, i:i + ch, j:j + cw] for i, j in boxes], 0)
    return xs, ys, WindowGrid(b, (h, w), (H, W), (ph, pw), (ch, cw), boxes)


def merge_windows(probs: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """Average per-window probabilities [n*B,C,ch,cw] into [B,C,h,w] (padding cropped off)."""
    (H, W), (ch, cw), (ph, pw) = grid.padded, grid.crop, grid.pad
    acc = probs.new_zeros(grid.batch, probs.shape[1], H, W)
    count = probs.new_zeros(1, 1, H, W)
    for (i, j), p in zip(grid.boxes, probs.split(grid.batch, 0)):
        acc = acc + F.pad(p, (j, W - j - cw, i, H - i - ch))
        count[:, :, i:i + ch, j:j + cw] += 1
    h, w = grid.size
    return (acc / count)[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


def slide_inference(forward: Callable, x: torch.Tensor, crop: Sequence[int], stride: Sequence[int],
                    pad_value: Sequence[float] = MEAN_RGB) -> torch.Tensor:
    """semseg sliding window (ddcat.md §5): windows of `crop` every `stride`, softmax averaged.

    The image is padded symmetrically with `pad_value` (the mean colour, i.e. 0 after normalisation)
    when smaller than the crop. All windows of the batch go through the model as one batch.
    Returns log of the averaged probabilities [B,C,H,W], so CE on it is the NLL of the ensemble.
    """
    xs, _, grid = split_windows(x, crop, stride, pad_value)
    return torch.log(merge_windows(F.softmax(forward(xs), 1), grid).clamp_min(1e-12))
