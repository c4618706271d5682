"""Attack library: losses by hand and closed form, APGD schedule, exact robust accuracy of a linear
per-pixel model, eps-ball / ignore-label / no-parameter-grad invariants, ensembles and build errors."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attacks import (ATTACKS, LOSSES, PassCounter, attack_mode, build_attack,  # noqa: E402
                     class_weights_from_counts, ensemble_members, expand_attacks, needs_class_weights)
from attacks.apgd import EARLY_STOP_EVERY, apgd_checkpoints, prr_schedule  # noqa: E402
from attacks.houdini import houdini_loss  # noqa: E402
from attacks.losses import pixel_loss, pixel_terms  # noqa: E402
from utils.errors import SetupError  # noqa: E402

IGN = 255
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- losses

def _logits_labels(seed=0, B=2, C=4, H=5, W=6, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B, H, W), generator=g)
    half = torch.rand(B, H, W, generator=g) < 0.5
    y = torch.where(half, z.argmax(1), y)          # about half the pixels correct
    y[torch.rand(B, H, W, generator=g) < 0.25] = IGN
    return z, y


def test_js_closed_form_equals_definition():
    z, y = _logits_labels()
    y = torch.where(y == IGN, torch.zeros_like(y), y)
    p = F.softmax(z, 1)
    q = F.one_hot(y, z.shape[1]).permute(0, 3, 1, 2).to(z.dtype)
    m = (p + q) / 2
    kl_pm = (p * (p / m).log()).sum(1)
    kl_qm = torch.where(q > 0, q * (q / m).log(), torch.zeros_like(q)).sum(1)
    assert torch.allclose(pixel_loss("js", z, y), 0.5 * kl_pm + 0.5 * kl_qm, atol=1e-12)


def test_js_bounds_and_no_nan_when_softmax_underflows():
    z = torch.tensor([[[[1e4]], [[-1e4]]]], dtype=torch.float32, requires_grad=True)  # p_0 = 1, p_1 = 0
    v0 = pixel_loss("js", z, torch.tensor([[[0]]]))
    v1 = pixel_loss("js", z, torch.tensor([[[1]]]))
    assert v0.item() == pytest.approx(0.0, abs=1e-6) and v1.item() == pytest.approx(math.log(2), abs=1e-6)
    (g,) = torch.autograd.grad(v1.sum() + v0.sum(), z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("scale", [3.0, 60.0])
def test_cospgd_cosine_from_the_log_softmax_equals_the_definition(scale):
    """CosPGD's factor, computed from the CE's log-softmax, is cos(softmax(z), onehot(y)) in float32 at
    151 classes, also where the softmax saturates (scale 60: p_y underflows to 0 or is 1)."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 151, 9, 7, generator=g) * scale).requires_grad_(True)
    y = torch.randint(0, 151, (2, 9, 7), generator=g)
    y[0, :3] = z.detach().argmax(1)[0, :3]
    p = F.softmax(z.detach().double(), 1)
    onehot = F.one_hot(y, 151).permute(0, 3, 1, 2).double()
    cos = F.cosine_similarity(p, onehot, dim=1)
    assert (cos > 0.5).any() and (cos < 1e-3).any()             # both regimes present
    ce = F.cross_entropy(z.double(), y, reduction="none")
    got = pixel_loss("cospgd", z, y)
    assert torch.allclose(got.double(), cos * ce, rtol=1e-5, atol=1e-6)
    (gz,) = torch.autograd.grad(got.sum(), z)                  # the factor is detached: cos * dCE/dz
    (ref,) = torch.autograd.grad((cos.float().detach() * F.cross_entropy(z, y, reduction="none")).sum(), z)
    assert torch.allclose(gz, ref, rtol=1e-4, atol=1e-7)


def test_pixel_terms_are_their_definitions_with_and_without_a_graph():
    """pixel_terms gives the same values whether built under no_grad or not, and, with a graph, the
    CE's gradient is cross-entropy's; the correct mask is detached."""
    z, y = _logits_labels()
    z.requires_grad_(True)
    valid = y != IGN
    assert valid.any() and (~valid).any()
    with torch.no_grad():
        plain = pixel_terms(z, y, IGN)
    t = pixel_terms(z, y, IGN)
    assert not plain.ce.requires_grad and t.ce.requires_grad and not t.correct.requires_grad
    for a, b in zip(plain, t):
        assert torch.equal(a, b.detach())
    yv = torch.where(valid, y, 0)
    assert torch.equal(t.yv, yv) and torch.equal(t.valid, valid)
    assert torch.equal(t.logp_y, F.log_softmax(z, 1).gather(1, yv[:, None])[:, 0])
    assert torch.equal(t.correct, ((z.argmax(1) == y) & valid).to(z.dtype))
    (g,) = torch.autograd.grad(t.ce.sum(), z)
    (ref,) = torch.autograd.grad(F.cross_entropy(z, y, ignore_index=IGN, reduction="sum"), z)
    assert torch.allclose(g, ref)


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_losses_read_the_correct_mask_only_where_declared(name):
    """pixel_loss builds the terms without the correct mask for losses outside USES_CORRECT: they give
    what they give with it (a loss reading it without being listed fails on None)."""
    from attacks.losses import USES_CORRECT, get_loss
    z, y = _logits_labels(seed=2)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=z.dtype)
    full = get_loss(name)(z, pixel_terms(z, y, IGN), weights=w, step=3, steps=10)
    assert torch.equal(pixel_loss(name, z, y, IGN, weights=w, step=3, steps=10), full)
    if name not in USES_CORRECT:
        assert torch.equal(get_loss(name)(z, pixel_terms(z, y, IGN, with_correct=False), weights=w), full)


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_loss_zero_value_and_gradient_at_ignored_pixels(name):
    z, y = _logits_labels(seed=1)
    z.requires_grad_(True)
    v = pixel_loss(name, z, y, IGN, weights=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=z.dtype), step=3, steps=10)
    assert v.shape == y.shape
    ign = y == IGN
    assert (v[ign] == 0).all()
    (g,) = torch.autograd.grad(v.sum(), z)
    assert (g.permute(0, 2, 3, 1)[ign] == 0).all()
    assert g.permute(0, 2, 3, 1)[~ign].abs().sum() > 0  # the loss does depend on valid pixels


