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

from typing import Callable, List, Optional, Tuple

import torch

from .base import ImageSeeds, PassCounter, counted, input_grad, project, uniform_noise
from .losses import PixelTerms, get_loss, image_loss
from .registry import register_attack

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


def _stage(fwd: Callable, x: torch.Tensor, y: torch.Tensor, x_init: torch.Tensor, eps: float, n: int,
           loss_fn: Callable, loss_kw: dict, n_valid: torch.Tensor, early_stop: bool,
           counter: Optional[PassCounter]) -> Tuple[torch.Tensor, torch.Tensor]:
    """One APGD run of n iterations at radius eps from x_init; returns (lowest-accuracy point, its accuracy).

    With ``early_stop``, every EARLY_STOP_EVERY iterations the images at 0 pixel accuracy leave the
    batch (their point is final: see FREEZE below), so they cost no more passes and the others run on.
    """
    # results of images that left the batch (early stop); allocated when the first one leaves
    out_x: Optional[torch.Tensor] = None
    out_acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)  # original row of each image still in the batch

    def summary(terms: PixelTerms, n_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tracked loss: pixel-mean CE, pixel accuracy) per image. Fix (sea.md §9.1.1): ignored pixels
        are excluded from the accuracy's numerator and denominator, here and at the initial point
        alike (the original counted them wrong at init and right in the loop)."""
        with torch.no_grad():
            return image_loss(terms.ce.detach()), terms.hit.flatten(1).sum(1).to(x.dtype) / n_valid

    def grad_at(xa: torch.Tensor, y: torch.Tensor, n_valid: torch.Tensor, step: int):
        """(tracked loss, accuracy, input gradient) at xa from one forward: the attack loss and the
        tracked values share its log-softmax and label-hit mask; nothing of the size of the logits
        outlives the call."""
        xa = xa.detach().requires_grad_(True)
        terms = PixelTerms(fwd(xa), y, loss_kw["ignore_index"])
        per_pixel = loss_fn(terms.logits, y, step=step, steps=n, terms=terms, **loss_kw)
        tracked = summary(terms, n_valid)
        del terms  # the logits die here unless the loss's graph saved them: not held through the backward
        return (*tracked, input_grad(image_loss(per_pixel).sum(), xa, counter))

    x_adv = x_init.detach().clone()
    loss_best, acc, g = grad_at(x_adv, y, n_valid, 0)
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    eta = torch.full(view, 2.0 * eps, dtype=x.dtype, device=x.device)
    x_best, x_best_adv, g_best = x_adv.clone(), x_adv.clone(), g.clone()
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones(B, dtype=torch.bool, device=x.device)
    prev_loss = torch.zeros_like(loss_best)  # loss_steps[-1] reads 0 at the first check (inherited quirk)
    increases = torch.zeros(n, B, dtype=torch.int32, device=x.device)
    x_prev = x_adv
    k, k_min, k_decr = checkpoint_params(n)
    since = 0
    for i in range(n):
        with torch.no_grad():
            a = 1.0 if i == 0 else MOMENTUM
            u = project(x_adv + eta * g.sign(), x, eps)
            x_new = project(x_adv + a * (u - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
            x_prev, x_adv = x_adv, x_new
            del u, x_new
        if i < n - 1:
            g = None  # replaced by the new point's gradient: not held through its backward
            loss_now, pa, g = grad_at(x_adv, y, n_valid, i + 1)
        else:  # the last iterate's gradient is never used: forward only
            with torch.no_grad():
                loss_now, pa = summary(PixelTerms(fwd(x_adv), y, loss_kw["ignore_index"]), n_valid)
        with torch.no_grad():
            # lowest accuracy, ties -> newer iterate, except at 0 (FREEZE): the first iterate at 0
            # accuracy is kept, so whether an image runs on after reaching 0 (early stop, or the
            # other images of its batch still running) never changes its result. SEA's code keeps
            # the last one, which makes a result depend on the other images in the batch.
            upd = (pa <= acc) & (acc > 0)
            acc = torch.minimum(acc, pa)
            x_best_adv = torch.where(upd.view(view), x_adv, x_best_adv)
            increases[i] = (loss_now > prev_loss).to(torch.int32)
            prev_loss = loss_now
            better = loss_now > loss_best
            x_best = torch.where(better.view(view), x_adv, x_best)
            g_best = torch.where(better.view(view), g, g_best)
            loss_best = torch.where(better, loss_now, loss_best)
            since += 1
            if since == k:
                oscillating = increases[i - k + 1:i + 1].sum(0) <= RHO * k
                stalled = ~reduced_last & (loss_best_last >= loss_best)
                reduce = oscillating | stalled
                reduced_last, loss_best_last = reduce, loss_best.clone()
                eta = torch.where(reduce.view(view), eta / 2, eta)
                x_adv = torch.where(reduce.view(view), x_best, x_adv)
                g = torch.where(reduce.view(view), g_best, g)
                since, k = 0, max(k - k_decr, k_min)
        if early_stop and (i + 1) % EARLY_STOP_EVERY == 0 and i < n - 1:
            done = acc == 0
            if bool(done.any()):  # (one host sync per EARLY_STOP_EVERY iterations)
                if out_x is None:
                    out_x = torch.empty_like(x_init)
                out_x[rows[done]], out_acc[rows[done]] = x_best_adv[done], acc[done]
                keep = ~done
                if not bool(keep.any()):
                    return out_x, out_acc
                rows, x, y, n_valid = rows[keep], x[keep], y[keep], n_valid[keep]
                eta, x_adv, x_prev, g, x_best, x_best_adv, g_best = (
                    t[keep] for t in (eta, x_adv, x_prev, g, x_best, x_best_adv, g_best))
                acc, loss_best, loss_best_last, reduced_last, prev_loss = (
                    t[keep] for t in (acc, loss_best, loss_best_last, reduced_last, prev_loss))
                increases = increases[:, keep]
                view = (x.shape[0],) + (1,) * (x.dim() - 1)
    if out_x is None:  # no image left early: rows are still 0..B-1 in order
        return x_best_adv, acc
    out_x[rows], out_acc[rows] = x_best_adv, acc
    return out_x, out_acc


def apgd_run(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
             loss: str = "ce", prr: bool = False, random_start: bool = True, early_stop: bool = False,
             class_weights=None, ignore_index: int = 255, counter: Optional[PassCounter] = None,
             rng: Optional[ImageSeeds] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """APGD (with PRR when ``prr``); returns (x_adv, per-image pixel accuracy of x_adv over valid pixels)."""
    loss_fn = get_loss(loss)
    fwd = counted(forward, counter)
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
        x_adv, acc = _stage(fwd, x, y, x_adv, eps_s, n_s, loss_fn, loss_kw, n_valid, early_stop, counter)
    return x_adv.detach(), acc


@register_attack("apgd")
def apgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         prr: bool = False, random_start: bool = True, early_stop: bool = False, class_weights=None,
         ignore_index: int = 255, counter: Optional[PassCounter] = None,
         rng: Optional[ImageSeeds] = None) -> torch.Tensor:
    """APGD for segmentation (sea.md §1.3); ``prr`` adds progressive radius reduction (§1.4).

    SEA's members: ``steps=300, prr=True, random_start=True, early_stop=True`` with loss
    ``mask-ce-bal`` (needs ``class_weights``), ``mask-ce`` or ``js``. Cost per stage of n iterations:
    n+1 forwards and n backwards per image (the last backward is skipped).
    """
    return apgd_run(forward, x, y, eps=eps, steps=steps, loss=loss, prr=prr, random_start=random_start,
                    early_stop=early_stop, class_weights=class_weights, ignore_index=ignore_index,
                    counter=counter, rng=rng)[0]
