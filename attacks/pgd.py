"""Sign-gradient L-inf attacks: FGSM, BIM/PGD (ddcat.md §2, §5), SegPGD, CosPGD (field.md §1.2-1.3)
and MIM (mtl_fpd.md §A3.3). All share one loop: per-pixel loss (ignore label masked), per-image mean
over H*W pixels, summed over the batch, gradient w.r.t. the input only, step, project.

The step size ``alpha`` of the iterative ones (and of the ``multitask`` attack) defaults to
2.5 eps / steps (Madry et al., 2018), from the eps of the call: each eps of ``test.eps`` gets its own.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import ImageSeeds, PassCounter, counted, input_grad, project, uniform_noise
from .losses import get_loss, image_loss, pixel_loss
from .registry import always, register_attack, unless_random_start


def default_alpha(eps: float, steps: int) -> float:
    """Madry et al.'s step size 2.5 eps / steps: the steps cover 2.5 radii, so the iterates can reach
    the ball's boundary from any start and move along it."""
    return 2.5 * eps / steps


def sign_steps(forward: Callable, x: torch.Tensor, objective: Callable[[object, int], torch.Tensor], *,
               eps: float, alpha: Optional[float], steps: int, random_start: bool = True,
               decay: Optional[float] = None, normalize_grad: bool = True, counter: Optional[PassCounter] = None,
               rng: Optional[ImageSeeds] = None, clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """The loop every sign attack shares: ascend ``objective(outputs, t)`` (a scalar) inside the eps
    ball and [0,1], gradients w.r.t. the input only. Without a random start the first iterate is x,
    evaluated by ``clean_forward`` when given.

    With ``decay`` set, steps follow sign(m_t), m_t = decay*m_{t-1} + g_t (g_t divided by its per-image
    L1 norm when ``normalize_grad``): MI-FGSM with decay 1.0, MTRobust's variant with 0.5 and no norm.
    ``alpha`` None: ``default_alpha(eps, steps)``.
    """
    alpha = default_alpha(eps, steps) if alpha is None else alpha
    fwd = counted(forward, counter)
    first_fwd = fwd if random_start or clean_forward is None else counted(clean_forward, counter)
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        x_adv = project(x_adv + uniform_noise(x, eps, rng), x, eps)
    m = torch.zeros_like(x) if decay is not None else None
    for t in range(steps):
        x_adv.requires_grad_(True)
        g = input_grad(objective((first_fwd if t == 0 else fwd)(x_adv), t), x_adv, counter)
        if m is not None:
            if normalize_grad:
                g = g / g.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
            m = decay * m + g
            g = m
        with torch.no_grad():
            x_adv = project(x_adv.detach() + alpha * g.sign(), x, eps)
    return x_adv.detach()


def sign_attack(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: Optional[float],
                steps: int, loss: str = "ce", random_start: bool = True, decay: Optional[float] = None,
                normalize_grad: bool = True, ignore_index: int = 255, class_weights=None,
                counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None,
                clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """`sign_steps` on the per-image mean of the per-pixel ``loss``, summed over the batch."""
    get_loss(loss)  # an unknown name fails before the first forward

    def objective(logits: torch.Tensor, t: int) -> torch.Tensor:
        per_pixel = pixel_loss(loss, logits, y, ignore_index, weights=class_weights, step=t, steps=steps)
        return image_loss(per_pixel).sum()
    return sign_steps(forward, x, objective, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                      decay=decay, normalize_grad=normalize_grad, counter=counter, rng=rng,
                      clean_forward=clean_forward)


@register_attack("pgd", starts_at_x=unless_random_start)
def pgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
        alpha: Optional[float] = None, random_start: bool = True, loss: str = "ce", ignore_index: int = 255,
        class_weights=None, counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None,
        clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """L-inf PGD maximising the per-pixel ``loss`` (default CE); BIM when ``random_start=False``.
    Step size ``alpha``, default 2.5 eps / steps (Madry et al.).

    The DDC-AT test attack is BIM with eps 0.03, alpha 0.01, 2 steps (config units 7.65, 2.55).
    """
    return sign_attack(forward, x, y, eps=eps, alpha=alpha, steps=steps, loss=loss, random_start=random_start,
                       ignore_index=ignore_index, class_weights=class_weights, counter=counter, rng=rng,
                       clean_forward=clean_forward)


@register_attack("fgsm", starts_at_x=always)
def fgsm(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, ignore_index: int = 255,
         counter: Optional[PassCounter] = None, clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """One signed-gradient step of size eps."""
    return pgd(forward, x, y, eps=eps, alpha=eps, steps=1, random_start=False, ignore_index=ignore_index,
               counter=counter, clean_forward=clean_forward)


@register_attack("segpgd", starts_at_x=unless_random_start)
def segpgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
           alpha: Optional[float] = None, random_start: bool = True, ignore_index: int = 255,
           counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None,
           clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """SegPGD: PGD on the SegPGD loss, lambda_t = t/(2T) with t = 0..T-1; alpha default 2.5 eps / steps."""
    return sign_attack(forward, x, y, eps=eps, alpha=alpha, steps=steps, loss="segpgd", random_start=random_start,
                       ignore_index=ignore_index, counter=counter, rng=rng, clean_forward=clean_forward)


@register_attack("cospgd", starts_at_x=unless_random_start)
def cospgd(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
           alpha: Optional[float] = None, random_start: bool = True, ignore_index: int = 255,
           counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None,
           clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """CosPGD: PGD on CE scaled by the detached cosine(softmax, onehot); alpha default 2.5 eps / steps."""
    return sign_attack(forward, x, y, eps=eps, alpha=alpha, steps=steps, loss="cospgd", random_start=random_start,
                       ignore_index=ignore_index, counter=counter, rng=rng, clean_forward=clean_forward)


@register_attack("mim", starts_at_x=unless_random_start)
def mim(forward: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
        alpha: Optional[float] = None, decay: float = 1.0, normalize_grad: bool = True,
        random_start: bool = False, loss: str = "ce", ignore_index: int = 255,
        counter: Optional[PassCounter] = None, rng: Optional[ImageSeeds] = None,
        clean_forward: Optional[Callable] = None) -> torch.Tensor:
    """Momentum iterative attack. Defaults: MI-FGSM (decay 1, L1-normalised gradient, no random start),
    alpha 2.5 eps / steps.

    MTRobust's variant (mtl_fpd.md §A3.3): ``decay=0.5, normalize_grad=False``.
    """
    return sign_attack(forward, x, y, eps=eps, alpha=alpha, steps=steps, loss=loss, random_start=random_start,
                       decay=decay, normalize_grad=normalize_grad, ignore_index=ignore_index, counter=counter,
                       rng=rng, clean_forward=clean_forward)
