"""APGD for segmentation with progressive radius reduction (sea.md §1.3-1.4, §8.2).

One stage: sign steps with momentum 0.75, per-image step size starting at 2*eps, halved at
checkpoints when the tracked loss (pixel-mean CE) oscillates or stalls, with a restart from the
highest-CE point. The gradient comes from the attack loss chosen by name; step control and restarts
use the tracked CE; the point returned per image is the iterate with the lowest pixel accuracy (ties
go to the newer iterate, except that the first iterate at 0 accuracy is final). PRR runs three stages
at 2, 1.5, 1 x eps over int(0.3N), int(0.3N) and the rest of the N iterations, each chained from the
previous stage's lowest-accuracy point.

Bookkeeping is per image and vectorised (torch.where over the batch), with no host syncs in the loop
except the optional early-stop test every ``EARLY_STOP_EVERY`` iterations, where the images at 0
accuracy leave the batch: per image, so a result and its pass counts never depend on the other
images in the batch (SEA's code stops only when the whole batch is at 0, sea.md §1.3).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Tuple

import torch

from .base import ImageSeeds, PassCounter, counted, input_grad, project, uniform_noise
from .losses import PixelTerms, get_loss, image_loss, pixel_terms
from .registry import register_attack, unless_random_start

MOMENTUM = 0.75          # a in x + a(u - x) + (1 - a)(x - x_prev)
RHO = 0.75               # checkpoint: halve if #increases <= RHO * k
EARLY_STOP_EVERY = 10    # iterations between early-stop tests (one host sync each)


def checkpoint_params(n: int) -> Tuple[int, int, int]:
    """(first window k, minimum window, decrement) for an n-iteration stage (AutoAttack's rule)."""
    return max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)


def apgd_checkpoints(n: int) -> List[int]:
    """0-based iterations at which an n-iteration APGD stage checks its step size."""
    k, k_min, k_decr = checkpoint_params(n)
    out, since = [], 0
    for i in range(n):
        since += 1
        if since == k:
            out.append(i)
            since, k = 0, max(k - k_decr, k_min)
    return out


def prr_schedule(steps: int, eps: float, prr: bool = True) -> List[Tuple[int, float]]:
    """[(iterations, radius)] per stage: PRR [int(.3N), int(.3N), rest] at [2, 1.5, 1] x eps, or [(N, eps)].

    Stages with 0 iterations (N < 4) are dropped.
    """
    if not prr:
        return [(steps, eps)]
    n1 = int(0.3 * steps)
    stages = [(n1, 2.0 * eps), (n1, 1.5 * eps), (steps - 2 * n1, eps)]
    return [s for s in stages if s[0] > 0]


@dataclass
class _Images:
    """The per-image state of one APGD stage, every field batch-first, so that ``select(keep)`` takes
    the same rows of all of it (the images that stay in the batch at an early stop)."""
    rows: torch.Tensor            # original row of each image still in the batch
    x: torch.Tensor               # clean images (the ball's centres)
    y: torch.Tensor
    n_valid: torch.Tensor         # labelled pixels per image (accuracy's denominator)
    x_adv: torch.Tensor           # current iterate, its predecessor and the gradient at it
    x_prev: torch.Tensor
    g: torch.Tensor
    eta: torch.Tensor             # step size [B,1,...]
    x_best: torch.Tensor          # highest tracked loss so far: point, gradient, loss (restarts)
    g_best: torch.Tensor
    loss_best: torch.Tensor
    loss_best_last: torch.Tensor  # loss_best and whether eta was reduced, at the last checkpoint
    reduced_last: torch.Tensor
    prev_loss: torch.Tensor       # tracked loss of the previous iterate
    increases: torch.Tensor       # [B, n]: whether iteration i raised the tracked loss
    x_best_adv: torch.Tensor      # lowest pixel accuracy so far: point, accuracy (the result)
    acc: torch.Tensor

    def select(self, keep: torch.Tensor) -> "_Images":
        return _Images(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})

    def view(self) -> Tuple[int, ...]:
        """Shape that broadcasts a per-image value over an image."""
        return (self.x.shape[0],) + (1,) * (self.x.dim() - 1)