def test_losses_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64).T.reshape(1, 3, 1, 2)
    y = torch.tensor([[[0, 1]]])                   # pixel 0 correct (argmax 0), pixel 1 wrong (argmax 2)
    ce = F.cross_entropy(z, y, reduction="none")
    corr = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    assert torch.allclose(pixel_loss("ce", z, y), ce)
    assert torch.allclose(pixel_loss("mask-ce", z, y), ce * corr)
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(pixel_loss("mask-ce-bal", z, y, weights=w), ce * corr * torch.tensor([0.5, 2.0]))
    assert torch.allclose(pixel_loss("segpgd", z, y, step=0, steps=10), ce * corr)
    assert torch.allclose(pixel_loss("segpgd", z, y, step=4, steps=10), ce * (0.8 * corr + 0.2 * (1 - corr)))
    p = F.softmax(z, 1)
    cos = p.gather(1, y[:, None])[:, 0] / p.norm(dim=1)
    assert torch.allclose(pixel_loss("cospgd", z, y), cos * ce)
    zy = z.gather(1, y[:, None])[:, 0] / z.norm(dim=1)
    assert torch.allclose(pixel_loss("mask-norm-corrlog", z, y), -zy * corr)


def test_class_weights_from_counts():
    w = class_weights_from_counts([1, 3, 0])     # 1/N = [1, 1/3, (absent -> max) 1], normalised
    assert torch.allclose(w, torch.tensor([3 / 7, 1 / 7, 3 / 7]))
    with pytest.raises(SetupError):
        class_weights_from_counts([0, 0])
    with pytest.raises(SetupError, match="class weights"):
        pixel_loss("mask-ce-bal", *_logits_labels()[:2])


# ----------------------------------------------------------------------------- APGD schedule

def test_apgd_checkpoints():
    assert apgd_checkpoints(90) == [18, 35, 50, 63, 74, 83]
    assert apgd_checkpoints(120) == [25, 48, 68, 85, 99, 110, 118]
    assert apgd_checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]  # AutoAttack's standard run


def test_prr_schedule():
    e = 8 / 255
    assert prr_schedule(300, e) == [(90, 2 * e), (90, 1.5 * e), (120, e)]
    assert prr_schedule(300, e, prr=False) == [(300, e)]
    assert prr_schedule(3, e) == [(3, e)]


# ----------------------------------------------------------------------------- exact robust accuracy

class PixelLinear(nn.Module):
    """z_c(x) = w_c . x_pixel + b_c at every pixel: L-inf robust iff (z_y - z_c) > eps ||w_y - w_c||_1 for all c."""

    def __init__(self, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(classes, 3, generator=g) * 3)
        self.b = nn.Parameter(torch.randn(classes, generator=g) * 0.02)

    def forward(self, x):
        return torch.einsum("ck,bkhw->bchw", self.w, x) + self.b.view(1, -1, 1, 1)

    def robust(self, x, y, eps):
        z = self(x)
        valid = y != IGN
        yv = torch.where(valid, y, torch.zeros_like(y))
        zy = z.gather(1, yv[:, None])[:, 0]
        ok = valid.clone()
        for c in range(z.shape[1]):
            dist = (self.w[yv] - self.w[c]).abs().sum(-1)
            ok &= (yv == c) | (zy - z[:, c] > eps * dist)
        return ok.sum().item() / valid.sum().item()


def _linear_case(eps):
    g = torch.Generator().manual_seed(0)
    model = PixelLinear()
    x = torch.rand(8, 3, 16, 16, generator=g) * (1 - 2 * eps) + eps   # box never binds inside the eps ball
    with torch.no_grad():
        y = model(x).argmax(1)
    y[torch.rand(y.shape, generator=g) < 0.1] = IGN
    return model, x, y


@pytest.mark.parametrize("name,opts", [
    ("pgd", dict(alpha=2.0, steps=100)),
    ("apgd", dict(steps=100)),
    ("apgd", dict(steps=100, loss="mask-ce", prr=True)),
    ("apgd", dict(steps=100, loss="js", prr=True, early_stop=True)),
])
def test_exact_robust_accuracy_of_linear_model(name, opts):
    eps = 32.0
    model, x, y = _linear_case(eps / 255)
    with attack_mode(model):
        exact = model.robust(x, y, eps / 255)
        assert 0.3 < exact < 0.9                                   # a non-trivial case
        x_adv = build_attack(name, eps=eps, **opts)(model, x, y)
        valid = y != IGN
        acc = ((model(x_adv).argmax(1) == y) & valid).sum().item() / valid.sum().item()
    assert exact - 1e-9 <= acc <= exact + 0.01


# ----------------------------------------------------------------------------- invariants

class TinyConv(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _batch(seed=0, B=2, H=9, W=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=g)
    x[:, :, :2] = 0.0                                            # pixels at the box edges
    x[:, :, -2:] = 1.0
    y = torch.randint(0, 4, (B, H, W), generator=g)
    y[:, 0] = IGN
    return x, y


SINGLE = [
    ("fgsm", {}), ("pgd", dict(alpha=2.0, steps=3)), ("segpgd", dict(alpha=2.0, steps=3)),
    ("cospgd", dict(alpha=2.0, steps=3)), ("mim", dict(alpha=2.0, steps=3)),
    ("mim", dict(alpha=2.0, steps=3, decay=0.5, normalize_grad=False)),
    ("apgd", dict(steps=5)), ("apgd", dict(steps=10, prr=True, loss="js")),
    ("apgd", dict(steps=10, prr=True, loss="mask-ce-bal", class_weights=[0.1, 0.2, 0.3, 0.4])),
    ("apgd", dict(steps=4, loss="segpgd")), ("apgd", dict(steps=4, loss="mask-norm-corrlog")),
    ("padam", dict(steps=3)), ("padam", dict(steps=3, loss="cos", alpha=4.0)), ("dag", dict(steps=5, gamma=0.003)),
    ("houdini", dict(steps=3, alpha=2.0)), ("houdini", dict(steps=3, decay=None)),
]


@pytest.mark.parametrize("name,opts", SINGLE)
def test_attack_stays_in_ball_and_box_and_leaves_no_param_grad(name, opts):
    torch.manual_seed(0)
    model = TinyConv()                                             # parameters still require grad
    x, y = _batch()
    eps = 8.0
    x_adv = build_attack(name, eps=eps, **opts)(model, x, y)
    assert (x_adv - x).abs().max().item() <= eps / 255 + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv != x).any()


