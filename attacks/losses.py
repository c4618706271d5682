"""Per-pixel attack losses for segmentation (sea.md §1.2, field.md §1.2-1.3, §1.5).

Every loss maps logits [B,C,H,W] and their ``pixel_terms`` (of labels [B,H,W], ``ignore_index`` =
ignored) to a per-pixel value [B,H,W] that is exactly 0, in value and gradient, at ignored pixels.
Masks that depend on the prediction (currently-correct pixels, SegPGD's weights, CosPGD's cosine) are recomputed from the
logits given and detached. Per-image losses are the mean over all H*W pixels (``image_loss``), as in
SEA: the divisor is neither the number of valid nor of correct pixels.

Registered names (``LOSSES``):
  ce                 plain cross-entropy (SEA's tracked ``ce-avg``)
  mask-ce            CE on currently-correct pixels only (SEA ``mask-ce-avg``)
  mask-ce-bal        mask-ce times a fixed per-class weight w[y] (SEA ``mask-ce-bal``); needs ``weights``
  js                 Jensen-Shannon divergence JS(softmax(z) || onehot(y)), closed form
  segpgd             ((1-l)*1[correct] + l*1[wrong]) * CE, l = step / (2*steps)   (SegPGD)
  cospgd             cos(softmax(z), onehot(y)).detach() * CE                     (CosPGD)
  mask-norm-corrlog  -(z_y / ||z||_2) on currently-correct pixels                (SEA 2023, sea+)
  cos                1 - cos(z, onehot(y)) = 1 - z_y / ||z||_2 on the raw logits   (PAdam-Cos, Halmosi et al.)

Class weights for ``mask-ce-bal``: ``class_weights_from_counts(counts)`` with counts = pixel counts per
class over the *training* split (``utils.metrics.label_counts`` accumulates them from label maps).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import SetupError
from utils.metrics import correct_pixels
from utils.registry import Registry

LOSSES = Registry("loss")
LOG2 = math.log(2.0)


class PixelTerms(NamedTuple):
    """What the losses of one forward and APGD's bookkeeping share (``pixel_terms``)."""
    valid: torch.Tensor    # bool [B,H,W]: pixels with a label
    yv: torch.Tensor       # the labels with ignored pixels at class 0 (an index every gather can take)
    logp: torch.Tensor     # log softmax(z) [B,C,H,W], differentiable
    logp_y: torch.Tensor   # log softmax(z)_y [B,H,W], differentiable
    ce: torch.Tensor       # per-pixel CE [B,H,W], exactly 0 (value and gradient) at ignored pixels
    correct: Optional[torch.Tensor]  # detached mask [B,H,W] in the logits' dtype: valid and argmax(z) == y
    #                                  (None when built without it)


# the losses that read ``correct`` (the others are computed without the class map)
USES_CORRECT = frozenset({"mask-ce", "mask-ce-bal", "segpgd", "mask-norm-corrlog"})


def pixel_terms(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255,
                with_correct: bool = True) -> PixelTerms:
    """One forward's per-pixel terms, each computed once: the attack loss and APGD's tracked CE and
    accuracy read them from here. The CE is F.cross_entropy(..., reduction='none') bit for bit (the
    nll of the same log-softmax). Drop the result before the input backward: ``logp`` is the size of
    the logits, and the graph keeps its own reference only until log_softmax's backward has run."""
    valid = y != ignore_index
    yv = torch.where(valid, y, torch.zeros_like(y))
    logp = F.log_softmax(logits, 1)
    logp_y = logp.gather(1, yv.unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, -logp_y, torch.zeros_like(logp_y))
    correct = correct_pixels(logits.detach(), y, valid).to(logits.dtype) if with_correct else None
    return PixelTerms(valid, yv, logp, logp_y, ce, correct)


@LOSSES.register("ce")
def ce_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """Cross-entropy per pixel; 0 at ignored pixels."""
    return t.ce


@LOSSES.register("mask-ce")
def masked_ce_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """CE on pixels that are currently classified correctly; exactly 0 elsewhere."""
    return t.correct * t.ce


@LOSSES.register("mask-ce-bal")
def masked_balanced_ce_loss(logits: torch.Tensor, t: PixelTerms, *, weights: Optional[torch.Tensor] = None,
                            **_) -> torch.Tensor:
    """w[y] * mask-ce, with w a fixed per-class vector (not renormalised; sign steps make scale moot)."""
    if weights is None:
        raise SetupError("loss 'mask-ce-bal' needs class weights (attack option 'class_weights'); "
                         "get them with attacks.losses.class_weights_from_counts(training label counts)")
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    return w[t.yv] * (t.correct * t.ce)


