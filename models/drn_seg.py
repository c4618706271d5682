"""DRN segmentation models of MTRobust (mtl_fpd.md §A1.2, §A1.3).

- ``drn_seg``: DRN trunk -> 1x1 conv -> fixed bilinear x8 transposed conv (DRNSeg).
- ``drn_multitask``: shared DRN encoder (layer0..layer5) and per task layer6..8 + 1x1 conv + fixed
  x8 upsampler (DRNSegDepth). ``model.shared_until`` chooses the sharing depth: ``layer8`` reproduces
  the published model, whose "decoders" all hold the same layer6..8 modules (only the 1x1 heads
  are per task); ``layer5`` gives every task its own copy of layer6..8, as the paper describes.

Outputs are raw logits / linear maps: the published segmentation output is LogSoftmax, and the
cross-entropy applied on top of it equals the one on raw logits (log-softmax is idempotent).

Sizes: the trunk maps H to ceil(H/8) (every strided conv is anchored at the top-left pixel), so the
x8 upsampler returns 8*ceil(H/8) >= H pixels whose grid coincides with the input's. The output is
cropped at the bottom/right to the input size; for H, W multiples of 8 nothing is cropped.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from utils.errors import SetupError

from .backbones.drn import ARCHS, DRN
from .registry import register_model
from .segmentor import Segmentor

# Output channels of the MTRobust Cityscapes tasks (segmentation uses data.classes).
DRN_TASK_CHANNELS = {"segmentsemantic": None, "segment_semantic": None, "depth_zbuffer": 1, "depth": 1,
                     "autoencoder": 3, "reconstruct": 3}
SEG_TASKS = ("segmentsemantic", "segment_semantic")


def bilinear_upsampler(channels: int, factor: int = 8) -> nn.ConvTranspose2d:
    """Depthwise ConvTranspose2d with the fixed bilinear kernel (k=2f, stride f, pad f/2), frozen."""
    k = 2 * factor
    up = nn.ConvTranspose2d(channels, channels, k, stride=factor, padding=factor // 2, groups=channels, bias=False)
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    r = 1 - (torch.arange(k, dtype=torch.float64) / f - c).abs()
    with torch.no_grad():
        up.weight.copy_((r[:, None] * r[None, :]).to(up.weight.dtype).expand_as(up.weight))
    up.weight.requires_grad_(False)
    return up


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the top-left `size` pixels (the upsampled grid is aligned with the input's)."""
    return x[..., :size[0], :size[1]]


def seg_conv(cin: int, cout: int, init: bool) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 1, bias=True)
    if init:  # DRNSeg: N(0, sqrt(2/classes)), zero bias; DRNSegDepth keeps the PyTorch default
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / cout))
        nn.init.zeros_(conv.bias)
    return conv


class DRNSeg(Segmentor):
    """Single-task DRN segmentation; ``backbone.*``, ``seg.*`` and the frozen ``up.weight``."""

    def __init__(self, arch: str, classes: int, mean=None, std=None):
        super().__init__(mean, std)
        self.backbone = DRN(arch)
        self.seg = seg_conv(self.backbone.out_dim, classes, init=True)
        self.up = bilinear_upsampler(classes)

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        return {"out": crop_to(self.up(self.seg(self.backbone(x))), size)}


class TaskHead(nn.Sequential):
    """1x1 conv to the task's channels followed by the fixed x8 upsampler."""

    def __init__(self, cin: int, cout: int, init: bool = False):
        super().__init__()
        self.conv = seg_conv(cin, cout, init)
        self.up = bilinear_upsampler(cout)


class DRNMultitask(Segmentor):
    """Shared DRN encoder + per-task decoders; every mode returns {task: output at input size}.

    Names: ``backbone.<stage>`` (with layer6..8 when shared_until == "layer8"),
    ``decoders.<task>.<layer6..8>`` (only when shared_until == "layer5"), ``heads.<task>.{conv,up}``.
    """

    multitask = True

    DECODER_STAGES = ("layer6", "layer7", "layer8")

    def __init__(self, arch: str, tasks: Sequence[str], channels: Dict[str, int], shared_until: str = "layer8",
                 mean=None, std=None):
        super().__init__(mean, std)
        if not tasks:
            raise ValueError("model.tasks is empty")
        if shared_until not in ("layer5", "layer8"):
            raise ValueError(f"model.shared_until must be layer5 or layer8, got {shared_until!r}")
        self.tasks = list(tasks)
        self.shared_until = shared_until
        self.main_output = next((t for t in self.tasks if t in SEG_TASKS), self.tasks[0])
        self.backbone = DRN(arch)
        if self.backbone.variant == "A":
            raise ValueError("drn_multitask needs a C or D DRN (the A variant has no layer5..8)")
        names = self.backbone.stage_names
        self.encoder_stages: List[str] = names[:names.index("layer5") + 1]
        self.decoders = nn.ModuleDict()
        if shared_until == "layer5":
            for t in self.tasks:
                self.decoders[t] = nn.Sequential()
                for s in self.DECODER_STAGES:
                    self.decoders[t].add_module(s, copy.deepcopy(getattr(self.backbone, s)))
            for s in self.DECODER_STAGES:
                delattr(self.backbone, s)
            self.backbone.stage_names = list(self.encoder_stages)
        self.heads = nn.ModuleDict({t: TaskHead(self.backbone.out_dim, channels[t]) for t in self.tasks})

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        rep = self.backbone.forward_stages(x, self.encoder_stages)
        shared = None
        out = {}
        for t in self.tasks:
            if self.shared_until == "layer8":
                if shared is None:  # layer6..8 are one module: run them once for all tasks
                    shared = self.backbone.forward_stages(rep, self.DECODER_STAGES)
                feat = shared
            else:
                feat = self.decoders[t](rep)
            out[t] = crop_to(self.heads[t](feat), size)
        return out

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.outputs(x)


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise SetupError(f"config key model.arch: unknown DRN '{arch}'; valid: {', '.join(ARCHS)}")
    return arch


def task_channels(tasks: Sequence[str], table: Dict[str, object], classes: int, override: Dict) -> Dict[str, int]:
    """Output channels per task: `override` (model.task_channels) first, then `table`, None = classes."""
    out = {}
    for t in tasks:
        if t in override:
            out[t] = int(override[t])
        elif t in table:
            out[t] = classes if table[t] is None else int(table[t])
        else:
            raise SetupError(f"config key model.tasks: unknown task '{t}'; valid: {', '.join(table)} "
                             "(or give its channels in model.task_channels)")
    return out


@register_model("drn_seg")
def build_drn_seg(cfg) -> DRNSeg:
    m = cfg.model
    return DRNSeg(_check_arch(m.arch), cfg.data.classes, m.mean, m.std)


@register_model("drn_multitask")
def build_drn_multitask(cfg) -> DRNMultitask:
    m = cfg.model
    if m.shared_until not in ("layer5", "layer8"):
        raise SetupError(f"config key model.shared_until must be layer5 or layer8, got {m.shared_until!r}")
    if not m.tasks:
        raise SetupError("config key model.tasks is empty")
    if ARCHS[_check_arch(m.arch)][0] == "A":
        raise SetupError(f"config key model.arch: drn_multitask needs a C or D DRN, got {m.arch}")
    channels = task_channels(m.tasks, DRN_TASK_CHANNELS, cfg.data.classes, m.task_channels)
    return DRNMultitask(m.arch, m.tasks, channels, m.shared_until, m.mean, m.std)