def test_every_registered_attack_is_covered():
    covered = {n for n, _ in SINGLE} | {"multitask", "transfer"}
    assert covered == set(ATTACKS.names())


def test_attack_declarations_are_read_once_at_registration_not_from_function_attributes():
    from attacks.registry import attack_spec
    for name in ATTACKS.names():
        assert not vars(ATTACKS.get(name)), name                   # nothing set on the function itself
    multitask, pgd = attack_spec(ATTACKS.get("multitask")), attack_spec(ATTACKS.get("pgd"))
    assert multitask.multitask and not pgd.multitask
    assert build_attack("multitask", eps=8.0, steps=2).multitask and not build_attack("pgd", eps=8.0, steps=2).multitask
    assert pgd.required == ("eps", "steps") and "counter" not in pgd.options and pgd.takes_rng
    assert attack_spec(ATTACKS.get("dag")).check is not None and attack_spec(ATTACKS.get("transfer")).prepare is not None
    with pytest.raises(SetupError, match="gamma must be > 0"):
        build_attack("dag", eps=8.0, gamma=0.0)


# (name, options, whether the first iterate is x itself): every attack that can start at x, both ways
STARTS = [
    ("fgsm", {}, True), ("pgd", dict(alpha=2.0, steps=3), False), ("pgd", dict(alpha=2.0, steps=3, random_start=False), True),
    ("segpgd", dict(steps=3, random_start=False), True), ("cospgd", dict(steps=3), False),
    ("mim", dict(steps=3), True), ("mim", dict(steps=3, random_start=True), False),
    ("apgd", dict(steps=5), False), ("apgd", dict(steps=10, prr=True, random_start=False), True),
    ("padam", dict(steps=3), False), ("dag", dict(steps=5, gamma=0.003), True),
    ("houdini", dict(steps=3), False), ("houdini", dict(steps=3, random_start=False), True),
    ("multitask", dict(steps=2), False), ("multitask", dict(steps=2, random_start=False), True),
]


@pytest.mark.parametrize("name,opts,at_x", STARTS)
def test_clean_forward_is_the_forward_of_x_exactly_when_the_attack_starts_there(name, opts, at_x):
    """``attack(forward, x, y, clean_forward=f)``: f replaces forward for the one pass at x itself when the
    attack declares a start at x (``starts_at_x``), and is never called otherwise; x_adv and the pass
    counts are those of the call without it."""
    torch.manual_seed(0)
    if name == "multitask":
        model, x = TwoTask(), torch.rand(2, 3, 8, 8)
        y = {"seg": torch.randint(0, 3, (2, 8, 8)), "depth": torch.rand(2, 1, 8, 8)}
    else:
        model, (x, y) = TinyConv(), _batch()
    seen = []

    def clean_forward(inp):
        seen.append((inp.detach().clone(), inp.requires_grad))
        return model(inp)
    attack, plain = build_attack(name, eps=8.0, **opts), build_attack(name, eps=8.0, **opts)
    assert attack.starts_at_x == at_x
    x_adv = attack(model, x, y, keys=[0, 1], clean_forward=clean_forward)
    assert torch.equal(x_adv, plain(model, x, y, keys=[0, 1]))
    assert (attack.counter.forward, attack.counter.backward) == (plain.counter.forward, plain.counter.backward)
    assert len(seen) == int(at_x) and all(torch.equal(inp, x) and grad for inp, grad in seen)


def test_starts_at_x_is_declared_with_clean_forward():
    """Every attack that can start at x is checked above; one that declares it must take clean_forward."""
    from attacks import register_attack
    assert {n for n, _, _ in STARTS} == set(ATTACKS.names()) - {"transfer"}    # transfer runs on its source
    assert not build_attack("transfer", eps=8.0, steps=2, source_forward=TinyConv()).starts_at_x
    with pytest.raises(TypeError, match="attack 'x': declare starts_at_x exactly when the function takes clean_forward"):
        register_attack("x", starts_at_x=lambda options: True)(lambda forward, x, y, *, eps: x)
    with pytest.raises(TypeError, match="attack 'x'"):
        register_attack("x")(lambda forward, x, y, *, eps, clean_forward=None: x)
    assert "x" not in ATTACKS.names()


