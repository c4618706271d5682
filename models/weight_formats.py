"""Published checkpoint formats mapped onto our key names (all loads stay strict).

Whole-model formats (tried by ``models.weights.load_model_weights``; ``module.`` is stripped first):

- ``semseg``: hszhao/semseg and DDC-AT PSPNet / DeepLabv3 ("aspp") checkpoints, PSPNet-DDCAT and
  DeepLabV3-DDCAT included. Their ResNet sits at the top (``layer0.*``, ``layer1..4.*``); ours sits
  under ``backbone.``. Head names (``ppm.features.*``, ``aspp.convs.*``, ``cls.*``, ``aux.*``,
  ``cls1/cls2/mask1/aux_cls1.*``) are the same as ours.
- ``ddcat_main_head``: a DDC-AT checkpoint loaded into the *plain* PSPNet / DeepLabv3. Only the
  deployed part is kept: ``cls1.* -> cls.*`` (f_n), ``aux_cls1.* -> aux.*`` (layer3 head);
  ``cls2.*`` (f_a) and ``mask1.*`` (router) are dropped by name. The result computes exactly the
  eval-mode output of the DDC-AT model (ddcat.md §1.5).
- ``pirat_upernet``: PIR-AT UperNet + ConvNeXt-CvSt checkpoints (nmndeep/Robust-Segmentation,
  ``UperNetForSemanticSegmentation``): ``backbone.downsample_layers.0.stem.i`` (stem),
  ``backbone.downsample_layers.l.p`` (downsampling), ``backbone.stages.j.k.{gamma,dwconv,norm,
  pwconv1,pwconv2}``, ``backbone.norm{i}``, ``decode_head.psp_modules.i.1.{conv,batch_norm}``,
  ``decode_head.{bottleneck,lateral_convs.i,fpn_convs.i,fpn_bottleneck}.{conv,batch_norm}``,
  ``decode_head.classifier``, ``auxiliary_head.convs.0.{conv,batch_norm}``, ``auxiliary_head.classifier``.
- ``segmenter``: the released PIR-AT Segmenter-ViT-S (``model.module.state_dict()`` of ``SegMenter``):
  ``encoder.{cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}, norm, head}`` -> ``backbone.*`` and ``decoder.{cls_emb, proj_dec, proj_patch,
  proj_classes, blocks.N.*, decoder_norm, mask_norm}`` -> ``decode_head.*``; a position embedding
  of another grid is resized bilinearly (logged).

Backbone (ImageNet) formats, for ``load_backbone_weights(backbone, path)``:

- ``resnet_imagenet``: semseg's ``initmodel/resnet{50,101,152}_v2.pth`` (deep stem ``conv1, bn1,
  conv2, bn2, conv3, bn3``) and torchvision naming (7x7 stem ``conv1, bn1``), ``layer1..4`` as ours.
- ``robust_resnet``: robustness-library checkpoints (``model.*`` plus a duplicate ``attacker.model.*``
  and ``normalizer`` buffers, both dropped by name), then as torchvision.
- ``timm_convnext_cvst``: the robust ConvNeXt-CvSt ImageNet models (timm naming: ``stem.stem.i``,
  ``stages.j.downsample.p``, ``stages.j.blocks.k.{gamma,conv_dw,norm,mlp.fc1,mlp.fc2}``), with
  the ``module.`` / ``base_model.`` wrappers stripped; the four per-stage output norms, absent
  from ImageNet models, keep their fresh values.
- ``timm_vit``: timm ``vit_*_patch16`` naming (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.N.*``, ``norm``), e.g. the robust ImageNet ViT-S of Singh et al., "Revisiting Adversarial
  Training for ImageNet" (``module.base_model.model.*`` plus ``module.base_model.normalize.{mean,std}``): the
  ``model.`` level is stripped, the 1000-class ``head`` is loaded when the file has it under
  ``model.`` and keeps its fresh value otherwise (Segmenter never uses it), and the 14 x 14
  position grid of a 224 model is resized bilinearly to the encoder's (logged).

The ImageNet classifier (``fc.*``, ``head.*``, including timm's final ``head.norm``) and input
normaliser buffers are dropped by name; anything else must match exactly.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from utils.logger import get_logger
from utils.registry import Registry

from utils.checkpoint import load_weights_file

from .backbones.vit import resize_pos_embed
from .weights import extract_state_dict, load_best_match, register_converter

State = Dict[str, torch.Tensor]
BACKBONE_FORMATS = Registry("backbone weight format")
register_backbone_format = BACKBONE_FORMATS.register

Rules = Sequence[Tuple[str, str]]


def rename(state: Mapping[str, torch.Tensor], rules: Rules, drop: Iterable[str] = ()) -> State:
    """Apply regex substitutions (in order) to every key; keys matching a `drop` pattern are removed."""
    drops = [re.compile(d) for d in drop]
    out: State = {}
    for k, v in state.items():
        if any(d.search(k) for d in drops):
            continue
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def fill_bn_counters(state: State, module: nn.Module) -> State:
    """Add ``num_batches_tracked`` (0) where an older checkpoint has the BN's running stats but not
    the counter, as PyTorch does for pre-0.4.1 state dicts; nothing else is filled in."""
    for k in module.state_dict():
        if k.endswith("num_batches_tracked") and k not in state:
            if k[: -len("num_batches_tracked")] + "running_mean" in state:
                state[k] = torch.tensor(0, dtype=torch.long)
    return state


def _need(state: Mapping, pattern: str) -> None:
    """Raise KeyError (format does not apply) unless some key matches `pattern`."""
    if not any(re.search(pattern, k) for k in state):
        raise KeyError(pattern)


# ----------------------------------------------------------------------------- whole models

@register_converter("semseg")
def from_semseg(state: Mapping[str, torch.Tensor], model: nn.Module) -> State:
    """semseg / DDC-AT PSPNet and DeepLabv3 (plain or DDC-AT): the ResNet moves under ``backbone.``."""
    _need(state, r"^layer0\.")
    return fill_bn_counters(rename(state, [(r"^(layer[0-4]\.)", r"backbone.\1")]), model)


@register_converter("ddcat_main_head")
def from_ddcat_main_head(state: Mapping[str, torch.Tensor], model: nn.Module) -> State:
    """A DDC-AT checkpoint into the plain model: cls1 -> cls, aux_cls1 -> aux; cls2, mask1 dropped."""
    _need(state, r"^cls1\.")
    if "cls.0.weight" not in model.state_dict():
        raise KeyError("model has no plain `cls` head")
    state = rename(state, [(r"^cls1\.", "cls."), (r"^aux_cls1\.", "aux.")], drop=[r"^cls2\.", r"^mask1\."])
    return from_semseg(state, model)


PIRAT_RULES: Rules = [
    (r"^backbone\.downsample_layers\.0\.stem\.", "backbone.stem."),
    (r"^backbone\.downsample_layers\.([1-3])\.", r"backbone.stages.\1.downsample."),
    (r"^backbone\.stages\.(\d+)\.(\d+)\.", r"backbone.stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."), (r"\.pwconv1\.", ".mlp.fc1."), (r"\.pwconv2\.", ".mlp.fc2."),
    (r"^backbone\.norm(\d)\.", r"backbone.out_norms.\1."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.", r"decode_head.ppm.\1."),
    (r"^auxiliary_head\.convs\.0\.", "aux_head.conv."), (r"^auxiliary_head\.classifier\.", "aux_head.classifier."),
    (r"\.batch_norm\.", ".bn."),
]


@register_converter("pirat_upernet")
def from_pirat_upernet(state: Mapping[str, torch.Tensor], model: nn.Module) -> State:
    """PIR-AT UperNetForSemanticSegmentation (ConvNeXt-CvSt) checkpoints."""
    _need(state, r"^backbone\.downsample_layers\.")
    return fill_bn_counters(rename(state, PIRAT_RULES), model)


def fit_pos_embed(state: State, key: str, module: nn.Module, source: str = "checkpoint") -> State:
    """Resize ``state[key]``, a ViT position embedding [1, 1 + g*g, D] of a square grid, bilinearly to
    the grid of ``module.state_dict()[key]`` (class token kept apart) and log it; anything else (a
    missing key, another width, a token count that is no square) is left for the strict load to report."""
    own = module.state_dict().get(key)
    pos = state.get(key)
    if own is None or pos is None or pos.ndim != 3 or own.ndim != 3 or pos.shape == own.shape \
            or pos.shape[-1] != own.shape[-1]:
        return state
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(own.shape[1] - 1)
    if old * old != pos.shape[1] - 1 or new * new != own.shape[1] - 1:
        return state
    state[key] = resize_pos_embed(pos.float(), (old, old), (new, new)).to(pos.dtype)
    get_logger().info(f"{source}: position embedding {key} resized from a {old}x{old} to a {new}x{new} grid")
    return state


@register_converter("segmenter")
def from_segmenter(state: Mapping[str, torch.Tensor], model: nn.Module) -> State:
    """Released PIR-AT Segmenter (``SegMenter``): encoder -> backbone, decoder -> decode_head."""
    _need(state, r"^encoder\.blocks\.")
    _need(state, r"^decoder\.")
    state = rename(state, [(r"^encoder\.", "backbone."), (r"^decoder\.", "decode_head.")])
    return fit_pos_embed(state, "backbone.pos_embed", model, "Segmenter checkpoint")


# ----------------------------------------------------------------------------- backbones

CLASSIFIER_KEYS = (r"^fc\.", r"^head\.")  # ImageNet classifier (timm: head.norm, head.fc)
NORMALIZER_KEYS = (r"(^|\.)(base_)?normali[sz]e[r]?\.(mean|std|new_mean|new_std)$",)
WRAPPER_PREFIXES = ("module.", "base_model.")

RESNET_STEM: Rules = [(r"^conv1\.", "layer0.0."), (r"^bn1\.", "layer0.1."), (r"^conv2\.", "layer0.3."),
                      (r"^bn2\.", "layer0.4."), (r"^conv3\.", "layer0.6."), (r"^bn3\.", "layer0.7.")]


@register_backbone_format("ours")
def bb_ours(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> State:
    return dict(state)


@register_backbone_format("resnet_imagenet")
def bb_resnet_imagenet(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> State:
    """semseg ``resnet*_v2.pth`` (deep stem) or torchvision (7x7 stem) ResNet naming."""
    _need(state, r"^conv1\.")
    return fill_bn_counters(rename(state, RESNET_STEM), backbone)


@register_backbone_format("robust_resnet")
def bb_robust_resnet(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> State:
    """robustness-library ResNet: ``model.*`` kept; ``attacker.*`` (same weights) and normaliser dropped."""
    _need(state, r"^model\.conv1\.")
    state = rename(state, [(r"^model\.", "")], drop=[r"^attacker\.", r"^normalizer\."])
    return bb_resnet_imagenet(rename(state, [], drop=CLASSIFIER_KEYS), backbone)


@register_backbone_format("timm_convnext_cvst")
def bb_timm_convnext(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> State:
    """timm-style ConvNeXt-CvSt (robust ImageNet): ``stem.stem.i`` -> ``stem.i``; the rest as ours.

    The per-stage output norms (``out_norms.*``) are new layers of the segmentation backbone that
    no ImageNet model has: when the checkpoint lacks them they keep their current (fresh) values,
    as in PIR-AT.
    """
    _need(state, r"^stem\.stem\.")
    state = rename(state, [(r"^stem\.stem\.", "stem.")])
    for k, v in backbone.state_dict().items():
        if k.startswith("out_norms.") and k not in state:
            state[k] = v
    return state


@register_backbone_format("timm_vit")
def bb_timm_vit(state: Mapping[str, torch.Tensor], backbone: nn.Module) -> State:
    """timm ViT naming, with or without the robust models' ``model.`` level; the ImageNet ``head`` is
    loaded when present, else it keeps its fresh value (unused by Segmenter); position grid fitted."""
    _need(state, r"^(model\.)?blocks\.0\.attn\.qkv\.")
    state = rename(state, [(r"^model\.", "")])
    for k, v in backbone.state_dict().items():
        if k.startswith("head.") and k not in state:
            state[k] = v
    return fit_pos_embed(state, "pos_embed", backbone, "ViT backbone weights")


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> State:
    out: State = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_backbone_weights(backbone: nn.Module, path: str, fmt: str = "auto",
                          state: Optional[Mapping[str, torch.Tensor]] = None, key: Optional[str] = None) -> str:
    """Load ImageNet weights into a backbone strictly; returns the format that matched.

    ``module.``/``base_model.`` wrappers are stripped; the classifier (``fc.*``, ``head.*``) and
    input normaliser buffers are dropped by name; every other key must match name and shape.
    On failure raises SetupError with the missing / unexpected keys of the closest format.
    `key`: the config key that named the file, for errors.
    """
    raw = _strip_wrappers(extract_state_dict(load_weights_file(path, key) if state is None else state))
    raw = rename(raw, [], drop=CLASSIFIER_KEYS + NORMALIZER_KEYS)
    names = BACKBONE_FORMATS.names() if fmt == "auto" else [fmt]
    return load_best_match(backbone, raw, [(n, BACKBONE_FORMATS.get(n)) for n in names],
                           f"{key}: {path}" if key else path, "backbone weight format")
