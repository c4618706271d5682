"""Segmentation models. Add one: a module with an ``@register_model`` builder, imported below."""
from torch import nn

from .registry import MODELS, register_model
from . import pspnet  # noqa: F401  (registers)
from . import deeplabv3, ddcat, upernet  # noqa: F401  (register)
from . import weight_formats  # noqa: F401  (registers checkpoint converters)
from .ddcat import route  # noqa: F401  (DDC-AT per-pixel routing of the outputs dict)
from .weight_formats import load_backbone_weights  # noqa: F401  (ImageNet weights into model.backbone)
from . import drn_seg, taskonomy, fpd_seg  # noqa: F401  (registers)
from . import weight_formats_mtl  # noqa: F401  (registers converters)


def build_model(config) -> nn.Module:
    """Build the model named by ``config.model.name`` (weights are loaded by the caller)."""
    return MODELS.get(config.model.name)(config)


__all__ = ["build_model", "register_model", "MODELS"]