def _tracked(t: PixelTerms, n_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tracked loss: pixel-mean CE, pixel accuracy) per image. Fix (sea.md §9.1.1): ignored pixels
    are excluded from the accuracy's numerator and denominator, here and at the initial point alike
    (the original counted them wrong at init and right in the loop)."""
    with torch.no_grad():
        n_correct = t.correct.flatten(1).sum(1, dtype=torch.int64)  # a count, exact in any dtype
        return image_loss(t.ce.detach()), n_correct.to(n_valid.dtype) / n_valid


def _grad_at(fwd: Callable, xa: torch.Tensor, y: torch.Tensor, n_valid: torch.Tensor, loss_fn: Callable,
             loss_kw: dict, step: int, steps: int, counter: Optional[PassCounter]):
    """(tracked loss, accuracy, input gradient of the attack loss) at xa from one forward."""
    xa = xa.detach().requires_grad_(True)
    logits = fwd(xa)
    t = pixel_terms(logits, y, loss_kw["ignore_index"])
    per_pixel = loss_fn(logits, t, weights=loss_kw["weights"], step=step, steps=steps)
    tracked = _tracked(t, n_valid)
    del t, logits  # not held through the backward, unless the loss's graph saved them
    return (*tracked, input_grad(image_loss(per_pixel).sum(), xa, counter))


def _start(x: torch.Tensor, y: torch.Tensor, n_valid: torch.Tensor, x_adv: torch.Tensor, eps: float,
           n: int, grad_at: Callable) -> _Images:
    """The stage's state at its starting point x_adv (one forward and backward)."""
    loss, acc, g = grad_at(x_adv, y, n_valid, 0)
    B = x.shape[0]
    return _Images(
        rows=torch.arange(B, device=x.device), x=x, y=y, n_valid=n_valid, x_adv=x_adv, x_prev=x_adv, g=g,
        eta=torch.full((B,) + (1,) * (x.dim() - 1), 2.0 * eps, dtype=x.dtype, device=x.device),
        x_best=x_adv.clone(), g_best=g.clone(), loss_best=loss, loss_best_last=loss.clone(),
        reduced_last=torch.ones(B, dtype=torch.bool, device=x.device),
        prev_loss=torch.zeros_like(loss),  # loss_steps[-1] reads 0 at the first check (inherited quirk)
        increases=torch.zeros(B, n, dtype=torch.int32, device=x.device), x_best_adv=x_adv.clone(), acc=acc)


def _move(s: _Images, i: int, eps: float) -> None:
    """The momentum sign step from s.x_adv (a = 1 at the first iteration), projected onto the ball."""
    with torch.no_grad():
        a = 1.0 if i == 0 else MOMENTUM
        u = project(s.x_adv + s.eta * s.g.sign(), s.x, eps)
        x_new = project(s.x_adv + a * (u - s.x_adv) + (1 - a) * (s.x_adv - s.x_prev), s.x, eps)
        s.x_prev, s.x_adv = s.x_adv, x_new


def _record(s: _Images, i: int, loss_now: torch.Tensor, pa: torch.Tensor) -> None:
    """Bookkeeping of iterate i: the lowest-accuracy point, the loss history and the highest-loss point."""
    with torch.no_grad():
        view = s.view()
        # lowest accuracy, ties -> newer iterate, except at 0 (FREEZE): the first iterate at 0
        # accuracy is kept, so whether an image runs on after reaching 0 (early stop, or the
        # other images of its batch still running) never changes its result. SEA's code keeps
        # the last one, which makes a result depend on the other images in the batch.
        upd = (pa <= s.acc) & (s.acc > 0)
        s.acc = torch.minimum(s.acc, pa)
        s.x_best_adv = torch.where(upd.view(view), s.x_adv, s.x_best_adv)
        s.increases[:, i] = (loss_now > s.prev_loss).to(torch.int32)
        s.prev_loss = loss_now
        better = loss_now > s.loss_best
        s.x_best = torch.where(better.view(view), s.x_adv, s.x_best)
        s.g_best = torch.where(better.view(view), s.g, s.g_best)
        s.loss_best = torch.where(better, loss_now, s.loss_best)


def _checkpoint(s: _Images, i: int, k: int) -> None:
    """At a checkpoint closing a window of k iterations: halve eta where the tracked loss oscillated or
    stalled, and restart those images from their highest-loss point."""
    with torch.no_grad():
        view = s.view()
        oscillating = s.increases[:, i - k + 1:i + 1].sum(1) <= RHO * k
        stalled = ~s.reduced_last & (s.loss_best_last >= s.loss_best)
        reduce = oscillating | stalled
        s.reduced_last, s.loss_best_last = reduce, s.loss_best.clone()
        s.eta = torch.where(reduce.view(view), s.eta / 2, s.eta)
        s.x_adv = torch.where(reduce.view(view), s.x_best, s.x_adv)
        s.g = torch.where(reduce.view(view), s.g_best, s.g)


