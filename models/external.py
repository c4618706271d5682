"""Models from outside this repository: any PyTorch module (``model.name: external``) or a Hugging Face
transformers semantic-segmentation model saved with ``save_pretrained`` (``model.name: hf``).

``ModelAdapter`` makes such a module fit the project's contract (models/segmentor.py): input RGB in
[0,1] (normalised with ``model.mean`` / ``model.std`` when given), output logits [B,C,H,W] at the input
size. An output that is a mapping (``out`` or ``logits``), an object with ``.logits`` (transformers) or a
tuple (first element) is unwrapped; a smaller output is upsampled bilinearly. The model is probed once
when it is built (one forward of a zero image without gradients), so a wrong output (type, shape, number
of classes) is a one-line error before anything is written.

Checkpoints of both load strictly through ``models.weights`` (``model.weights``, ``test.checkpoint``):
ours (keys ``net.*``) or the bare module's own state dict (the ``bare_module`` format below).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import SetupError

from .registry import register_model
from .segmentor import Segmentor
from .weights import register_converter

HF_INSTALL = "pip install -r requirements-hf.txt"


def logits_of(out: Any, where: str) -> torch.Tensor:
    """The logits tensor of a module's output: a tensor, a mapping's 'out' or 'logits' (or its only
    tensor), an object's ``.logits``, a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        for key in ("out", "logits"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SetupError(f"{where}: the model's output is a {type(out).__name__}; expected logits: a tensor "
                     "[B,C,H,W], a mapping with 'out' or 'logits', or an object with .logits")


class ModelAdapter(Segmentor):
    """Any segmentation module behind the project's contract (module docstring).

    `source` names the model in errors (the config key and its value); `weights_source` is the file that
    holds the weights the module was built with (None: they are random or unknown), which ``test.py``
    evaluates when no checkpoint is given.
    """

    def __init__(self, net: nn.Module, classes: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, source: str = "model", weights_source: Optional[str] = None):
        super().__init__(mean, std)
        self.net, self.classes, self.source, self.weights_source = net, int(classes), source, weights_source

    def forward_features(self, x: torch.Tensor, size: Sequence[int]) -> Dict[str, torch.Tensor]:
        logits = logits_of(self.net(x), self.source)
        if logits.dim() != 4 or logits.shape[0] != x.shape[0]:
            raise SetupError(f"{self.source}: the model's logits have shape {tuple(logits.shape)}; expected "
                             f"[{x.shape[0]}, {self.classes}, H, W] for an input of shape {tuple(x.shape)}")
        if logits.shape[1] != self.classes:
            raise SetupError(f"{self.source}: the model outputs {logits.shape[1]} classes, data.classes is "
                             f"{self.classes}")
        if tuple(logits.shape[-2:]) != tuple(size):
            # align_corners=False: the convention of transformers' and mmsegmentation's resizing
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return {"out": logits}

    def param_groups(self, head_lr_mult: float) -> List[dict]:
        """Every parameter at the base lr: which part is a pretrained backbone is not known here."""
        return [{"params": list(self.parameters()), "lr_mult": 1.0}]

    def probe(self, size: Sequence[int]) -> "ModelAdapter":
        """One forward of a zero image in eval mode without gradients: a wrong output is an error now."""
        mode = self.training
        self.eval()
        try:
            with torch.no_grad():
                self(torch.zeros(1, 3, *size))
        except SetupError:
            raise
        except Exception as e:  # the user's module failed on a plain input: say where, in one line
            msg = str(e).strip().splitlines()
            raise SetupError(f"{self.source}: a forward of a 1x3x{size[0]}x{size[1]} image failed: "
                             f"{type(e).__name__}: {msg[0] if msg else ''}") from None
        finally:
            self.train(mode)
        return self


def adapt(net: nn.Module, classes: int, mean: Optional[Sequence[float]] = None,
          std: Optional[Sequence[float]] = None, probe_size: Optional[Sequence[int]] = (64, 64)) -> ModelAdapter:
    """Wrap a module for the project (Python use): [0,1] RGB in, logits at input size out; `mean`/`std`
    normalise inside (None: the module normalises itself). Probed once at `probe_size` (None: not probed)."""
    model = ModelAdapter(net, classes, mean, std)
    return model.probe(probe_size) if probe_size else model


def _check_no_backbone_init(cfg) -> None:
    if cfg.model.pretrained:
        raise SetupError(f"model.pretrained is for the registry's backbones; model.name {cfg.model.name} loads a "
                         "whole model: use model.weights (or the model's own weights)")


