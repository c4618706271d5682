"""The Python entry for notebooks and scripts: the functions test.py runs, importable in one line.

    from engine.api import adapt, evaluate_model, load_config, sea

- ``evaluate_model(model, dataset_or_loader, config)``: clean and attacked evaluation with the config's
  test settings; returns the dict metrics.json holds (``write=True`` also writes the result folder).
  test.py calls it after loading the checkpoint, so the numbers are the same.
- ``sea(forward, x, y, eps=8)``: SEA on one batch, ``(x_adv, per-image statistics)``.
- ``adapt(module, classes, mean, std)``: any segmentation module behind the project's contract.
- ``build_dataset(config, split)``, ``build_model(config)``, ``load_config(path, overrides)``.
"""
from attacks.sea import sea
from datasets import build_dataset
from models import build_model
from models.external import adapt
from utils.config import load_config

from .evaluator import evaluate_model

__all__ = ["adapt", "build_dataset", "build_model", "evaluate_model", "load_config", "sea"]
