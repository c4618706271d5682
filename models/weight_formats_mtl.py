"""Key maps from the published MTRobust / DRN / Taskonomy checkpoints to our models.

- ``mtrobust_drnseg``: DRNSeg (``base.<i>`` = the i-th DRN child, ``seg.*``, ``up.weight``).
- ``mtrobust_multitask``: DRNSegDepth (``encoder.<i>``; ``task_to_decoder.<task>.<j>`` with j = 0..2
  layer6..8, 3 the 1x1 conv, 4 the upsampler). The published model shares layer6..8 between
  tasks, so its state dict repeats them under every task; they must agree when loaded into a
  shared (``shared_until: layer8``) model.
- ``taskonomy_resnet``: taskgrouping naming (``encoder.conv1/bn1/layer1..4``, ``task_to_decoder.<task>.*``).
- ``drn_imagenet``: fyu/drn ImageNet checkpoints into a bare DRN; the classifier ``fc.*`` is dropped.
  ``load_drn_imagenet(model, path)`` loads them into the backbone of any DRN model.

A converter raises TypeError when the model is not its kind, so automatic detection skips it.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from utils.errors import SetupError

from .backbones.drn import DRN
from .drn_seg import DRNMultitask, DRNSeg
from .taskonomy import TaskonomyResNet
from .weights import load_model_weights, register_converter


def _need(model: nn.Module, cls: type) -> None:
    if not isinstance(model, cls):
        raise TypeError(f"format applies to {cls.__name__} only")


def _indexed(key: str, prefix: str, names) -> str:
    """'<prefix>.<i>.rest' -> names[i] + '.rest' (unchanged when i is out of range)."""
    m = re.match(rf"{re.escape(prefix)}\.(\d+)\.(.*)$", key)
    if m is None:
        return key
    i = int(m.group(1))
    return f"{names[i]}.{m.group(2)}" if i < len(names) else key


@register_converter("mtrobust_drnseg")
def convert_mtrobust_drnseg(state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    _need(model, DRNSeg)
    names = [f"backbone.{n}" for n in model.backbone.stage_names]
    return {_indexed(k, "base", names): v for k, v in state.items()}


@register_converter("mtrobust_multitask")
def convert_mtrobust_multitask(state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    _need(model, DRNMultitask)
    enc = [f"backbone.{n}" for n in model.encoder_stages]
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    for k, v in state.items():
        m = re.match(r"task_to_decoder\.([^.]+)\.(\d+)\.(.*)$", k)
        if m is None:
            new = _indexed(k, "encoder", enc)
        else:
            task, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if j < 3:
                stage = DRNMultitask.DECODER_STAGES[j]
                new = (f"backbone.{stage}.{rest}" if model.shared_until == "layer8"
                       else f"decoders.{task}.{stage}.{rest}")
            elif j in (3, 4):
                new = f"heads.{task}.{'conv' if j == 3 else 'up'}.{rest}"
            else:
                new = k
        if new in out:  # a shared layer6..8 tensor seen under another task
            if out[new].shape != v.shape or not torch.equal(out[new], v):
                raise SetupError(f"checkpoint keys {source[new]} and {k} differ: its tasks have separate "
                                 "layer6..8 decoders; set model.shared_until: layer5")
            continue
        out[new], source[new] = v, k
    return out


@register_converter("taskonomy_resnet")
def convert_taskonomy(state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    _need(model, TaskonomyResNet)
    out = {}
    for k, v in state.items():
        if k.startswith("encoder.conv1."):
            k = "backbone.layer0.0." + k[len("encoder.conv1."):]
        elif k.startswith("encoder.bn1."):
            k = "backbone.layer0.1." + k[len("encoder.bn1."):]
        elif k.startswith("encoder."):
            k = "backbone." + k[len("encoder."):]
        elif k.startswith("task_to_decoder."):
            k = "decoders." + k[len("task_to_decoder."):]
        out[k] = v
    return out


@register_converter("drn_imagenet")
def convert_drn_imagenet(state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    _need(model, DRN)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_drn_imagenet(model: nn.Module, path: str, key: Optional[str] = None) -> None:
    """Load fyu/drn ImageNet weights (strict but for ``fc.*``) into the DRN trunk of `model`.

    For ``shared_until: layer5`` multitask models every task's layer6..8 gets the ImageNet copy.
    """
    full = DRN(model.backbone.arch)
    load_model_weights(full, path, fmt="drn_imagenet", key=key)
    sd = full.state_dict()
    own = model.backbone.state_dict()
    model.backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    if isinstance(model, DRNMultitask) and model.shared_until == "layer5":
        for dec in model.decoders.values():
            dec.load_state_dict({k: v for k, v in sd.items() if k.split(".")[0] in DRNMultitask.DECODER_STAGES},
                                strict=True)
