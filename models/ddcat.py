"""DDC-AT variants of PSPNet and DeepLabv3 (ddcat.md §1.5).

Three heads of the main head's architecture on the same context feature: ``cls1`` (f_n, the
deployed head), ``cls2`` (f_a, for perturbation-sensitive clean pixels) and ``mask1`` (f_m, a
2-way per-pixel router), plus ``aux_cls1`` on layer3. Module names follow the published code, so
its checkpoints load after moving the ResNet under ``backbone.``.

Outputs (all upsampled to the input): ``{"out": o_n, "adv": o_a, "mask": o_m}`` and, in training
mode, ``"aux"``. Eval-mode ``model(x)`` returns o_n only and computes neither cls2 nor mask1.
``route(outputs)`` gives the routed logits o = where(argmax o_m == 1, o_a, o_n).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from utils.errors import SetupError
from utils.metrics import class_map

from .deeplabv3 import DeepLabV3
from .pspnet import PSPNet, check_input_sizes, norm_stats
from .registry import register_model
from .segmentor import upsample


def route(outputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Hard per-pixel routing: f_a where the mask head's argmax is 1, else f_n (not differentiable
    through the choice; ties go to f_n like the published ``max(1)[1]``)."""
    pick = class_map(outputs["mask"]).unsqueeze(1) == 1
    return torch.where(pick, outputs["adv"], outputs["out"])


class _DDCATMixin:
    """Turns a model with ``cls``/``aux``/``make_head``/``features`` into its DDC-AT variant."""

    def _add_branches(self, classes: int) -> None:
        if self.aux is None:
            raise ValueError("DDC-AT models always have the layer3 aux head (model.aux must be true)")
        cls2, mask1 = self.make_head(classes), self.make_head(2)
        self.cls1, self.aux_cls1 = self.cls, self.aux
        del self.cls, self.aux
        self.cls2, self.mask1 = cls2, mask1

    def aux_heads(self) -> Dict[str, nn.Module]:
        return {"aux_cls1": self.aux_cls1}

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        c3, ctx = self.features(x)
        out = {"out": upsample(self.cls1(ctx), size), "adv": upsample(self.cls2(ctx), size),
               "mask": upsample(self.mask1(ctx), size)}
        if self.training:
            out["aux"] = upsample(self.aux_cls1(c3), size)
        return out

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.outputs(x)
        _, ctx = self.features(self.normalize(x))  # deployed model: f_n only
        return upsample(self.cls1(ctx), x.shape[-2:])

    def main_and_routed(self, x: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Eval mode: o_n of x as ``model(x)`` gives it (differentiable) and, without gradients, the
        routed class map of its first n images (as ``class_map(route(self.outputs(x[:n])))``) from
        the same backbone pass, so DDC-AT's clean routed forward comes with the attack's first one."""
        size = x.shape[-2:]
        _, ctx = self.features(self.normalize(x))
        out = upsample(self.cls1(ctx), size)
        with torch.no_grad():
            c = ctx[:n].detach()
            routed = route({"out": out[:n].detach(), "adv": upsample(self.cls2(c), size),
                            "mask": upsample(self.mask1(c), size)})
        return out, class_map(routed)


class PSPNetDDCAT(_DDCATMixin, PSPNet):
    def __init__(self, classes: int, *args, **kwargs):
        super().__init__(classes, *args, **kwargs)
        self._add_branches(classes)


class DeepLabV3DDCAT(_DDCATMixin, DeepLabV3):
    def __init__(self, classes: int, *args, **kwargs):
        super().__init__(classes, *args, **kwargs)
        self._add_branches(classes)


def _check(cfg) -> None:
    check_input_sizes(cfg)
    if not cfg.model.aux:
        raise SetupError(f"config key 'model.aux' must be true for {cfg.model.name}: DDC-AT models always have "
                         "the layer3 aux head")


@register_model("pspnet_ddcat")
def build_pspnet_ddcat(cfg) -> PSPNetDDCAT:
    _check(cfg)
    m = cfg.model
    return PSPNetDDCAT(cfg.data.classes, m.layers, m.bins, m.dropout, m.aux, m.deep_base, m.output_stride, m.width,
                       *norm_stats(m))


@register_model("deeplabv3_ddcat")
def build_deeplabv3_ddcat(cfg) -> DeepLabV3DDCAT:
    _check(cfg)
    m = cfg.model
    return DeepLabV3DDCAT(cfg.data.classes, m.layers, m.atrous_rates, m.dropout, m.aux, m.deep_base,
                          m.output_stride, m.width, *norm_stats(m))