def test_no_function_in_the_attacks_or_the_metrics_is_over_60_lines():
    import ast
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "attacks", "*.py"))) + [os.path.join(root, "utils", "metrics.py")]
    lengths = {}
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{os.path.basename(path)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert max(lengths.values()) > 40                               # it measures real functions
    assert {k: n for k, n in lengths.items() if n > 60} == {}


def test_pass_counts_are_totals_over_images_and_calls():
    """PassCounter (and metrics.json's forward_passes / backward_passes): one per image per pass, summed
    over the batch and over every call: PGD-4 on 3 images counts 12, then on 2 more 20 in all."""
    model = TinyConv()
    x, y = _batch(B=3)
    a = build_attack("pgd", eps=8.0, alpha=2.0, steps=4)
    a(model, x, y, keys=[0, 1, 2])
    assert (a.counter.forward, a.counter.backward) == (4 * 3, 4 * 3)
    a(model, x[:2], y[:2], keys=[3, 4])
    assert (a.counter.forward, a.counter.backward) == (4 * 5, 4 * 5)


def test_apgd_pass_counts_and_early_stop():
    torch.manual_seed(0)  # the model's weights, whatever ran before
    model = TinyConv()
    x, y = _batch()
    B = x.shape[0]
    a = build_attack("apgd", eps=8.0, steps=10)
    a(model, x, y)
    assert (a.counter.forward, a.counter.backward) == (11 * B, 10 * B)   # last backward skipped
    a = build_attack("apgd", eps=8.0, steps=10, prr=True)                # stages 3, 3, 4
    a(model, x, y)
    assert (a.counter.forward, a.counter.backward) == (13 * B, 10 * B)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 4                            # every pixel already wrong
    # no random start: the first iterate is x itself, wrong at every pixel (from a random start some
    # pixels can turn right, for 1 in 7 random models, and then no image leaves)
    a = build_attack("apgd", eps=8.0, steps=50, early_stop=True, random_start=False)
    a(model, x, wrong)
    assert a.counter.forward == (1 + EARLY_STOP_EVERY) * B


def test_mim_matches_plain_momentum_loop():
    model, x, y = _linear_case(32 / 255)
    eps, alpha, steps = 8 / 255, 2 / 255, 4
    x_adv = build_attack("mim", eps=8.0, alpha=2.0, steps=steps, decay=0.5, normalize_grad=False)(model, x, y)
    xa, m = x.clone(), torch.zeros_like(x)
    n_pix = y[0].numel()
    for _ in range(steps):                                         # MTRobust: m = 0.5 m + g, step sign(m)
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y, ignore_index=IGN, reduction="sum") / n_pix
        (g,) = torch.autograd.grad(loss, xa)
        m = 0.5 * m + g
        xa = torch.min(torch.max(xa.detach() + alpha * m.sign(), x - eps), x + eps).clamp(0, 1)
    assert torch.allclose(x_adv, xa, atol=1e-7)


class TwoTask(nn.Module):
    """Segmentation reads channel 0 only, depth reads channel 1 only."""

    def __init__(self):
        super().__init__()
        self.seg = nn.Conv2d(1, 3, 3, padding=1)
        self.depth = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return {"seg": self.seg(x[:, :1]), "depth": self.depth(x[:, 1:2])}


def test_multitask_attacks_only_the_chosen_tasks():
    torch.manual_seed(0)
    model = TwoTask()
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.25
    y = {"seg": torch.randint(0, 3, (2, 8, 8)), "depth": torch.rand(2, 1, 8, 8)}
    d = build_attack("multitask", eps=8.0, alpha=2.0, steps=2, tasks=["seg"], random_start=False)(model, x, y) - x
    assert d[:, 0].abs().sum() > 0 and (d[:, 1:] == 0).all()
    d = build_attack("multitask", eps=8.0, alpha=2.0, steps=2, tasks=["depth"], random_start=False)(model, x, y) - x
    assert d[:, 1].abs().sum() > 0 and (d[:, [0, 2]] == 0).all()
    a = build_attack("multitask", eps=8.0, alpha=2.0, steps=2, random_start=False, decay=0.5, normalize_grad=False)
    d = a(model, x, dict(y, depth_mask=torch.zeros(2, 1, 8, 8)))   # depth fully masked: no depth gradient
    assert d.sub(x)[:, 1].abs().sum() == 0 and d.sub(x)[:, 0].abs().sum() > 0
    assert a.counter.forward == 4 and all(p.grad is None for p in model.parameters())
    with pytest.raises(SetupError, match="task 'normal'"):
        build_attack("multitask", eps=8.0, alpha=2.0, steps=1, tasks=["normal"])(model, x, y)


class SharedTwoTask(nn.Module):
    """Segmentation and depth both read every input channel, so their gradients compete at each pixel."""

    def __init__(self):
        super().__init__()
        self.seg = nn.Conv2d(3, 3, 3, padding=1)
        self.depth = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return {"seg": self.seg(x), "depth": self.depth(x)}


def test_multitask_attack_on_an_image_does_not_depend_on_its_batch():
    """Two attacked tasks: image 0 (5 % of its pixels labelled) attacked alone and inside a batch of fully
    labelled images gives the same adversarial image (the CE is each image's own mean, not the batch's)."""
    torch.manual_seed(0)
    model = SharedTwoTask()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 16, 16, generator=g) * 0.5 + 0.25
    seg = torch.randint(0, 3, (3, 16, 16), generator=g)
    seg[0][torch.rand(16, 16, generator=g) > 0.05] = IGN
    y = {"seg": seg, "depth": torch.rand(3, 1, 16, 16, generator=g) * 2}
    attack = build_attack("multitask", eps=16.0, alpha=2.0, steps=5, tasks=["seg", "depth"], random_start=False)
    alone = attack(model, x[:1], {k: v[:1] for k, v in y.items()})
    batched = attack(model, x, y)
    assert (alone - x[:1]).abs().amax() > 0
    assert torch.allclose(alone, batched[:1], atol=1e-6)


def test_transfer_crafts_on_the_source_only():
    source = TinyConv()
    x, y = _batch()

    def target(_):
        raise AssertionError("the target must not be queried while crafting")

    a = build_attack("transfer", eps=8.0, source_forward=source, inner="pgd", alpha=2.0, steps=3,
                     source_config="cfg.yaml")
    x_adv = a(target, x, y)
    torch.manual_seed(0)
    assert (x_adv - x).abs().max().item() <= 8 / 255 + 1e-6
    assert (a.counter.forward, a.counter.backward) == (3 * x.shape[0], 3 * x.shape[0])
    assert "source_forward" not in repr(a) and "cfg.yaml" in repr(a)
    with pytest.raises(SetupError, match="source_forward"):
        build_attack("transfer", eps=8.0)
    with pytest.raises(SetupError, match="valid: .*apgd"):
        build_attack("transfer", eps=8.0, source_forward=source, inner="pgdd")
    with pytest.raises(SetupError, match="no option 'loss'"):
        build_attack("transfer", eps=8.0, source_forward=source, inner="fgsm", inner_options={"loss": "js"})


