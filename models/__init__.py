"""Segmentation models. Add one: a module with an ``@register_model`` builder, imported below."""
import warnings
from typing import Optional

from torch import nn

from utils.errors import SetupError

from .registry import MODELS, register_model
from . import pspnet  # noqa: F401  (registers)
from . import deeplabv3, ddcat, upernet  # noqa: F401  (register)
from . import weight_formats  # noqa: F401  (registers checkpoint converters)
from .ddcat import route  # noqa: F401  (DDC-AT per-pixel routing of the outputs dict)
from .weight_formats import load_backbone_weights  # noqa: F401  (ImageNet weights into model.backbone)
from . import drn_seg, taskonomy, fpd_seg, segmenter  # noqa: F401  (registers)
from . import weight_formats_mtl  # noqa: F401  (registers converters)
from . import external  # noqa: F401  (registers external, hf and the bare_module format)


def load_pretrained(model: nn.Module, path: str, key: Optional[str] = "model.pretrained") -> None:
    """ImageNet (or robust ImageNet) weights into the model's backbone; strict but for the classifier.
    `key`: the config key that named the file, for errors."""
    from .backbones.drn import DRN
    if any(isinstance(m, DRN) for m in model.modules()):
        from .weight_formats_mtl import load_drn_imagenet
        load_drn_imagenet(model, path, key)
    else:
        load_backbone_weights(model.backbone, path, key=key)


def build_model(config) -> nn.Module:
    """Build the model named by ``config.model.name`` (weights are loaded by the caller); a layer
    left without channels (``model.width`` too small) is a one-line error here, before any write."""
    with warnings.catch_warnings():  # torch's note on zero-element layers: the error below says it
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = MODELS.get(config.model.name)(config)
    for name, p in model.named_parameters():
        if p.numel() == 0:
            raise SetupError(f"model.width={config.model.width:g} leaves layer '{name.rsplit('.', 1)[0]}' of model "
                             f"'{config.model.name}' with no channels (parameter shape {list(p.shape)}); "
                             "use a larger model.width")
    return model


__all__ = ["build_model", "load_pretrained", "register_model", "MODELS"]