@LOSSES.register("js")
def js_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """JS(p || e_y) = log 2 + 1/2 [p_y log p_y - (1+p_y) log(1+p_y)], p = softmax(logits).

    Computed from log-softmax, so it stays finite where softmax underflows (the two-KL form of the
    original code can give 0 * log 0 = NaN there; sea.md §9.1.2). Bounded in [0, log 2].
    """
    p_y = t.logp_y.exp()
    js = LOG2 + 0.5 * (p_y * t.logp_y - (1 + p_y) * torch.log1p(p_y))
    return torch.where(t.valid, js, torch.zeros_like(js))


@LOSSES.register("segpgd")
def segpgd_loss(logits: torch.Tensor, t: PixelTerms, *, step: int = 0, steps: int = 1, **_) -> torch.Tensor:
    """SegPGD: CE weighted (1-l) on correct and l on wrong pixels, l = step/(2*steps), step 0-based."""
    lam = step / (2.0 * max(steps, 1))
    return ((1 - lam) * t.correct + lam * (1 - t.correct)) * t.ce


@LOSSES.register("cospgd")
def cospgd_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """CosPGD: CE scaled by the detached cosine between softmax(z) and onehot(y), i.e. p_y / ||p||_2,
    with p the exp of the CE's log-softmax (no second softmax)."""
    with torch.no_grad():
        p = t.logp.detach().exp()
        cos = t.logp_y.detach().exp() / p.mul_(p).sum(1).sqrt().clamp_min(1e-12)
    return cos * t.ce


def _label_logit_over_norm(logits: torch.Tensor, yv: torch.Tensor) -> torch.Tensor:
    """z_y / max(||z||_2, 1e-12) per pixel, ||z||_2 as the root of a sum of squares. The sum is clamped
    at 1e-24 before the root as well, so where z = 0 the norm term's gradient is 0, not sqrt's 0/0."""
    z_y = logits.gather(1, yv.unsqueeze(1)).squeeze(1)
    return z_y / (logits * logits).sum(1).clamp_min(1e-24).sqrt().clamp_min(1e-12)


@LOSSES.register("mask-norm-corrlog")
def masked_norm_correct_logit_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """-(z_y / ||z||_2) on currently-correct valid pixels (the loss is minimised w.r.t. the true logit)."""
    return (-t.correct) * _label_logit_over_norm(logits, t.yv)


@LOSSES.register("cos")
def cos_loss(logits: torch.Tensor, t: PixelTerms, **_) -> torch.Tensor:
    """1 - cos(z, onehot(y)) = 1 - z_y / ||z||_2 on the raw logits at every valid pixel (Halmosi et al.'s
    PAdam-Cos; torch's cosine_similarity clamps the norm at 1e-8, this at 1e-12 as mask-norm-corrlog)."""
    valid = t.valid.to(logits.dtype)
    return valid + (-valid) * _label_logit_over_norm(logits, t.yv)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The per-pixel loss registered as `name` (SetupError listing the valid names otherwise)."""
    return LOSSES.get(name)


def pixel_loss(name: str, logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255,
               weights: Optional[torch.Tensor] = None, step: int = 0, steps: int = 1) -> torch.Tensor:
    """Per-pixel loss [B,H,W] by name, from the logits and labels."""
    terms = pixel_terms(logits, y, ignore_index, with_correct=name in USES_CORRECT)
    return get_loss(name)(logits, terms, weights=weights, step=step, steps=steps)


def image_loss(per_pixel: torch.Tensor) -> torch.Tensor:
    """Per-image loss [B]: mean over all H*W pixels (ignored pixels are already 0), sea.md §1.2."""
    return per_pixel.flatten(1).mean(1)


def class_weights_from_counts(counts: Union[Sequence[int], np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Per-class weights ~ 1/N_c normalised to sum 1 (as SEA's VOC/ADE vectors).

    `counts` are pixel counts per class over the training split. A class with no training pixels
    gets the largest weight of the present classes (1/0 is undefined; rarest is the closest meaning).
    """
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64).flatten()
    if c.numel() == 0 or (c < 0).any() or not (c > 0).any():
        raise SetupError("class counts for 'mask-ce-bal' must be non-negative with at least one class > 0")
    inv = torch.where(c > 0, 1.0 / c.clamp_min(1), torch.zeros_like(c))
    inv = torch.where(c > 0, inv, inv.max())
    return (inv / inv.sum()).float()