def test_transfer_alpha_in_inner_options_is_in_config_units():
    """An alpha in inner_options is 1/255 like the top-level one: one unclipped step of 2/255 (eps 16), the
    same attack as with alpha at the top level, and scaled with eps by a warm-up."""
    source = TinyConv()
    x, y = _batch()
    x = x * 0.5 + 0.25                                              # away from the [0,1] box
    nested = build_attack("transfer", eps=16.0, source_forward=source, inner="pgd",
                          inner_options={"alpha": 2.0, "steps": 1, "random_start": False})
    top = build_attack("transfer", eps=16.0, source_forward=source, inner="pgd", alpha=2.0,
                       inner_options={"steps": 1, "random_start": False})
    d = nested(source, x, y) - x
    assert d.abs().amax().item() == pytest.approx(2 / 255, abs=1e-6)
    assert torch.equal(d, top(source, x, y) - x)
    nested.set_scale(0.5)
    assert (nested(source, x, y) - x).abs().amax().item() == pytest.approx(1 / 255, abs=1e-6)
    with pytest.raises(SetupError, match="alpha given both"):
        build_attack("transfer", eps=16.0, source_forward=source, alpha=1.0, inner_options={"alpha": 2.0, "steps": 1})


def _first_step(attack, model, x, y, keys=None) -> torch.Tensor:
    """|x_1 - x_0|: the first step the attack takes (the inputs of its first two forwards)."""
    seen = []

    def fwd(z):
        seen.append(z.detach().clone())
        return model(z)
    attack(fwd, x, y, keys)
    return (seen[1] - seen[0]).abs()


@pytest.mark.parametrize("name", ["pgd", "mim", "segpgd", "cospgd", "multitask", "houdini"])
def test_default_step_size_is_two_and_a_half_eps_over_steps(name):
    """No alpha: the first step is 2.5 eps / steps (Madry et al.) wherever the gradient is not 0 (SegPGD's
    first loss has only the correct pixels); an explicit alpha is kept."""
    torch.manual_seed(0)
    if name == "multitask":
        model, x = SharedTwoTask(), torch.rand(2, 3, 9, 9) * 0.5 + 0.25
        y = {"seg": torch.randint(0, 3, (2, 9, 9)), "depth": torch.rand(2, 1, 9, 9)}
    else:
        model, (x, y) = TinyConv(), _batch()
        x = x * 0.5 + 0.25                                           # steps never meet the [0,1] box
    for opts, step in (({}, 2.5 * 8 / 10), ({"alpha": 1.0}, 1.0)):
        a = build_attack(name, eps=8.0, steps=10, random_start=False, **opts)
        d = _first_step(a, model, x, y)
        moved = d[d > 0]
        assert moved.numel() > d.numel() / 2 and torch.allclose(moved, torch.full_like(moved, step / 255), atol=1e-6)
    assert "alpha" not in build_attack(name, eps=8.0, steps=10).options      # nothing resolved at build time


def test_config_without_alpha_runs_with_the_default_of_each_eps():
    """``{name: pgd, steps: 10}`` loads (it needed alpha) and each eps of test.eps gets 2.5 eps / 10."""
    from engine.evaluator import build_attack_runs
    from utils.config import ROOT, load_config
    cfg = load_config(os.path.join(ROOT, "config", "_base_", "default.yaml"),
                      ["test.attacks=[{name: pgd, steps: 10}]", "test.eps=[4, 8]"])
    runs = build_attack_runs(cfg)
    assert [r.key for r in runs] == ["pgd@4", "pgd@8"]
    model, (x, y) = TinyConv(), _batch()
    x = x * 0.5 + 0.25
    for r, eps in zip(runs, (4.0, 8.0)):
        d = _first_step(r.attack, model, x, y, keys=[0, 1])
        # a random start near the ball's edge clips some first steps; none is longer than alpha
        assert d.amax().item() == pytest.approx(2.5 * eps / 10 / 255, abs=1e-6)
        assert (d > 2.5 * eps / 10 / 255 - 1e-6).float().mean() > 0.5


# ----------------------------------------------------------------------------- build errors

