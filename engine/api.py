"""The Python entry for notebooks and scripts: the functions test.py runs, importable in one line.

    from engine.api import adapt, evaluate_model, load_config, sea

- ``evaluate_model(model, dataset_or_loader, config)``: clean and attacked evaluation with the config's
  test settings; returns the dict metrics.json holds (``write=True`` also writes the result folder,
  holding its lock as test.py does).
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

from .evaluator import evaluate_model as _evaluate_model
from .paths import output_lock


def evaluate_model(model, data, cfg, *, write: bool = False, overrides=(), **kwargs) -> dict:
    """`engine.evaluator.evaluate_model`; with `write`, the result folder's lock is held while it runs
    (as test.py holds it), so a second evaluation into that folder is refused instead of mixed in."""
    if not write:
        return _evaluate_model(model, data, cfg, overrides=overrides, **kwargs)
    if isinstance(cfg, str):
        cfg = load_config(cfg, list(overrides))
    with output_lock("test", cfg):
        return _evaluate_model(model, data, cfg, write=True, **kwargs)


__all__ = ["adapt", "build_dataset", "build_model", "evaluate_model", "load_config", "sea"]