def _stage(fwd: Callable, x: torch.Tensor, y: torch.Tensor, x_init: torch.Tensor, eps: float, n: int,
           loss_fn: Callable, loss_kw: dict, n_valid: torch.Tensor, early_stop: bool,
           counter: Optional[PassCounter],
           start_fwd: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One APGD run of n iterations at radius eps from x_init; returns (lowest-accuracy point, its accuracy).
    `start_fwd` (default `fwd`) evaluates x_init.

    With ``early_stop``, every EARLY_STOP_EVERY iterations the images at 0 pixel accuracy leave the
    batch (their point is final: see FREEZE in ``_record``), so they cost no more passes and the
    others run on.
    """
    def grad_at(xa, y, n_valid, step, f=fwd):
        return _grad_at(f, xa, y, n_valid, loss_fn, loss_kw, step, n, counter)

    s = _start(x, y, n_valid, x_init.detach().clone(), eps, n, lambda *a: grad_at(*a, f=start_fwd or fwd))
    out_x = None  # results of images that left the batch, allocated when the first one leaves
    out_acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    k, k_min, k_decr = checkpoint_params(n)
    since = 0
    for i in range(n):
        _move(s, i, eps)
        if i < n - 1:
            s.g = None  # replaced by the new point's gradient: not held through its backward
            loss_now, pa, s.g = grad_at(s.x_adv, s.y, s.n_valid, i + 1)
        else:  # the last iterate's gradient is never used: forward only
            with torch.no_grad():
                loss_now, pa = _tracked(pixel_terms(fwd(s.x_adv), s.y, loss_kw["ignore_index"]), s.n_valid)
        _record(s, i, loss_now, pa)
        since += 1
        if since == k:
            _checkpoint(s, i, k)
            since, k = 0, max(k - k_decr, k_min)
        if early_stop and (i + 1) % EARLY_STOP_EVERY == 0 and i < n - 1:
            done = s.acc == 0
            if bool(done.any()):  # (one host sync per EARLY_STOP_EVERY iterations)
                if out_x is None:
                    out_x = torch.empty_like(x_init)
                out_x[s.rows[done]], out_acc[s.rows[done]] = s.x_best_adv[done], s.acc[done]
                if bool(done.all()):
                    return out_x, out_acc
                s = s.select(~done)
    if out_x is None:  # no image left early: rows are still 0..B-1 in order
        return s.x_best_adv, s.acc
    out_x[s.rows], out_acc[s.rows] = s.x_best_adv, s.acc
    return out_x, out_acc


def apgd_run(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
             loss: str = "ce", prr: bool = False, random_start: bool = True, early_stop: bool = False,
             class_weights=None, ignore_index: int = 255, counter: Optional[PassCounter] = None,
             rng: Optional[ImageSeeds] = None,
             clean_forward: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """APGD (with PRR when ``prr``); returns (x_adv, per-image pixel accuracy of x_adv over valid pixels).
    Without a random start the first stage starts at x, evaluated by ``clean_forward`` when given."""
    loss_fn = get_loss(loss)
    fwd = counted(forward, counter)
    start_fwd = None if random_start or clean_forward is None else counted(clean_forward, counter)
    x = x.detach()
    n_valid = (y != ignore_index).flatten(1).sum(1).clamp_min(1).to(x.dtype)
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=x.dtype, device=x.device)
    loss_kw = {"ignore_index": ignore_index, "weights": weights}
    x_adv, acc = None, None
    for n_s, eps_s in prr_schedule(steps, eps, prr):
        if x_adv is None:
            x_adv = (x + uniform_noise(x, eps_s, rng)).clamp(0, 1) if random_start else x.clone()
        else:  # chain: project the previous stage's point onto the smaller ball
            x_adv = project(x_adv, x, eps_s)
        # SegPGD's lambda restarts in each stage (step/steps within the stage), as in the reference.
        x_adv, acc = _stage(fwd, x, y, x_adv, eps_s, n_s, loss_fn, loss_kw, n_valid, early_stop, counter, start_fwd)
        start_fwd = None  # later stages start at the previous stage's point
    return x_adv.detach(), acc


@register_attack("apgd", starts_at_x=unless_random_start)
def apgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         prr: bool = False, random_start: bool = True, early_stop: bool = False, class_weights=None,
         ignore_index: int = 255, counter: Optional[PassCounter] = None,
         rng: Optional[ImageSeeds] = None, clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """APGD for segmentation (sea.md §1.3); ``prr`` adds progressive radius reduction (§1.4).

    SEA's members: ``steps=300, prr=True, random_start=True, early_stop=True`` with loss
    ``mask-ce-bal`` (needs ``class_weights``), ``mask-ce`` or ``js``. Cost per stage of n iterations:
    n+1 forwards and n backwards per image (the last backward is skipped).
    """
    return apgd_run(forward, x, y, eps=eps, steps=steps, loss=loss, prr=prr, random_start=random_start,
                    early_stop=early_stop, class_weights=class_weights, ignore_index=ignore_index,
                    counter=counter, rng=rng, clean_forward=clean_forward)[0]
