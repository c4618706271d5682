"""Per-pixel attack losses for segmentation (sea.md §1.2, field.md §1.2-1.3, §1.5).

Every loss maps logits [B,C,H,W] and labels [B,H,W] (``ignore_index`` = ignored) to a per-pixel
value [B,H,W] that is exactly 0, in value and gradient, at ignored pixels. Masks that depend on the
prediction (currently-correct pixels, SegPGD's weights, CosPGD's cosine) are recomputed from the
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
from functools import cached_property, wraps
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import SetupError
from utils.metrics import label_hits
from utils.registry import Registry

LOSSES = Registry("loss")
LOG2 = math.log(2.0)


def _differentiable(fn: Callable) -> property:
    """A property cached only when it carries its gradient: asked for under ``no_grad`` (APGD's
    tracked CE, a detached factor) it is computed without a graph and not kept, so no graph is built
    for a tracked value and a loss asking later still gets a differentiable term."""
    name = fn.__name__

    @wraps(fn)
    def get(self):
        if name in self.__dict__:
            return self.__dict__[name]
        value = fn(self)
        if self.keeps_terms():
            self.__dict__[name] = value
        return value
    return property(get)


class PixelTerms:
    """What the losses of one forward share, each computed once and only when asked for: the
    log-softmax, the per-pixel CE and the currently-correct mask.

    An attack iteration builds one for its forward, so the attack loss and the tracked quantities
    (APGD's CE and pixel accuracy) reuse one log-softmax and one correct mask instead of recomputing
    them over every class (the cost that grows with the number of classes)."""

    def __init__(self, logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255):
        self.logits, self.y, self.ignore_index = logits, y, ignore_index
        self.valid = y != ignore_index
        self.yv = torch.where(self.valid, y, torch.zeros_like(y))  # ignored pixels gather class 0

    def keeps_terms(self) -> bool:
        """Whether a differentiable term computed now carries its gradient, and so may be cached."""
        return torch.is_grad_enabled() or not self.logits.requires_grad

    @_differentiable
    def logp(self) -> torch.Tensor:
        """log softmax(z) [B,C,H,W], held only until ``logp_y`` is built from it (ask for it first)."""
        return F.log_softmax(self.logits, 1)

    @_differentiable
    def logp_y(self) -> torch.Tensor:
        """log softmax(z)_y [B,H,W] (differentiable; class 0 at ignored pixels)."""
        # the full log-softmax is released here: the graph keeps it only until its backward node has
        # run, before the model's backward, so holding it would raise an attack's peak by one logits
        # (asked for under no_grad while logits need a gradient, the result is not kept: then a cached
        # log-softmax stays for the differentiable logp_y asked for later)
        lp = self.__dict__.pop("logp", None) if self.keeps_terms() else self.__dict__.get("logp")
        if lp is None:
            lp = F.log_softmax(self.logits, 1)
        return lp.gather(1, self.yv.unsqueeze(1)).squeeze(1)

    @_differentiable
    def ce(self) -> torch.Tensor:
        """Per-pixel CE, exactly 0 (value and gradient) at ignored pixels: F.cross_entropy(...,
        reduction='none') bit for bit (nll of the same log-softmax)."""
        return torch.where(self.valid, -self.logp_y, torch.zeros_like(self.logp_y))

    @cached_property
    def hit(self) -> torch.Tensor:
        """Bool mask of valid pixels whose prediction (argmax) is the label (found without the class
        map on the CPU: ``utils.metrics.label_hits``)."""
        return label_hits(self.logits.detach(), self.y, self.valid)

    @cached_property
    def correct(self) -> torch.Tensor:
        """`hit` as a detached float mask in the logits' dtype (a factor of the masked losses)."""
        return self.hit.to(self.logits.dtype)


def _terms(logits, y, ignore_index: int, terms: Optional[PixelTerms]) -> PixelTerms:
    return terms if terms is not None else PixelTerms(logits, y, ignore_index)


@LOSSES.register("ce")
def ce_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """Cross-entropy per pixel; 0 at ignored pixels."""
    return _terms(logits, y, ignore_index, terms).ce


@LOSSES.register("mask-ce")
def masked_ce_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """CE on pixels that are currently classified correctly; exactly 0 elsewhere."""
    t = _terms(logits, y, ignore_index, terms)
    return t.correct * t.ce


@LOSSES.register("mask-ce-bal")
def masked_balanced_ce_loss(logits, y, *, ignore_index=255, weights: Optional[torch.Tensor] = None,
                            terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """w[y] * mask-ce, with w a fixed per-class vector (not renormalised; sign steps make scale moot)."""
    if weights is None:
        raise SetupError("loss 'mask-ce-bal' needs class weights (attack option 'class_weights'); "
                         "get them with attacks.losses.class_weights_from_counts(training label counts)")
    t = _terms(logits, y, ignore_index, terms)
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    return w[t.yv] * (t.correct * t.ce)


@LOSSES.register("js")
def js_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """JS(p || e_y) = log 2 + 1/2 [p_y log p_y - (1+p_y) log(1+p_y)], p = softmax(logits).

    Computed from log-softmax, so it stays finite where softmax underflows (the two-KL form of the
    original code can give 0 * log 0 = NaN there; sea.md §9.1.2). Bounded in [0, log 2].
    """
    t = _terms(logits, y, ignore_index, terms)
    logp_y = t.logp_y
    p_y = logp_y.exp()
    js = LOG2 + 0.5 * (p_y * logp_y - (1 + p_y) * torch.log1p(p_y))
    return torch.where(t.valid, js, torch.zeros_like(js))


@LOSSES.register("segpgd")
def segpgd_loss(logits, y, *, ignore_index=255, step: int = 0, steps: int = 1,
                terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """SegPGD: CE weighted (1-l) on correct and l on wrong pixels, l = step/(2*steps), step 0-based."""
    lam = step / (2.0 * max(steps, 1))
    t = _terms(logits, y, ignore_index, terms)
    c = t.correct
    return ((1 - lam) * c + lam * (1 - c)) * t.ce


@LOSSES.register("cospgd")
def cospgd_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """CosPGD: CE scaled by the detached cosine between softmax(z) and onehot(y), i.e. p_y / ||p||_2.

    p is exp of the CE's log-softmax rather than a second softmax, and ||p||_2 a sum of squares rather
    than the CPU build's slow norm reduction over channels: at 151 classes that is 3 passes over the
    logits instead of 6 (cos agrees with the softmax form to within a few float32 ulps)."""
    t = _terms(logits, y, ignore_index, terms)
    lp = t.logp   # outside no_grad, and before ce, whose logp_y releases it from the terms
    ce = t.ce
    with torch.no_grad():
        p = lp.detach().exp()
        cos = t.logp_y.detach().exp() / p.mul_(p).sum(1).sqrt().clamp_min(1e-12)
    return cos * ce


class _NormCorrectLogit(torch.autograd.Function):
    """-c * z_y / max(||z||_2, 1e-12) per pixel, ||z||_2 = sqrt(sum_k z_k^2), c a detached factor.

    The norm is a plain sum of squares: the CPU build's ``torch.linalg.vector_norm`` over channels is
    a scalar strided loop, about 6x slower (50 against 8 ms at 4x151x128x128, 5 % of a DRN-D-22
    attack iteration), and differs from it only in the rounding of the sum. The backward is autograd's
    arithmetic for that expression, operation for operation, in one product and one scatter-add over
    the logits instead of autograd's six passes, so the gradient is autograd's bit for bit
    (tests/test_performance.py) except where ||z|| = 0: autograd's sqrt backward gives 0/0 = NaN
    there, this gives the norm term its subgradient 0."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, yv: torch.Tensor, neg_c: torch.Tensor) -> torch.Tensor:
        n_raw = (z * z).sum(1).sqrt()
        n = n_raw.clamp_min(1e-12)
        q = z.gather(1, yv.unsqueeze(1)).squeeze(1) / n
        ctx.save_for_backward(z, yv, neg_c, n_raw, n, q)
        return neg_c * q

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, yv, neg_c, n_raw, n, q = ctx.saved_tensors
        grad_q = g * neg_c                                           # MulBackward
        grad_zy = grad_q / n                                         # DivBackward, numerator
        grad_n = -grad_q * (q / n)                                   # DivBackward, denominator
        grad_n = torch.where(n_raw >= 1e-12, grad_n, torch.zeros_like(grad_n))  # ClampMinBackward
        grad_s = grad_n / (2 * n_raw)                                # SqrtBackward
        grad_s = torch.where(n_raw > 0, grad_s, torch.zeros_like(grad_s))
        # SumBackward expands grad_s; MulBackward of z * z gives grad_s * z twice, and their sum is
        # exactly z * (2 * grad_s) (doubling is exact); then the gather's gradient is added
        gz = z * (2 * grad_s).unsqueeze(1)
        return gz.scatter_add_(1, yv.unsqueeze(1), grad_zy.unsqueeze(1)), None, None


@LOSSES.register("mask-norm-corrlog")
def masked_norm_correct_logit_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None,
                                   **_) -> torch.Tensor:
    """-(z_y / ||z||_2) on currently-correct valid pixels (the loss is minimised w.r.t. the true logit)."""
    t = _terms(logits, y, ignore_index, terms)
    return _NormCorrectLogit.apply(logits, t.yv, -t.correct)


@LOSSES.register("cos")
def cos_loss(logits, y, *, ignore_index=255, terms: Optional[PixelTerms] = None, **_) -> torch.Tensor:
    """1 - cos(z, onehot(y)) = 1 - z_y / ||z||_2 on the raw logits at every valid pixel (Halmosi et al.'s
    PAdam-Cos; torch's cosine_similarity clamps the norm at 1e-8, this at 1e-12 as mask-norm-corrlog)."""
    t = _terms(logits, y, ignore_index, terms)
    valid = t.valid.to(logits.dtype)
    return valid + _NormCorrectLogit.apply(logits, t.yv, -valid)


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The per-pixel loss registered as `name` (SetupError listing the valid names otherwise)."""
    return LOSSES.get(name)


def pixel_loss(name: str, logits: torch.Tensor, y: torch.Tensor, ignore_index: int = 255,
               weights: Optional[torch.Tensor] = None, step: int = 0, steps: int = 1,
               terms: Optional[PixelTerms] = None) -> torch.Tensor:
    """Per-pixel loss [B,H,W] by name; `terms` (of the same logits and labels) shares their work."""
    return get_loss(name)(logits, y, ignore_index=ignore_index, weights=weights, step=step, steps=steps,
                          terms=terms)


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