def test_build_errors_name_the_valid_choices():
    with pytest.raises(SetupError, match="valid: apgd, cospgd, dag"):
        build_attack("apdg", eps=8.0)
    with pytest.raises(SetupError, match="unknown loss 'jsd'.*valid: ce, cos, cospgd, js"):
        build_attack("apgd", eps=8.0, loss="jsd")
    for bad in (0.0, -1.0):
        with pytest.raises(SetupError, match="eps must be > 0"):
            build_attack("apgd", eps=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(SetupError, match="steps must be an integer"):
            build_attack("pgd", eps=8.0, alpha=1.0, steps=bad)
    with pytest.raises(SetupError, match="no option 'stepz'"):
        build_attack("apgd", eps=8.0, stepz=3)


@pytest.mark.parametrize("name,opts,message", [
    ("pgd", {"alpha": "fast", "steps": 2}, "attack 'pgd': alpha must be a number or null, got 'fast'"),
    ("pgd", {"alpha": 2.0, "steps": 2, "random_start": "yes"}, "attack 'pgd': random_start must be true or false"),
    ("pgd", {"alpha": 2.0, "steps": 2, "loss": 3}, "attack 'pgd': loss must be a string, got 3"),
    ("mim", {"alpha": 2.0, "steps": 2, "decay": "slow"}, "attack 'mim': decay must be a number, got 'slow'"),
    ("mim", {"alpha": 2.0, "steps": 2, "decay": -0.5}, "attack 'mim': decay must be >= 0"),
    ("apgd", {"prr": 1}, "attack 'apgd': prr must be true or false, got 1"),
    ("multitask", {"alpha": 2.0, "steps": 1, "decay": [1]}, "attack 'multitask': decay must be a number or null"),
    ("transfer", {"inner": "pgd", "alpha": "x", "source_forward": print}, "attack 'transfer': alpha must be a number or null"),
    ("transfer", {"inner": "pgd", "alpha": 1.0, "steps": 1, "inner_options": {"random_start": 2},
                  "source_forward": print}, "attack 'pgd': random_start must be true or false"),
    ("dag", {"gamma": 0.0}, "attack 'dag': gamma must be > 0"),
    ("padam", {"loss": "cosine"}, "unknown loss 'cosine'"),
])
def test_option_types_follow_the_attack_signature(name, opts, message):
    with pytest.raises(SetupError) as e:
        build_attack(name, eps=8.0, **opts)
    assert str(e.value).startswith(message), str(e.value)


def test_exponent_floats_are_numbers_and_null_stays_allowed():
    a = build_attack("pgd", eps=8.0, alpha="1e-1", steps=2)       # YAML 1.1 reads 1e-1 as a string
    assert a.options["alpha"] == 0.1 and a.kwargs["alpha"] == pytest.approx(0.1 / 255)
    assert build_attack("multitask", eps=8.0, alpha=2.0, steps=1, decay=None).options["decay"] is None


# ----------------------------------------------------------------------------- ensembles

def test_ensemble_members():
    sea = ensemble_members("sea")
    assert [m[2]["loss"] for m in sea] == ["mask-ce-bal", "mask-ce", "js"]
    assert all(m[1] == "apgd" and m[2]["steps"] == 300 and m[2]["prr"] and m[2]["random_start"] for m in sea)
    rse = ensemble_members("rse")                                         # Halmosi et al.'s settings
    assert [(m[1], m[2].get("loss"), m[2].get("gamma")) for m in rse] == [
        ("apgd", "mask-ce", None), ("apgd", "js", None), ("apgd", "segpgd", None), ("apgd", "mask-norm-corrlog", None),
        ("padam", "cos", None), ("padam", "ce", None), ("dag", None, 0.003), ("dag", None, 0.001)]
    assert all(m[2]["steps"] == 300 and not m[2]["prr"] and m[2]["random_start"] for m in rse[:4])
    assert all(m[2]["steps"] == 200 for m in rse[4:]) and all(m[2]["alpha"] == 2.0 for m in rse[4:6])
    assert ensemble_members("sea+") == sea + rse                         # the union, SEA first
    sea[0][2]["steps"] = 1
    assert ensemble_members("sea")[0][2]["steps"] == 300                  # copies
    with pytest.raises(SetupError, match="valid: rse, sea, sea\\+"):
        ensemble_members("sae")


def test_expand_attacks():
    groups = expand_attacks([
        {"name": "sea", "steps": 20},
        {"name": "pgd", "alpha": 2.0, "steps": 5, "label": "pgd5"},
        {"name": "ensemble", "label": "mine", "members": ["fgsm", {"name": "apgd", "loss": "js", "label": "aj"}]},
    ])
    assert [g.label for g in groups] == ["sea", "pgd5", "mine"]
    assert [g.is_ensemble for g in groups] == [True, False, True]
    assert all(m[2]["steps"] == 20 for m in groups[0].members)
    assert groups[1].members == [("pgd5", "pgd", {"alpha": 2.0, "steps": 5})]
    assert groups[2].members == [("fgsm", "fgsm", {}), ("aj", "apgd", {"loss": "js"})]
    assert [needs_class_weights(m[2]) for m in groups[0].members] == [True, False, False]
    for label, name, opts in groups[0].members + groups[2].members:   # every member builds
        build_attack(name, eps=8.0, **dict(opts, **({"class_weights": [1.0] * 4} if needs_class_weights(opts) else {})))
    with pytest.raises(SetupError, match="repeated labels"):
        expand_attacks(["fgsm", "fgsm"])
    with pytest.raises(SetupError, match="unknown attack 'pgx'"):
        expand_attacks([{"name": "ensemble", "members": ["pgx"]}])
    with pytest.raises(SetupError, match="cannot be a member"):
        expand_attacks([{"name": "ensemble", "members": ["sea"]}])


def test_sea_members_run_and_count():
    model = TinyConv()
    x, y = _batch()
    counter = PassCounter()
    for label, name, opts in ensemble_members("sea"):
        opts = dict(opts, steps=4, early_stop=False)
        if needs_class_weights(opts):
            opts["class_weights"] = class_weights_from_counts([5, 1, 2, 3]).tolist()
        a = build_attack(name, eps=4.0, **opts)
        x_adv = a(model, x, y)
        assert (x_adv - x).abs().max().item() <= 4 / 255 + 1e-6
        counter.forward += a.counter.forward
    assert counter.forward == 3 * (2 + 2 + 3) * x.shape[0]             # PRR stages of 1, 1, 2 iterations


# ----------------------------------------------------------------------------- seeded random starts

def test_image_seeds_depend_on_the_image_not_the_batch():
    from attacks import image_seeds
    like = torch.zeros(3, 3, 4, 5, dtype=torch.float64)
    a = image_seeds(0, "pgd@8", [7, 2, 9]).uniform(like, 0.5)
    b = image_seeds(0, "pgd@8", [2]).uniform(like[:1], 0.5)
    assert a.dtype == torch.float64 and a.abs().max() <= 0.5 and a.abs().max() > 0.4
    assert torch.equal(a[1], b[0])                                   # image 2's draw, whatever its batch
    assert not torch.equal(a[0], a[1])                               # images differ
    for other in (image_seeds(1, "pgd@8", [7]), image_seeds(0, "pgd@4", [7]), image_seeds(0, "pgd@8", [(7, 1)])):
        assert not torch.equal(other.uniform(like[:1], 0.5)[0], a[0])  # seed, label and key all matter
    assert not torch.equal(image_seeds(0, "pgd@8", [7]).uniform(like[:1], 0.5, restart=1)[0], a[0])


@pytest.mark.parametrize("name,opts", [("pgd", {"alpha": 2.0, "steps": 2}), ("apgd", {"steps": 3}),
                                       ("segpgd", {"alpha": 2.0, "steps": 2}), ("mim", {"alpha": 2.0, "steps": 2,
                                                                                      "random_start": True})])
def test_random_start_is_reproducible_per_image(name, opts):
    """Batch 1 and batch 3 give the same adversarial images when seeded by image keys; the global
    torch generator plays no part."""
    model = TinyConv()
    x, y = _batch()
    x, y = torch.cat([x, x.flip(0)[:1]]), torch.cat([y, y.flip(0)[:1]])
    attack = build_attack(name, eps=8.0, seed=3, label="run", **opts)
    keys = [10, 11, 12]
    torch.manual_seed(0)
    whole = attack(model, x, y, keys)
    torch.manual_seed(123)
    single = torch.cat([attack(model, x[i:i + 1], y[i:i + 1], [keys[i]]) for i in range(3)])
    assert torch.allclose(whole, single, atol=1e-6)
    if name != "apgd":  # (APGD's first step of 2 eps reaches the same corners from any start of this model)
        other = build_attack(name, eps=8.0, seed=4, label="run", **opts)(model, x, y, keys)
        assert not torch.allclose(whole, other)                    # another seed, another start


def test_sea_published_weights():
    from attacks.sea_weights import ADE20K, VOC, published_class_weights
    assert len(VOC) == 21 and len(ADE20K) == 151
    assert sum(VOC) == pytest.approx(1.0, abs=1e-6) and sum(ADE20K) == pytest.approx(1.0, abs=1e-5)
    assert VOC[0] == 0.0007 and VOC[15] == 0.0089 and max(VOC) == VOC[2] == 0.1394   # background, person, bicycle
    assert ADE20K[0] == 2.5511e-05 and max(ADE20K) == 3.6659e-02
    assert published_class_weights("voc2012", 21) == list(VOC)
    assert published_class_weights("ade20k", 151) == list(ADE20K)
    w150 = published_class_weights("ade20k", 150)           # mmseg's 150 classes: class 0 dropped
    assert len(w150) == 150 and sum(w150) == pytest.approx(1.0)
    assert w150[5] / w150[9] == pytest.approx(ADE20K[6] / ADE20K[10])
    assert published_class_weights("cityscapes", 19) is None and published_class_weights("voc2012", 20) is None


# ----------------------------------------------------------------------------- PAdam, DAG, Houdini, rse

def test_cos_loss_equals_one_minus_cosine_with_the_one_hot_label():
    z, y = _logits_labels(seed=4, C=5, scale=2.0)
    valid = y != IGN
    onehot = F.one_hot(torch.where(valid, y, 0), 5).permute(0, 3, 1, 2).to(z.dtype)
    want = torch.where(valid, 1 - F.cosine_similarity(z, onehot, dim=1), torch.zeros_like(z[:, 0]))
    got = pixel_loss("cos", z, y, IGN)
    assert want[valid].std() > 0.1                                  # a case where the pixels differ
    assert torch.allclose(got, want, atol=1e-12)
    zz = z.clone().requires_grad_(True)                             # gradient: autograd of the definition
    (g,) = torch.autograd.grad(pixel_loss("cos", zz, y, IGN).sum(), zz)
    zz2 = z.clone().requires_grad_(True)
    d = torch.where(valid, 1 - F.cosine_similarity(zz2, onehot, dim=1), torch.zeros_like(z[:, 0]))
    (g2,) = torch.autograd.grad(d.sum(), zz2)
    assert torch.allclose(g, g2, atol=1e-12)


def test_padam_matches_a_plain_adam_loop():
    """PAdam = torch.optim.Adam(lr, amsgrad, maximize) on delta from the seeded uniform start, the
    per-image pixel-mean CE summed over images, delta clipped to the ball and the box after each step."""
    from attacks import image_seeds
    model, x, y = _linear_case(32 / 255)
    x, y = x[:3], y[:3]
    eps, lr, steps, keys = 8 / 255, 3 / 255, 4, [4, 7, 9]
    with attack_mode(model):
        attack = build_attack("padam", eps=8.0, alpha=3.0, steps=steps, seed=5, label="p")
        x_adv = attack(model, x, y, keys)
        start = (x + image_seeds(5, "p", keys).uniform(x, eps)).clamp(0, 1) - x
        delta = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr, amsgrad=True, maximize=True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y, ignore_index=IGN, reduction="sum") / y[0].numel()
            delta.grad = torch.autograd.grad(loss, delta)[0]
            opt.step()
            with torch.no_grad():
                delta.clamp_(-eps, eps)
                delta.copy_((x + delta).clamp(0, 1) - x)
    assert (x_adv - (x + start)).abs().max() > 2 / 255              # it moved from its start
    assert torch.allclose(x_adv, x + delta.detach(), atol=1e-6)
    assert (attack.counter.forward, attack.counter.backward) == (3 * steps, 3 * steps)


