"""Taskonomy ResNet encoder-decoder of MTRobust / taskgrouping (mtl_fpd.md §A1.4).

A torchvision-style ResNet encoder (7x7 stride-2 stem + maxpool, output stride 32, no fc) shared by
all tasks, and one independent dense decoder per task: four "up" steps (ConvT 2x2 stride 2 -> BN ->
ReLU -> conv3x3 -> BN -> ReLU) to 256/128/64/48 channels, then ConvT(48->32) -> BN -> ReLU -> conv3x3
to the task's channels (no final activation). Classification-type tasks (class_object, room_layout,
...) get global average pooling + Linear instead and output [B, K].

Names: ``backbone.layer0`` (conv1, bn1, relu, maxpool) and ``backbone.layer1..4``;
``decoders.<task>.{upconv0, bn_upconv0, conv_decode0, ...}`` as in the published decoder.
Dense outputs span 32*ceil(H/32) pixels on the input's grid and are cropped to the input size.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from utils.errors import SetupError

from .backbones.resnet import ResNet
from .drn_seg import crop_to, task_channels
from .registry import register_model
from .segmentor import Segmentor

# task -> dense output channels, or ("fc", K) for classification-type tasks (global pooling + Linear)
TASKONOMY_TASKS: Dict[str, object] = {
    "autoencoder": 3, "depth_euclidean": 1, "depth_zbuffer": 1, "edge_occlusion": 1, "edge_texture": 1,
    "keypoints2d": 1, "keypoints3d": 1, "normal": 3, "principal_curvature": 2, "reshading": 1,
    "segment_unsup25d": 64, "segment_unsup2d": 64,
    "segmentsemantic": 18,  # 18 channels although labels span 0..16 (mtl_fpd.md §A2.2)
}
TASKONOMY_FC_TASKS = {"class_object": 1000, "class_places": 63, "room_layout": 9, "vanishing_point": 9}


class DenseDecoder(nn.Module):
    """Five x2 transposed-conv steps (x32) from the representation back to full resolution."""

    def __init__(self, cin: int, cout: int, width: float = 1.0):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        widths = [cin] + [max(1, int(round(n * width))) for n in (256, 128, 64, 48, 32)]
        for i in range(4):
            a, b = widths[i], widths[i + 1]
            self.add_module(f"upconv{i}", nn.ConvTranspose2d(a, b, 2, 2))
            self.add_module(f"bn_upconv{i}", nn.BatchNorm2d(b))
            self.add_module(f"conv_decode{i}", nn.Conv2d(b, b, 3, padding=1))
            self.add_module(f"bn_decode{i}", nn.BatchNorm2d(b))
        self.upconv4 = nn.ConvTranspose2d(widths[4], widths[5], 2, 2)
        self.bn_upconv4 = nn.BatchNorm2d(widths[5])
        self.conv_decode4 = nn.Conv2d(widths[5], cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.relu(getattr(self, f"bn_upconv{i}")(getattr(self, f"upconv{i}")(x)))
            x = self.relu(getattr(self, f"bn_decode{i}")(getattr(self, f"conv_decode{i}")(x)))
        return self.conv_decode4(self.relu(self.bn_upconv4(self.upconv4(x))))


class FCDecoder(nn.Module):
    """Global average pooling + Linear (classification-type Taskonomy tasks)."""

    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class TaskonomyResNet(Segmentor):
    """Every mode returns {task: output}; dense outputs at input resolution. `width` scales the encoder's
    and the dense decoders' channels (1.0 = the published networks)."""

    multitask = True

    def __init__(self, layers: int, tasks: Sequence[str], channels: Dict[str, int], fc_tasks: Dict[str, int],
                 mean=None, std=None, width: float = 1.0):
        super().__init__(mean, std)
        if not tasks:
            raise ValueError("model.tasks is empty")
        self.tasks = list(tasks)
        self.main_output = "segmentsemantic" if "segmentsemantic" in self.tasks else self.tasks[0]
        self.backbone = ResNet(layers, deep_base=False, output_stride=32, width=width)
        base = self.backbone.channels[3]
        self.decoders = nn.ModuleDict({t: FCDecoder(base, fc_tasks[t]) if t in fc_tasks
                                       else DenseDecoder(base, channels[t], width) for t in self.tasks})
        for m in self.decoders.modules():  # conv N(0, sqrt(2/(k*k*C_out))), BN (1, 0); ConvT/Linear default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        rep = self.backbone(x)[3]
        return {t: d(rep) if isinstance(d, FCDecoder) else crop_to(d(rep), size) for t, d in self.decoders.items()}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.outputs(x)


@register_model("taskonomy_resnet")
def build_taskonomy_resnet(cfg) -> TaskonomyResNet:
    m = cfg.model
    if m.layers not in (18, 34, 50, 101, 152):
        raise SetupError(f"config key model.layers must be 18, 34, 50, 101 or 152 for taskonomy_resnet, got {m.layers}")
    if not m.tasks:
        raise SetupError("config key model.tasks is empty")
    dense = [t for t in m.tasks if t not in TASKONOMY_FC_TASKS]
    channels = task_channels(dense, TASKONOMY_TASKS, cfg.data.classes, m.task_channels)
    fc = {t: int(m.task_channels.get(t, k)) for t, k in TASKONOMY_FC_TASKS.items() if t in m.tasks}
    return TaskonomyResNet(m.layers, m.tasks, channels, fc, m.mean, m.std, width=m.width)


__all__: List[str] = ["TaskonomyResNet", "TASKONOMY_TASKS", "TASKONOMY_FC_TASKS"]
