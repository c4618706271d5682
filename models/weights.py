"""Loading weights: always strict, always read by ``utils.checkpoint.load_weights_file``
(``weights_only=True``), errors that list the keys.

Published checkpoints use other key names than ours; a *converter* maps one published format to
ours. Register one with ``@register_converter("name")`` on ``fn(state_dict, model) -> state_dict``;
``load_model_weights(model, path, fmt="auto")`` tries our own format first and then each converter,
and fails with the missing / unexpected / mis-shaped keys of the closest match.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from utils.checkpoint import load_weights_file
from utils.errors import SetupError
from utils.registry import Registry

CONVERTERS = Registry("weight format")
register_converter = CONVERTERS.register


def extract_state_dict(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint: ours ('model'), semseg ('state_dict'), or a bare state dict."""
    for key in ("model", "state_dict", "model_state_dict", "net"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return dict(ckpt[key])
    return dict(ckpt)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> Dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def key_report(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing, unexpected, shape mismatches) of `state` against `module.state_dict()`."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    return missing, unexpected, shapes


def _fmt(items: List[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` strictly; on any mismatch raise SetupError listing the keys."""
    missing, unexpected, shapes = key_report(module, state)
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_fmt(missing)}" if missing else "",
                 f"unexpected keys: {_fmt(unexpected)}" if unexpected else "",
                 f"shape mismatches: {_fmt(shapes, 6)}" if shapes else ""]
        raise SetupError(f"{source} does not match the model ({type(module).__name__}): "
                         + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)


def load_best_match(module: nn.Module, raw: Mapping[str, torch.Tensor], candidates: List[Tuple[str, Callable]],
                    path: str, what: str = "weight format") -> str:
    """Convert `raw` with each (name, converter) in turn and load the first exact match strictly;
    if none matches, raise SetupError with the key lists of the closest one. Returns its name."""
    best = None
    for name, conv in candidates:
        try:
            converted = conv(raw, module)
        except (KeyError, ValueError, TypeError):
            continue
        report = key_report(module, converted)
        if not any(report):
            module.load_state_dict(converted, strict=True)
            return name
        score = sum(len(r) for r in report)
        if best is None or score < best[0]:
            best = (score, name, converted)
    if best is None:
        raise SetupError(f"{path}: no {what} ({', '.join(n for n, _ in candidates)}) applies to it; "
                         f"first keys: {_fmt(sorted(raw), 6)}")
    load_strict(module, best[2], f"{path} (as {what} '{best[1]}')")  # raises with the key lists
    return best[1]


def load_model_weights(model: nn.Module, path: str, fmt: str = "auto",
                       state: Optional[Mapping[str, torch.Tensor]] = None, key: Optional[str] = None) -> str:
    """Load a whole-model checkpoint strictly; returns the format that matched.

    `fmt` is "ours", a converter name, or "auto" (ours, then every converter; the error reports the
    candidate with the fewest mismatched keys). `key`: the config key that named the file, for errors.
    """
    raw = strip_prefix(extract_state_dict(load_weights_file(path, key) if state is None else state))
    candidates: List[Tuple[str, Callable]] = []
    if fmt in ("auto", "ours"):
        candidates.append(("ours", lambda s, m: s))
    if fmt == "auto":
        candidates += [(n, CONVERTERS.get(n)) for n in CONVERTERS.names()]
    elif fmt != "ours":
        candidates.append((fmt, CONVERTERS.get(fmt)))
    return load_best_match(model, raw, candidates, f"{key}: {path}" if key else path)
