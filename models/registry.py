"""The model registry: ``@register_model("name")`` on a builder ``fn(config) -> nn.Module``."""
from utils.registry import Registry

MODELS = Registry("model")
register_model = MODELS.register