def test_houdini_gradient_is_its_custom_backward():
    """Pixel 0 correct, pixel 1 wrong (argmax 2), pixel 2 ignored. Value (1 - Phi(m)) w, m = s_y - s_max,
    w = the image's mIoU in % (classes 0, 1, 2: IoU 1, 0, 0); gradient on the log-softmax scores s:
    +phi(m) w on the argmax channel and -phi(m) w on the true one, only -phi(0) w at the correct pixel
    (where the exact derivative is 0); then through the log-softmax: g_z = g_s - p * sum(g_s)."""
    z = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.0, 1.7], [0.0, 3.0, 0.0]], dtype=torch.float64).T.reshape(1, 3, 1, 3)
    y = torch.tensor([[[0, 1, IGN]]])
    w = 100 * (1 / (1 + 1e-7)) / 3
    s = F.log_softmax(z, 1)[0, :, 0]                                # [C, pixels]
    phi = lambda m: math.exp(-m * m / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    m0, m1 = 0.0, (s[1, 1] - s[2, 1]).item()
    want_v = torch.tensor([0.5 * w, 0.5 * math.erfc(m1 / math.sqrt(2)) * w, 0.0], dtype=torch.float64)
    gs = torch.zeros(3, 3, dtype=torch.float64)
    gs[0, 0] = -phi(m0) * w
    gs[2, 1], gs[1, 1] = phi(m1) * w, -phi(m1) * w
    p = s.exp()
    want_g = gs - p * gs.sum(0, keepdim=True)
    zz = z.clone().requires_grad_(True)
    v = houdini_loss(zz, y, IGN)
    (g,) = torch.autograd.grad(v.sum(), zz)
    assert torch.allclose(v[0, 0], want_v, atol=1e-12)
    assert torch.allclose(g[0, :, 0], want_g, atol=1e-12)
    assert g[0, :, 0, 0].abs().max() > 1                            # the correct pixel does get a gradient


def test_dag_flips_exactly_the_pixels_a_hand_computation_says():
    """Two classes, z_0 = x_R - 1/2 and z_1 = 0 at every pixel: a correct pixel's margin has gradient
    +-1 in R only, so every step moves each still-correct pixel's R by gamma towards 1/2 (the L-inf
    normalisation divides by 1). Inside the eps ball a pixel flips iff |x_R - 1/2| < eps; ignored and
    already-wrong pixels never move. Image 1 (all margins <= 0.025 < 9 gamma) is at 0 accuracy at
    iteration 9 and leaves the batch at iteration 10."""
    def forward(x):
        return torch.stack([x[:, 0] - 0.5, torch.zeros_like(x[:, 0])], 1)
    eps, gamma, steps = 8 / 255, 0.003, 30
    g = torch.Generator().manual_seed(0)
    m0 = torch.tensor([0.001, -0.004, 0.01, -0.02, 0.025, -0.03, 0.0335, -0.04, 0.06, -0.2, 0.012, -0.015])
    m1 = torch.tensor([0.001, -0.004, 0.01, -0.02, 0.025, -0.025, 0.002, -0.011, 0.02, -0.013, 0.017, -0.006])
    x = torch.rand(2, 3, 3, 4, generator=g) * 0.5 + 0.25
    x[:, 0] = 0.5 + torch.stack([m0, m1]).view(2, 3, 4)
    y = (x[:, 0] < 0.5).long()                                       # every pixel correct
    y[0, 0, 1] = IGN                                                  # an ignored pixel of margin 0.004
    y[0, 2, 3] = 1 - y[0, 2, 3]                                       # a wrong pixel
    a = build_attack("dag", eps=8.0, gamma=gamma, steps=steps)
    x_adv = a(forward, x, y)
    valid = y != IGN
    flipped = (forward(x_adv).argmax(1) != y) & valid
    want = valid & ((x[:, 0] - 0.5).abs() < eps)
    want[0, 2, 3] = True                                              # wrong from the start
    assert flipped.sum() > 5 and (~flipped & valid).sum() > 3        # both kinds in the case
    assert torch.equal(flipped, want)
    assert torch.equal(x_adv[:, 1:], x[:, 1:])                        # G and B: zero gradient
    assert x_adv[0, 0, 0, 1] == x[0, 0, 0, 1] and x_adv[0, 0, 2, 3] == x[0, 0, 2, 3]
    assert (x_adv - x).abs().max() <= eps + 1e-7
    assert (a.counter.forward, a.counter.backward) == (steps + 10, steps - 1 + 10)
    for n in (10, steps):                  # image 1 alone, stopped at its early stop or not: the same result
        assert torch.equal(build_attack("dag", eps=8.0, gamma=gamma, steps=n)(forward, x[1:], y[1:]), x_adv[1:])


def test_rse_and_sea_plus_entries_and_their_random_draws():
    groups = expand_attacks([{"name": "sea+", "steps": 7, "skip_solved": True}, "rse",
                             {"name": "sea", "label": "mine"}])
    plus, rse, sea = groups
    assert plus.skip_solved and not rse.skip_solved and all(m[2]["steps"] == 7 for m in plus.members)
    # sea+'s members draw the starts of the ensemble that defines them: it is the union run for run
    assert plus.seed_label("apgd-js", "8") == sea.seed_label("apgd-js", "8") == "sea/apgd-js@8"
    assert plus.seed_label("cos-padam", "8") == rse.seed_label("cos-padam", "8") == "rse/cos-padam@8"
    assert expand_attacks([{"name": "ensemble", "members": ["fgsm", "pgd"]}])[0].seed_label("pgd", "8") == \
        "ensemble/pgd@8"                                                 # a user ensemble: its key
    for bad in ("yes", 1):
        with pytest.raises(SetupError, match="skip_solved must be true or false"):
            expand_attacks([{"name": "rse", "skip_solved": bad}])


def _most_passes(name: str, opts: dict):
    """(forwards, backwards) per image a member costs at most (tested above for APGD, PAdam and DAG)."""
    steps = opts["steps"]
    if name == "apgd":
        stages = [n for n, _ in prr_schedule(steps, 1.0, opts["prr"])]
        return sum(stages) + len(stages), sum(stages)
    return {"padam": (steps, steps), "dag": (steps, steps - 1)}[name]


def test_ensemble_cost_table_is_the_sum_of_the_members():
    """docs/attacks.md's cost column (forward + backward passes per image, at most) is what the
    members' settings add up to."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "attacks.md")) as f:
        text = f.read()
    for ens in ("sea", "rse", "sea+"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{ens}` |"))
        f_, b_ = (int(v) for v in row.strip(" |").rsplit("|", 1)[1].split(" + "))
        costs = [_most_passes(name, opts) for _, name, opts in ensemble_members(ens)]
        assert (f_, b_) == (sum(c[0] for c in costs), sum(c[1] for c in costs)), ens