def import_entry(entry: Optional[str]):
    """The function named by ``model.entry`` ("package.module:function"), importable from the working
    directory or PYTHONPATH."""
    if not entry or entry.count(":") != 1 or not all(p.strip() for p in entry.split(":")):
        raise SetupError(f"model.entry {entry!r} must look like 'package.module:function' (model.name external)")
    module_name, fn_name = (p.strip() for p in entry.split(":"))
    if os.getcwd() not in sys.path:  # `python train.py` puts the script's folder first, not the working one
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise SetupError(f"model.entry {entry}: cannot import {module_name}: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SetupError(f"model.entry {entry}: module {module_name} has no function {fn_name}")
    return fn


@register_model("external")
def build_external(cfg) -> ModelAdapter:
    """``model.entry`` called with ``model.kwargs``; the nn.Module it returns behind the adapter."""
    m = cfg.model
    _check_no_backbone_init(cfg)
    fn = import_entry(m.entry)
    try:
        net = fn(**dict(m.kwargs or {}))
    except SetupError:
        raise
    except Exception as e:
        raise SetupError(f"model.entry {m.entry}: the call with model.kwargs {dict(m.kwargs or {})} failed: "
                         f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
    if not isinstance(net, nn.Module):
        raise SetupError(f"model.entry {m.entry} returned a {type(net).__name__}, not a torch.nn.Module")
    # the entry's file identifies the weights it loads itself (an evaluation without test.checkpoint)
    source_file = getattr(sys.modules.get(fn.__module__), "__file__", None)
    model = ModelAdapter(net, cfg.data.classes, m.mean, m.std, f"model.entry {m.entry}", source_file)
    return model.probe(cfg.data.crop_size)


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise SetupError(f"model.name hf needs the transformers package ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}); install it with: {HF_INSTALL}") from None


def hf_normalisation(folder: str, mean, std):
    """(mean, std) for [0,1] inputs from the folder's preprocessor_config.json (image_mean / image_std;
    none when do_normalize is false); the config's model.mean / model.std when the file is absent."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return mean, std
    try:
        with open(path) as f:
            pre = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f"model.hf_path: cannot read {path}: {e}") from None
    if not pre.get("do_normalize", True):
        return None, None
    if pre.get("do_rescale", True) is False or abs(float(pre.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise SetupError(f"model.hf_path: {path} expects pixels scaled by {pre.get('rescale_factor')} "
                         f"(do_rescale {pre.get('do_rescale')}); only 1/255 (inputs in [0,1]) is supported")
    m, s = pre.get("image_mean"), pre.get("image_std")
    if not (isinstance(m, list) and isinstance(s, list) and len(m) == len(s) == 3):
        raise SetupError(f"model.hf_path: {path} needs image_mean and image_std with 3 values each")
    return [float(v) for v in m], [float(v) for v in s]


@register_model("hf")
def build_hf(cfg) -> ModelAdapter:
    """A transformers semantic-segmentation model from ``model.hf_path`` (safetensors, local files only)."""
    m, folder = cfg.model, cfg.model.hf_path
    _check_no_backbone_init(cfg)
    if not folder or not os.path.isdir(folder):
        raise SetupError(f"model.hf_path: folder not found: {folder}")
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(weights):
        raise SetupError(f"model.hf_path: {folder} holds no model saved with save_pretrained "
                         "(config.json and model.safetensors expected)")
    transformers = _transformers()
    try:
        net = transformers.AutoModelForSemanticSegmentation.from_pretrained(
            folder, local_files_only=True, use_safetensors=True)
    except Exception as e:
        raise SetupError(f"model.hf_path: {folder}: cannot load the model: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}") from None
    labels = int(net.config.num_labels)
    if labels != cfg.data.classes:
        raise SetupError(f"model.hf_path: {folder} has {labels} labels (config.json), "
                         f"data.classes is {cfg.data.classes}")
    mean, std = hf_normalisation(folder, m.mean, m.std)
    return ModelAdapter(net, labels, mean, std, f"model.hf_path {folder}", weights).probe(cfg.data.crop_size)


@register_converter("bare_module")
def bare_module(state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of the wrapped module itself (``net.state_dict()``) into a ModelAdapter."""
    if not isinstance(model, ModelAdapter):
        raise TypeError("only for external models")
    return {"net." + k: v for k, v in state.items()}
