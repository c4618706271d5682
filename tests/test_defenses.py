"""Training methods: the shared adversarial step (frozen parameters, BN statistics, train mode,
seeded starts, train.attack overrides) and each registered method: sat and ddcat (checked against
the published BIM and division labels written out by hand, and closed-form gradients), fpd (phases,
gate, cycle, clipping, exact resume), pirat (no gradient leak, AdamW groups, schedules, head init), mtl
(task weights and per-task losses by hand, one loss for training and attack, attacked tasks, clean targets,
mix_clean, parameters touched by one step, loss decrease, bad input)."""
from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.multitask import (CITYSCAPES_DISPARITY_SCALE, TaskLoss, multitask_loss, published_task_losses, task_loss,
                               task_targets)
from datasets import build_dataset
from defenses import DEFENSES, build_defense
from defenses.base import Defense, ce_and_logp, pixel_accuracy
from defenses.multitask import task_weights
from defenses.sat import clean_count, part_logs
from models import build_model
from models.ddcat import _DDCATMixin
from models.pspnet import ContextSegmentor, conv_head
from utils.config import load_config
from utils.errors import SetupError
from tests import data_fixtures as fx
from tests.conftest import ROOT


class _Adv(Defense):
    default_attack = {"name": "pgd", "eps": 8.0, "alpha": 2.0, "steps": 3, "random_start": True}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.cls = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.cls(torch.relu(self.bn(self.conv(x))))


def test_adversarial_step_freezes_the_model_and_is_seeded(tiny_cfg):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = _Net().train()
    x, y = torch.rand(4, 3, 9, 9), torch.randint(0, 3, (4, 9, 9))
    index = torch.tensor([5, 1, 7, 2])
    defense = _Adv(cfg)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    x_adv = defense.adversarial(net, x, y, index)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())   # BN statistics unchanged
    assert 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    ce = nn.functional.cross_entropy
    net.eval()
    with torch.no_grad():
        assert ce(net(x_adv), y) > ce(net(x), y)                                # really adversarial
    net.train()
    # the same image in another batch, same epoch: the same start; another epoch: another start
    again = defense.adversarial(net, x[1:2], y[1:2], index[1:2])
    assert torch.allclose(again[0], x_adv[1], atol=1e-6)
    defense.set_epoch(1)
    assert not torch.allclose(defense.adversarial(net, x[1:2], y[1:2], index[1:2])[0], x_adv[1])
    assert pixel_accuracy(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 1], [255, 0]]])) == pytest.approx(2 / 3)


def test_train_attack_overrides_and_replacements(tiny_cfg):
    a = _Adv(tiny_cfg("train.attack={steps: 5, eps: 4}")).attack
    assert (a.name, a.options["steps"], a.options["eps"], a.options["alpha"]) == ("pgd", 5, 4, 2.0)
    b = _Adv(tiny_cfg("train.attack={name: segpgd, alpha: 1, steps: 2}")).attack
    assert b.name == "segpgd" and b.options == {"eps": 8.0, "alpha": 1, "steps": 2}
    with pytest.raises(SetupError, match="attack 'pgd' has no option 'stepz'"):
        _Adv(tiny_cfg("train.attack={stepz: 5}"))
    assert "training attack pgd(" in _Adv(tiny_cfg()).describe()


def test_unknown_method_lists_the_valid_ones(tiny_cfg):
    with pytest.raises(SetupError, match="unknown training method .*'nonee'.*valid: .*none"):
        build_defense(tiny_cfg("train.method=nonee"))
    assert "none" in DEFENSES.names()


# ---------------------------------------------------------------- sat and ddcat (ddcat.md §2, §3)
EPS, ALPHA = 7.65 / 255, 2.55 / 255  # the published BIM: eps 0.03, 3 steps of 0.01, no random start
SMALL = ["model.layers=18", "model.width=0.0625", "data.crop_size=[17,17]"]


def synthetic_batch(cfg, n: int, start: int = 0) -> dict:
    """n training images of the synthetic fixture (augmented crops, fixed by seed, epoch and index)."""
    ds = build_dataset(cfg, "train")
    return torch.utils.data.default_collate([ds[i] for i in range(start, start + n)])


def bim_by_hand(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """The published BIM written out: eval mode, CE(main logits) per image, sign steps, clip to the
    eps ball and [0,1] (the per-image mean over H*W only scales each image's gradient)."""
    was = net.training
    net.eval()
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(net(xa), y, ignore_index=255, reduction="none").flatten(1).mean(1).sum()
        g, = torch.autograd.grad(loss, xa)
        xa = torch.min(torch.max(xa.detach() + ALPHA * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    net.train(was)
    return xa


def routed_argmax_by_hand(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of f_a where argmax f_m == 1, of f_n elsewhere; eval mode."""
    was = net.training
    net.eval()
    with torch.no_grad():
        o = net.outputs(x)
    net.train(was)
    return torch.where(o["mask"].argmax(1) == 1, o["adv"].argmax(1), o["out"].argmax(1))


def bn_state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def attack_phase_probe(net: nn.Module, checked: list):
    """A pre-hook on the training forward: by then the attack (and DDC-AT's routed forwards) must
    have left no gradient on any parameter, every parameter trainable, BN statistics unchanged."""
    before = bn_state(net)

    def hook(module, args):
        if module.training:
            assert all(p.grad is None and p.requires_grad for p in module.parameters())
            assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
            checked.append(args[0].detach().clone())
    return net.register_forward_pre_hook(hook)


def test_sat_and_ddcat_clean_count():
    assert [clean_count(b, f) for b, f in [(4, 0.5), (3, 0.5), (1, 0.5), (2, 0.5), (4, 1.0), (4, 0.0), (8, 0.25),
                                           (16, 0.5)]] == [2, 1, 0, 1, 0, 4, 6, 8]


@pytest.mark.parametrize("amp", [False, True])
def test_ce_and_logp_is_cross_entropy_bit_for_bit_and_feeds_the_part_logs(amp):
    """The training CE computed through its log-softmax equals F.cross_entropy bit for bit, value and
    gradient (also under bf16 autocast); the per-part logs read from that log-softmax equal those from
    a log-softmax of their own and each part's own CE."""
    g = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(4, 151, 9, 7, generator=g)).requires_grad_()
    y = torch.randint(0, 151, (4, 9, 7), generator=g)
    y[0, :3] = 255
    y[3] = 255  # a part with no valid pixel logs 0, not NaN
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        w = (torch.eye(151) + 0.01 * torch.randn(151, 151, generator=g)).view(151, 151, 1, 1)
        logits = F.conv2d(z, w) if amp else z  # bf16 logits under autocast
        ref = F.cross_entropy(logits, y, ignore_index=255)
        ours, logp = ce_and_logp(logits, y, 255)
    assert (logits.dtype == torch.bfloat16) == amp and logp.dtype == torch.float32
    assert torch.equal(ours, ref)
    (g_ref,), (g_ours,) = torch.autograd.grad(ref, z, retain_graph=True), torch.autograd.grad(ours, z)
    assert torch.equal(g_ours, g_ref) and g_ref.abs().max() > 0
    shared, own = part_logs(logits, y, 2, 255, logp), part_logs(logits, y, 2, 255)
    assert set(shared) == set(own) == {"loss_clean", "loss_adv", "acc_clean", "acc_adv"}
    assert all(torch.equal(shared[k], own[k]) and not shared[k].requires_grad for k in own)
    with torch.no_grad():
        by_hand = F.cross_entropy(logits[:2].float(), y[:2], ignore_index=255)
    assert torch.allclose(shared["loss_clean"], by_hand, rtol=1e-6)
    only_last = part_logs(logits[3:], y[3:], 0, 255)
    assert only_last["loss_adv"] == 0 and only_last["acc_adv"] == 0 and set(only_last) == {"loss_adv", "acc_adv"}


def test_sat_attacks_only_the_adversarial_part_with_the_published_bim(tiny_cfg):
    cfg = tiny_cfg("train.method=sat", *SMALL)
    torch.manual_seed(0)
    net = build_model(cfg).train()
    batch = synthetic_batch(cfg, 4)
    x, y = batch["image"], batch["label"]
    defense = build_defense(cfg)
    defense.prepare(net)
    assert "adversarial share 0.5" in defense.describe() and "steps=3" in defense.describe()
    by_hand = bim_by_hand(net, x[2:], y[2:])  # before the step moves the BN statistics
    assert (by_hand - x[2:]).abs().max() > 0.5 * EPS
    net.eval()
    with torch.no_grad():
        clean, adv = (F.cross_entropy(net(v), y[2:], ignore_index=255) for v in (x[2:], by_hand))
    net.train()
    seen: list = []
    probe = attack_phase_probe(net, seen)
    torch.manual_seed(1)
    loss, logs = defense.loss(net, batch)
    probe.remove()
    (mixed,) = seen
    # the first half untouched, the second half the published BIM of those images, nothing else attacked
    assert torch.equal(mixed[:2], x[:2])
    assert defense.attack.counter.forward == defense.attack.counter.backward == 3 * 2
    assert torch.allclose(mixed[2:], by_hand, atol=1e-6)
    # really adversarial: the eval-mode loss of those images is higher than on the clean images
    assert adv > clean, (clean, adv)
    # the loss is CE(main) + 0.4 CE(aux) of one train-mode forward of the mixed batch (same dropout draws)
    torch.manual_seed(1)
    out = net(mixed)
    direct = F.cross_entropy(out["out"], y, ignore_index=255) + 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255)
    assert torch.allclose(loss, direct, rtol=1e-6)
    assert set(logs) == {"loss_main", "loss_aux", "loss_clean", "loss_adv", "acc_clean", "acc_adv"}
    assert torch.allclose(logs["loss_adv"], F.cross_entropy(out["out"][2:], y[2:], ignore_index=255), rtol=1e-5)
    assert logs["loss_adv"] != logs["loss_clean"] and all(not v.requires_grad for v in logs.values())
    # one iteration touches every parameter of the plain model (main and aux heads, backbone)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_sat_keeps_freeze_bn_layers_in_eval_mode(tiny_cfg):
    """train.freeze_bn: BN layers stay in eval mode through the attack (attack_mode restores each
    module's own mode), so their statistics never move."""
    cfg = tiny_cfg("train.method=sat", *SMALL)
    torch.manual_seed(0)
    net = build_model(cfg).train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.eval()
    stats = bn_state(net)
    loss, _ = build_defense(cfg).loss(net, synthetic_batch(cfg, 2))
    assert net.training and not any(m.training for m in bns)
    assert all(torch.equal(v, stats[k]) for k, v in net.state_dict().items())


@pytest.fixture(scope="module")
def ddcat_setup(tmp_path_factory, synthetic_root):
    """A small DDC-AT PSPNet-18 after a few DDC-AT iterations (so its predictions are not constant),
    its weights, and a synthetic batch with ignore pixels."""
    from conftest import TINY
    path = tmp_path_factory.mktemp("ddcat") / "tiny.yaml"
    path.write_text(TINY.format(exp=path.parent / "exp", data=synthetic_root))
    cfg = load_config(str(path), ["train.method=ddcat", "model.name=pspnet_ddcat", *SMALL])
    torch.manual_seed(0)
    net = build_model(cfg).train()
    defense = build_defense(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    warm = synthetic_batch(cfg, 4, start=4)
    for _ in range(12):
        loss, _ = defense.loss(net, warm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return path, {k: v.clone() for k, v in net.state_dict().items()}, synthetic_batch(cfg, 4)


def ddcat_model(ddcat_setup, *overrides):
    path, state, batch = ddcat_setup
    cfg = load_config(str(path), ["train.method=ddcat", "model.name=pspnet_ddcat", *SMALL, *overrides])
    net = build_model(cfg)
    net.load_state_dict(state)
    torch.manual_seed(3)  # a fresh mask head: it routes pixels to both branches (the warm-up sent all to f_n)
    for m in net.mask1.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return cfg, net.train(), {k: v.clone() for k, v in batch.items()}


def test_ddcat_division_labels_equal_a_direct_computation(ddcat_setup):
    cfg, net, batch = ddcat_model(ddcat_setup)
    # the adversarial half repeats the clean half's images, whose attack flips some routed pixels (asserted
    # below), so its all-zero mask labels are the method's rule and not images the attack could not flip
    # (on other CPU kernels the 3-step BIM flipped no pixel of two other images of this tiny model)
    batch = {k: torch.cat([v[:2], v[:2]]) for k, v in batch.items()}
    x, y = batch["image"], batch["label"]
    defense = build_defense(cfg)
    mixed, m, n = defense.training_batch(net, batch)
    assert n == 2 and net.training
    x_adv = bim_by_hand(net, x, y)  # the attack is on the main branch f_n (the eval-mode output)
    flips = (routed_argmax_by_hand(net, x_adv) != routed_argmax_by_hand(net, x)).long()
    assert 0 < flips[:2].sum() < flips[:2].numel()  # both labels occur
    assert torch.equal(m[:2], flips[:2])
    assert not m[2:].any() and flips[2:].any()  # the adversarial part: mask label 0 everywhere
    assert torch.equal(mixed[:2], x[:2]) and torch.allclose(mixed[2:], x_adv[2:], atol=1e-6)
    assert (mixed[2:] - x[2:]).abs().max() > 0.5 * EPS


def test_ddcat_main_and_routed_equals_the_separate_forwards(ddcat_setup):
    """The attack's first forward (main_and_routed) gives model(x) and the routed class map of the first
    n images as two separate forwards would; with a random start the defense routes x on its own and
    gets the same division labels from either path."""
    from models.ddcat import route
    from utils.metrics import class_map
    cfg, net, batch = ddcat_model(ddcat_setup)
    x = batch["image"]
    net.eval()
    out, routed = net.main_and_routed(x, 2)
    with torch.no_grad():
        assert torch.allclose(out, net(x), atol=1e-5) and out.requires_grad
        direct = class_map(route(net.outputs(x[:2])))
    assert torch.equal(routed, direct) and routed.shape == (2, *x.shape[-2:])
    defense = build_defense(cfg)
    x_adv = x + 4 / 255 * torch.sign(torch.randn_like(x))
    assert torch.equal(defense.division_labels(net, x[:2], x_adv[:2], routed),
                       defense.division_labels(net, x[:2], x_adv[:2]))
    net.train()
    _, m, n = build_defense(load_config(*_ddcat_cfg_args(ddcat_setup, "train.attack={random_start: true}"))
                            ).training_batch(net, batch)
    assert n == 2 and net.training and m[:2].any() and not m[2:].any()


@pytest.mark.parametrize("random_start", [False, True])
def test_ddcat_routed_clean_prediction_comes_from_the_attacks_forward_of_x(ddcat_setup, monkeypatch, random_start):
    """Without a random start the attack hands its forward of x over (main_and_routed, once) and the division
    labels get that routed clean prediction, equal to a separate routed forward of the clean part; with
    one, the attack never evaluates x and division_labels routes x on its own."""
    from models.ddcat import route
    from utils.metrics import class_map
    cfg, net, batch = ddcat_model(ddcat_setup, f"train.attack={{random_start: {str(random_start).lower()}}}")
    defense = build_defense(cfg)
    handed, given = [], []
    orig_routed, orig_labels = type(net).main_and_routed, type(defense).division_labels
    monkeypatch.setattr(type(net), "main_and_routed", lambda self, *a: handed.append(a[1:]) or orig_routed(self, *a))
    monkeypatch.setattr(type(defense), "division_labels",
                        lambda self, model, x, x_adv, p=None: given.append(p) or orig_labels(self, model, x, x_adv, p))
    defense.training_batch(net, batch)
    assert defense.attack.starts_at_x != random_start
    if random_start:
        assert handed == [] and given == [None]
        return
    net.eval()
    with torch.no_grad():
        direct = class_map(route(net.outputs(batch["image"][:2])))
    assert handed == [(2,)] and torch.equal(given[0], direct)


def _ddcat_cfg_args(ddcat_setup, *overrides):
    return str(ddcat_setup[0]), ["train.method=ddcat", "model.name=pspnet_ddcat", *SMALL, *overrides]


class _Calls:
    """(training, grad enabled, rows) of every forward of a module."""

    def __init__(self, module: nn.Module):
        self.calls: list = []
        self.handle = module.register_forward_hook(
            lambda mod, args, out: self.calls.append((mod.training, torch.is_grad_enabled(), args[0].shape[0])))


@pytest.mark.parametrize("mask_ignore", [False, True])
def test_ddcat_iteration_gradients_by_closed_form(ddcat_setup, mask_ignore):
    """One DDC-AT iteration: the attack leaves parameters and BN statistics alone; the routed forwards
    are two no-grad eval forwards of the clean half; the training forward routes by the mask head's own
    train-mode (dropout) prediction; d loss / d o_n, o_a, o_m equal the closed forms: f_n and f_a get
    (softmax - onehot) / N on the valid pixels routed to them only, f_m the gradient of its own CE."""
    cfg, net, batch = ddcat_model(ddcat_setup, f"train.ddcat.mask_ignore={str(mask_ignore).lower()}")
    x, y = batch["image"], batch["label"]
    assert (y == 255).any()
    # the expected division labels, computed on the same weights before the step
    x_adv = bim_by_hand(net, x, y)
    m_train = (routed_argmax_by_hand(net, x_adv) != routed_argmax_by_hand(net, x)).long()
    m_train[2:] = 0
    defense = build_defense(cfg)
    captured: dict = {}

    def keep(module, args, out):
        if module.training:
            for t in out.values():
                t.retain_grad()
            captured.update(out)
    hooks = [net.register_forward_hook(keep)]
    mask_calls, dropout_calls, main_calls = _Calls(net.mask1), _Calls(net.mask1[3]), _Calls(net.cls1)
    seen: list = []
    hooks += [attack_phase_probe(net, seen), mask_calls.handle, dropout_calls.handle, main_calls.handle]
    loss, logs = defense.loss(net, batch)
    for h in hooks:
        h.remove()
    assert mask_calls.calls == [(False, False, 2), (False, False, 2), (True, True, 4)]
    # the clean half's routed forward shares the attack's first pass: f_n runs 3 x (attack), once for
    # the routed prediction of the adversarial half, once in training
    assert main_calls.calls == [(False, True, 4)] * 3 + [(False, False, 2), (True, True, 4)]
    assert dropout_calls.calls[-1][0]  # the routing comes from the mask head with dropout on
    assert defense.attack.counter.forward == 3 * 4  # the whole batch: clean half for M, the rest to train on
    mask_params = list(net.mask1.parameters())
    o_m = captured["mask"]
    mask_ce_alone = (F.cross_entropy(o_m, m_train.masked_fill(y == 255, 255), ignore_index=255) if mask_ignore
                     else F.cross_entropy(o_m, m_train))
    loss.backward(retain_graph=True)

    o_n, o_a, aux = captured["out"].detach(), captured["adv"].detach(), captured["aux"].detach()
    pick = (o_m.detach().argmax(1) == 1)[:, None]
    assert pick.any() and (~pick).any()
    valid = (y != 255)[:, None].float()
    onehot = F.one_hot(y.clamp(max=cfg.data.classes - 1), cfg.data.classes).permute(0, 3, 1, 2).float()
    g_ce = (F.softmax(o_n, 1) - onehot) * valid / valid.sum(), (F.softmax(o_a, 1) - onehot) * valid / valid.sum()
    assert torch.allclose(captured["out"].grad, torch.where(pick, 0.0, g_ce[0]), atol=1e-9)
    assert torch.allclose(captured["adv"].grad, torch.where(pick, g_ce[1], 0.0), atol=1e-9)
    assert captured["out"].grad[pick.expand_as(o_n)].abs().max() == 0 < captured["out"].grad.abs().max()
    assert captured["adv"].grad[~pick.expand_as(o_a)].abs().max() == 0 < captured["adv"].grad.abs().max()
    g_aux = 0.4 * (F.softmax(aux, 1) - onehot) * valid / valid.sum()
    assert torch.allclose(captured["aux"].grad, g_aux, atol=1e-9)
    mask_valid = valid if mask_ignore else torch.ones_like(valid)
    g_mask = (F.softmax(o_m.detach(), 1) - F.one_hot(m_train, 2).permute(0, 3, 1, 2)) * mask_valid / mask_valid.sum()
    assert torch.allclose(o_m.grad, g_mask, atol=1e-9)
    at_ignored = o_m.grad.permute(0, 2, 3, 1)[y == 255]
    assert bool(at_ignored.abs().max() == 0) == mask_ignore  # ignored pixels count unless mask_ignore
    # (after the checks above: torch.autograd.grad also adds to the retained output gradients)
    for p, g in zip(mask_params, torch.autograd.grad(mask_ce_alone, mask_params)):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-9) and g.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())
    # logs: the three loss terms apart, clean and adversarial parts of the routed output apart
    assert torch.allclose(loss, logs["loss_routed"] + logs["loss_mask"] + 0.4 * logs["loss_aux"])
    assert torch.allclose(logs["loss_mask"], mask_ce_alone.detach())
    assert logs["flip_share"] == m_train[:2].float().mean()
    assert logs["routed_to_fa"] == pick.float().mean()
    assert {"loss_clean", "loss_adv", "acc_clean", "acc_adv"} <= set(logs)


def test_reference_loss_is_the_methods_own_step_without_its_attack(ddcat_setup):
    """The unit of benchmark.cost_bound (benchmark.py's defense rows): DDC-AT's reference is its own loss on
    the clean batch with every mask label 0, which trains all three heads (the clean loss leaves f_a and
    f_m out of the backward); no attack and no routed forward runs. SAT's is the clean loss."""
    from benchmark import reference_loss
    from models.ddcat import route
    cfg, net, batch = ddcat_model(ddcat_setup)
    x, y = batch["image"], batch["label"]
    defense = build_defense(cfg)
    torch.manual_seed(5)  # the same dropout draws for the loss and its hand computation
    loss, logs = reference_loss(defense, net, batch)
    assert defense.attack.counter.forward == 0 and net.training
    torch.manual_seed(5)
    out = net(x)
    by_hand = (F.cross_entropy(route(out), y, ignore_index=255) + F.cross_entropy(out["mask"], torch.zeros_like(y))
               + 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255))
    assert torch.allclose(loss, by_hand, rtol=1e-6) and logs["flip_share"] == 0
    heads = [p for h in (net.cls2, net.mask1) for p in h.parameters()]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    net.zero_grad(set_to_none=True)
    clean, _ = defense.task_loss(net(x), batch)  # the clean loss
    clean.backward()
    assert all(p.grad is None for p in heads)
    sat_cfg = load_config(*_ddcat_cfg_args(ddcat_setup, "train.method=sat", "model.name=pspnet"))
    sat_net = build_model(sat_cfg).train()
    sat = build_defense(sat_cfg)
    torch.manual_seed(5)
    ref, _ = reference_loss(sat, sat_net, batch)
    torch.manual_seed(5)
    assert torch.equal(ref, build_defense(load_config(*_ddcat_cfg_args(ddcat_setup, "train.method=none",
                                                                         "model.name=pspnet"))).loss(sat_net, batch)[0])
    assert sat.attack.counter.forward == 0


def test_ddcat_needs_a_ddcat_model_and_sat_a_plain_one(tiny_config):
    from engine.trainer import Trainer
    for method, model, words in (("ddcat", "pspnet", "train.method 'ddcat' needs a DDC-AT model"),
                                 ("sat", "pspnet_ddcat", "train.method 'sat' trains the plain model")):
        path = tiny_config(name=f"{method}.yaml", exp=f"exp_{method}")
        cfg = load_config(path, [f"train.method={method}", f"model.name={model}"])
        trainer = Trainer.__new__(Trainer)
        with pytest.raises(SetupError, match=words) as e:
            trainer.__init__(cfg)
        assert "\n" not in str(e.value)
        assert not hasattr(trainer, "optimizer") and not os.path.exists(cfg.exp_dir)  # before any step
    for bad, key in (("train.sat.adv_fraction=1.5", "train.sat.adv_fraction"),
                     ("train.ddcat.adv_fraction=-0.1", "train.ddcat.adv_fraction"),
                     ("train.ddcat.mask_ignore=maybe", "train.ddcat.mask_ignore")):
        with pytest.raises(SetupError, match=f"config key '{key}' must be"):
            load_config(tiny_config(), [bad])


class _TinyPSP(ContextSegmentor):
    """Two convolutions and the semseg heads: the PSPNet shape at a size that trains in seconds."""

    def __init__(self, classes: int):
        super().__init__([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
        self.backbone = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.ctx = nn.Sequential(nn.Conv2d(12, 24, 3, 1, 2, dilation=2), nn.BatchNorm2d(24), nn.ReLU())
        self.cls, self.aux = conv_head(24, 16, classes, 0.1), conv_head(12, 8, classes, 0.1)

    def features(self, x):
        c3 = self.backbone(x)
        return c3, self.ctx(c3)


class _TinyPSPDDCAT(_DDCATMixin, _TinyPSP):
    def __init__(self, classes: int):
        super().__init__(classes)
        self._add_branches(classes)


@pytest.mark.parametrize("method", ["sat", "ddcat"])
def test_sat_and_ddcat_lower_the_training_loss(tiny_cfg, method):
    """200 iterations on 8 synthetic images (two batches of 4, 17x17) with a tiny model: the training
    loss and the adversarial part's loss fall."""
    cfg = tiny_cfg(f"train.method={method}", "data.crop_size=[17,17]")
    torch.manual_seed(0)
    net = (_TinyPSPDDCAT if method == "ddcat" else _TinyPSP)(cfg.data.classes).train()
    defense = build_defense(cfg)
    defense.prepare(net)
    batches = [synthetic_batch(cfg, 4, start=s) for s in (0, 4)]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses, adv = [], []
    for it in range(200):
        loss, logs = defense.loss(net, batches[it % 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        adv.append(float(logs["loss_adv"]))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert sum(adv[-20:]) < 0.7 * sum(adv[:20]), (adv[:20], adv[-20:])
# ---------------------------------------------------------------- fpd
# the tiny FPD-Seg (ResNet-18 at quarter width, FPN of width 16), Adam (AdamW without decay) at a constant lr;
# bounded denoise (the published one gives NaN in eval mode at initialisation, mtl_fpd.md §B1), no dropout
FPD_TINY = ("model.name=fpd_seg", "model.fpd.fpn_width=16", "model.fpd.denoise_normalize=true", "model.fpd.dropout=0.0",
            "train.method=fpd", "train.optimizer=adamw", "train.weight_decay=0.0", "train.lr=0.001",
            "train.head_lr_mult=1.0", "train.power=0.0")


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fpd_refuses_other_models_and_bad_settings_before_training(tiny_cfg, tmp_path):
    from engine.trainer import Trainer
    with pytest.raises(SetupError) as e:
        Trainer(tiny_cfg("train.method=fpd"))
    assert str(e.value) == ("train.method fpd trains an FPD model (model.name fpd_seg: restoration output and "
                            "classifier); model.name 'pspnet' is not one")
    with pytest.raises(SetupError, match=r"^train.attack is set but train.fpd.adversarial is false: two-phase"):
        Trainer(tiny_cfg(*FPD_TINY, "train.attack={steps: 3}"))
    for bad, key in (("train.fpd.phase1_params=head", "train.fpd.phase1_params"),
                     ("train.fpd.threshold=-1", "train.fpd.threshold"), ("train.clip_grad_norm=-1", "train.clip_grad_norm"),
                     ("train.fpd.noise_eps=-2", "train.fpd.noise_eps")):
        with pytest.raises(SetupError, match=key.replace(".", r"\.")) as e:
            tiny_cfg(*FPD_TINY, bad)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "exp").exists()  # refused before anything ran or was written


class _Restorer(nn.Module):
    """x_hat = a constant image r (a parameter), logits = a 1x1 conv of the input: the restoration MSE of
    an image is a closed form. Records its inputs."""

    def __init__(self, r: float):
        super().__init__()
        self.r, self.cls, self.inputs = nn.Parameter(torch.tensor(r)), nn.Conv2d(3, 3, 1), []

    def phase1_parameters(self):
        return iter([self.r])

    def forward(self, x):
        self.inputs.append(x)
        return {"out": self.cls(x), "restored": self.r.expand_as(x)}


@pytest.mark.parametrize("threshold,gated", [(0.08, True), (0.1, False)])
def test_fpd_restoration_gate_by_hand(tiny_cfg, threshold, gated):
    """x = 0.5 everywhere, x_hat = 0.8: MSE(x_hat, x) = 0.09 whatever the noise; T = 0.08 gates, T = 0.1 does not."""
    ce = nn.functional.cross_entropy
    defense = build_defense(tiny_cfg(*FPD_TINY, f"train.fpd.threshold={threshold}", "train.fpd.ce_weight=3.0",
                                     "train.fpd.l2_weight=2.0", "train.fpd.cycle_l2_weight=0.5"))
    torch.manual_seed(0)
    model = _Restorer(0.8)
    x, y = torch.full((2, 3, 4, 5), 0.5), torch.randint(0, 3, (2, 4, 5))
    steps = [(loss.detach(), logs, phase) for loss, logs, phase in
             defense.steps(model, {"image": x, "label": y, "index": torch.tensor([4, 9])})]
    noisy = model.inputs[0]
    assert 0 < (noisy - x).abs().max() <= 2.55 / 255 + 1e-7 and (noisy < x).any() and (noisy > x).any()
    assert [s[2] for s in steps] == (["restore"] if gated else ["joint", "joint"])
    loss, logs, _ = steps[0]
    assert float(logs["loss_l2"]) == pytest.approx(0.09, rel=1e-5) and float(logs["joint"]) == (0.0 if gated else 1.0)
    if gated:  # the MSE alone, weighted
        assert float(loss) == pytest.approx(2 * 0.09, rel=1e-5) and len(model.inputs) == 1
        return
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(3 * ce(model.cls(noisy), y) + 2 * 0.09), rel=1e-5)
    # cycle step: the restored image, detached, is the next input; CE + beta * MSE against the clean x
    cycle_in = model.inputs[1]
    assert torch.equal(cycle_in, torch.full_like(x, 0.8)) and not cycle_in.requires_grad
    with torch.no_grad():
        assert float(steps[1][0]) == pytest.approx(float(ce(model.cls(cycle_in), y) + 0.5 * 0.09), rel=1e-5)
    # the noise of an image depends on its index (and epoch), not on its place in the batch
    model.inputs = []
    list(defense.steps(model, {"image": x.flip(0), "label": y.flip(0), "index": torch.tensor([9, 4])}))
    assert torch.equal(model.inputs[0], noisy.flip(0))


@pytest.mark.parametrize("settings,moves,steps", [
    (("train.fpd.threshold=0.0",), "all but cls", {"restore": 1, "joint": 0}),          # gated: MSE > 0
    (("train.fpd.threshold=0.0", "train.fpd.phase1_params=restoration_only"), "restore", {"restore": 1, "joint": 0}),
    (("train.fpd.gate=false",), "all", {"restore": 0, "joint": 2}),                     # joint + cycle step
    (("train.fpd.adversarial=true", "train.attack={steps: 1}"), "all", {None: 2}),    # one optimiser
], ids=["restore", "restoration_only", "joint", "adversarial"])
def test_fpd_one_iteration_updates_its_phase_parameters(tiny_cfg, settings, moves, steps):
    from engine.trainer import Trainer
    trainer = Trainer(tiny_cfg(*FPD_TINY, *settings))
    assert list(trainer.optimizers) == list(steps)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    logs = trainer.train_step(next(iter(trainer.loader)))
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    expected = {"all": set(before), "all but cls": {n for n in before if not n.startswith("cls.")},
                "restore": {n for n in before if n.startswith("restore.")}}[moves]
    assert len(expected) >= 6 and moved == expected
    for phase, n in steps.items():  # Adam steps taken by each phase's optimiser
        state = trainer.optimizers[phase].state
        assert len(state) == (len(expected) if n else 0) and all(int(s["step"]) == n for s in state.values())
    assert ("loss_cycle" in logs) == (moves == "all")
    if "train.fpd.adversarial=true" in settings:
        assert {"loss_clean", "loss_adv", "acc_clean", "acc_adv"} <= set(logs)


def test_fpd_attack_is_frozen_and_labelled_by_the_models_predictions(tiny_cfg):
    from models import build_model
    cfg = tiny_cfg(*FPD_TINY, "train.fpd.adversarial=true", "train.attack={steps: 2}")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    defense = build_defense(cfg)
    defense.prepare(model)
    x, y = torch.rand(2, 3, 33, 33), torch.randint(0, 6, (2, 33, 33))
    y[:, :5] = 255
    model.eval()
    with torch.no_grad():
        expected = model(x).argmax(1).masked_fill(y == 255, 255)
    model.train()
    assert (expected != y).any() and (expected == 255).sum() == (y == 255).sum()  # not the ground truth
    start, seen, real = _state(model), {}, defense.attack

    def spy(forward, xx, yy, keys, clean_forward=None):
        seen.update(labels=yy.clone(), training=model.training, frozen=not any(p.requires_grad for p in model.parameters()))
        seen["x_adv"] = real(forward, xx, yy, keys, clean_forward)
        seen.update(grads=[p.grad for p in model.parameters()], state=_state(model))
        return seen["x_adv"]
    defense.attack = spy
    inputs = []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    steps = defense.steps(model, {"image": x, "label": y, "index": torch.tensor([0, 1])})
    loss, logs, phase = next(steps)
    assert torch.equal(seen["labels"], expected)
    assert seen["training"] is False and seen["frozen"] and all(g is None for g in seen["grads"])
    assert all(torch.equal(v, start[k]) for k, v in seen["state"].items())      # BN statistics did not move
    assert model.training and all(p.requires_grad for p in model.parameters())
    x_adv = seen["x_adv"]
    assert 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    # clean and adversarial halves of one forward; the adversarial image restores itself, not the clean one
    assert torch.equal(inputs[-1], torch.cat([x, x_adv]))
    with torch.no_grad():
        ref = model(torch.cat([x, x_adv]))
    mse = nn.functional.mse_loss
    assert float(logs["loss_l2_adv"]) == pytest.approx(float(mse(ref["restored"][2:], x_adv)), rel=1e-4)
    assert float(mse(ref["restored"][2:], x)) != pytest.approx(float(logs["loss_l2_adv"]), rel=1e-4)
    assert logs["loss_clean"] != logs["loss_adv"] and phase is None
    assert float(loss.detach()) == pytest.approx(float(logs["loss_clean"] + logs["loss_adv"]) / 2, rel=1e-6)
    # cycle step on the adversarial image's restoration, detached
    next(steps)
    assert torch.allclose(inputs[-1], ref["restored"][2:], atol=1e-6) and not inputs[-1].requires_grad


@pytest.mark.parametrize("method", ["none", "fpd"])
def test_clip_grad_norm_bounds_the_update(tiny_cfg, method):
    """Plain SGD at lr 0.5: the update is -lr * gradient, so its norm is lr * clip once the gradient is larger."""
    from engine.trainer import Trainer
    sgd = ("train.optimizer=sgd", "train.momentum=0.0", "train.weight_decay=0.0", "train.lr=0.5",
           "train.head_lr_mult=1.0", "train.power=0.0")
    extra = (*FPD_TINY, "train.fpd.threshold=0.0") if method == "fpd" else ()

    def update(clip):
        trainer = Trainer(tiny_cfg(*extra, *sgd, f"train.clip_grad_norm={clip}"))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train_step(next(iter(trainer.loader)))
        return float(torch.stack([(p.detach() - before[n]).pow(2).sum()
                                  for n, p in trainer.model.named_parameters()]).sum().sqrt())
    free, clipped = update(0.0), update(0.001)
    assert free > 10 * 0.5 * 0.001                      # the raw step is far larger: clipping acts
    assert clipped == pytest.approx(0.5 * 0.001, rel=1e-3)


def test_fpd_training_lowers_the_loss(tiny_cfg):
    """Forty FPD iterations through the engine on one fixed batch of two 33x33 images: the warm-up lowers
    the restoration MSE below T, then the joint steps take over and the cross-entropy falls."""
    from engine.trainer import Trainer
    trainer = Trainer(tiny_cfg(*FPD_TINY, "train.batch_size=2", "train.clip_grad_norm=5.0", "train.lr=0.01"))
    batch = next(iter(trainer.loader))
    with torch.no_grad():
        first = float(nn.functional.mse_loss(trainer.model(batch["image"])["restored"], batch["image"]))
    trainer.defense.threshold = 0.6 * first   # T below the initial MSE: the run starts in the warm-up
    logs = [trainer.train_step(batch) for _ in range(40)]
    mean = lambda key, part: sum(float(l[key]) for l in part) / len(part)  # noqa: E731
    head, tail = logs[:5], logs[-5:]
    assert float(logs[0]["loss_l2"]) == pytest.approx(first, rel=0.05)   # the noise changes it a little
    assert mean("joint", head) == 0 and mean("joint", tail) == 1 and "loss_cycle" in logs[-1]
    assert mean("loss_l2", tail) < 0.2 * first
    assert mean("loss_ce", tail) < 0.7 * mean("loss_ce", head) and mean("acc_clean", tail) > mean("acc_clean", head)


def test_fpd_resume_continues_both_phases_exactly(tiny_config, tmp_path):
    """Interrupted after epoch 1 with both phases under way, resumed: the same weights and per-phase
    optimiser states as the uninterrupted run; the epoch log of a term logged only in joint iterations
    is its mean over those iterations."""
    import os
    import shutil
    from engine.cli import main
    from engine.trainer import Trainer
    from tests.test_training import scalars
    from utils.checkpoint import load_checkpoint
    from utils.config import load_config
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons need one float reduction order
    try:
        path = tiny_config()
        args = [*FPD_TINY, "train.eval_freq=0", "train.print_freq=1", "train.fpd.threshold=0.055"]
        run = lambda exp, *more: main("train", lambda cfg: Trainer(cfg).fit(),  # noqa: E731
                                      ["--config", path, *args, f"exp_dir={exp}", *more])
        assert run(tmp_path / "full") == 0
        mid = load_checkpoint(str(tmp_path / "full" / "model" / "epoch_1.pth"))
        steps = {k: [int(s["step"]) for s in v["state"].values()] for k, v in mid["optimizer"]["phases"].items()}
        assert list(steps) == ["restore", "joint"] and all(v and min(v) >= 1 for v in steps.values()), steps
        os.makedirs(tmp_path / "part" / "model")
        shutil.copy(tmp_path / "full" / "model" / "epoch_1.pth", tmp_path / "part" / "model" / "last.pth")
        assert run(tmp_path / "part", "train.resume=auto") == 0
        a, b = (load_checkpoint(str(tmp_path / e / "model" / "last.pth")) for e in ("full", "part"))
        assert b["iteration"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        for phase, sa in a["optimizer"]["phases"].items():
            sb = b["optimizer"]["phases"][phase]
            assert sa["state"].keys() == sb["state"].keys()
            assert all(torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"]) for i in sa["state"])
        assert a["scheduler"]["phases"].keys() == {"restore", "joint"}
        assert not any(torch.equal(a["model"][k], mid["model"][k]) for k in ("cls.weight", "backbone.layer0.0.weight"))
        # another method setting cannot resume these optimisers
        with pytest.raises(SetupError, match=r"holds phases \['restore', 'joint'\], this run has one optimiser"):
            Trainer(load_config(path, [*args, f"exp_dir={tmp_path / 'part'}", "train.resume=auto",
                                       "train.fpd.adversarial=true"]))
        tb = scalars(tmp_path / "full")
        joint, cycle = tb["train/joint"][:4], tb["train/loss_cycle"]
        assert 0 < sum(joint) < 4 and len(cycle) == sum(tb["train/joint"])  # logged in joint iterations only
        assert tb["train_epoch/loss_cycle"][0] == pytest.approx(sum(cycle[:int(sum(joint))]) / sum(joint), rel=1e-6)
        assert tb["train_epoch/joint"][0] == pytest.approx(sum(joint) / 4)
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- pirat (PIR-AT, sea.md §4)

PIRAT_CONFIGS = {name: os.path.join(ROOT, "config", name.split("_")[0], name + ".yaml") for name in (
    "voc2012_upernet_pirat", "voc2012_upernet_s_pirat", "voc2012_pspnet_pirat", "ade20k_upernet_pirat",
    "ade20k_upernet_s_pirat", "ade20k_segmenter_pirat", "synthetic_pspnet18_pirat")}


def test_attack_warmup_ramps_eps_and_alpha_by_epoch(tiny_cfg):
    """train.attack_warmup_epochs W: epoch e attacks at min(1, (e+1)/(W+1)) of eps and alpha, a function
    of the epoch alone (a resume that calls set_epoch gets the same attack); W = 0 leaves it at full."""
    torch.manual_seed(0)
    net = _Net().train()
    x, y, index = torch.rand(2, 3, 9, 9), torch.randint(0, 3, (2, 9, 9)), torch.tensor([0, 1])
    ramp = _Adv(tiny_cfg("train.attack_warmup_epochs=3", "train.attack={random_start: false}"))
    full = _Adv(tiny_cfg("train.attack={random_start: false}"))
    assert [ramp.attack_scale(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [full.attack_scale(e) for e in range(3)] == [1.0, 1.0, 1.0]
    for epoch, scale in ((0, 0.25), (2, 0.75), (3, 1.0)):
        ramp.set_epoch(epoch)
        assert ramp.attack.kwargs["eps"] == pytest.approx(8 / 255 * scale)
        assert ramp.attack.kwargs["alpha"] == pytest.approx(2 / 255 * scale)
        delta = (ramp.adversarial(net, x, y, index) - x).abs().max()
        assert 8 / 255 * scale - 2 / 255 * scale <= delta <= 8 / 255 * scale + 1e-6  # 3 steps of alpha: 6/8 of eps
    # at full strength the ramped attack is the plain one, bit for bit, and says so in the log line
    full.set_epoch(3)
    assert torch.equal(ramp.adversarial(net, x, y, index), full.adversarial(net, x, y, index))
    ramp.set_epoch(0)
    assert "at 0.25 x eps" in ramp.describe() and "x eps" not in full.describe()
    with pytest.raises(SetupError, match="train.attack_warmup_epochs"):
        tiny_cfg("train.attack_warmup_epochs=-1")


def _pirat_batch(n=4, size=17, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n, size, size), generator=g)
    y[:, :2, :2] = 255  # some ignore pixels
    return {"image": x, "label": y, "index": torch.arange(n)}


def _tiny_pirat(tiny_cfg, *overrides):
    """A tiny PSPNet, its pirat defense and the optimiser of the PSPNet recipe (SGD, 10x heads)."""
    from engine.trainer import build_optimizer
    from models import build_model
    cfg = tiny_cfg("train.method=pirat", "train.weight_decay=0.01", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    defense = build_defense(cfg)
    defense.prepare(model)
    return cfg, model, defense, build_optimizer(cfg, model)


def test_pirat_update_is_the_adversarial_batch_gradient_alone(tiny_cfg):
    """The gradient leak of the original (sea.md §9.1 item 8) is gone: one pirat step from given weights and
    optimiser state equals a plain forward/backward/step on x_adv alone, while the original's order
    (zero_grad, then an attack whose backward reaches the parameters) gives another update."""
    cfg, model, defense, opt = _tiny_pirat(tiny_cfg, "train.attack={eps: 8, steps: 3}")
    batch = _pirat_batch()
    x, y = batch["image"], batch["label"]

    def step(m, o, loss_fn):
        torch.manual_seed(1)  # the same dropout masks in the training forward
        loss = loss_fn(m)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    def plain(m):  # CE(main) + 0.4 CE(aux) on x_adv, nothing else
        out = m(x_adv)
        return F.cross_entropy(out["out"], y, ignore_index=255) + 0.4 * F.cross_entropy(out["aux"], y, ignore_index=255)

    step(model, opt, lambda m: defense.loss(m, batch)[0])  # one step first: the optimiser has momentum now
    start = {k: v.clone() for k, v in model.state_dict().items()}
    (ma, oa), (mb, ob), (mc, oc) = (copy.deepcopy((model, opt)) for _ in range(3))
    x_adv = defense.adversarial(mb, x, y, batch["index"])
    assert (x_adv - x).abs().max() > 4 / 255

    step(ma, oa, lambda m: defense.loss(m, batch)[0])       # the method, as the trainer calls it
    step(mb, ob, plain)                                     # the adversarial batch alone

    def leaky_step(m, o):  # the original's order: zero_grad, then an attack whose backward reaches the parameters
        o.zero_grad(set_to_none=True)
        m.eval()
        delta = torch.zeros_like(x)
        for _ in range(3):
            delta.requires_grad_(True)
            F.cross_entropy(m(x + delta), y, ignore_index=255).backward()
            delta = ((x + delta + 2.55 / 255 * delta.grad.sign()).clamp(0, 1) - x).clamp(-8 / 255, 8 / 255).detach()
        assert torch.allclose(x + delta, x_adv, atol=1e-6)  # the same attack as the method's
        m.train()
        torch.manual_seed(1)
        plain(m).backward()
        o.step()
    leaky_step(mc, oc)
    params = [n for n, _ in model.named_parameters()]
    a, b, c = (dict(m.named_parameters()) for m in (ma, mb, mc))
    moved = max((a[n] - start[n]).abs().max().item() for n in params)
    leak = max((c[n] - a[n]).abs().max().item() for n in params)
    assert moved > 1e-3 and leak > 1e-3 * moved                      # the leak would change the update ...
    for n in params:                                                 # ... the method's equals the plain one
        assert torch.allclose(a[n], b[n], rtol=0, atol=1e-7), n
    for k, v in mb.state_dict().items():                             # BN statistics: one forward, on x_adv
        assert torch.equal(ma.state_dict()[k], v), k


class _TinySeg(nn.Module):
    """Two conv-BN-ReLU layers, a main and an aux 1x1 classifier: the model contract in a few ops."""

    def __init__(self, classes=6, c=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.BatchNorm2d(c), nn.ReLU())
        self.cls, self.aux = nn.Conv2d(c, classes, 1), nn.Conv2d(c, classes, 1)

    def forward(self, x):
        f = self.backbone(x)
        return {"out": self.cls(f), "aux": self.aux(f)} if self.training else self.cls(f)


def test_pirat_lowers_the_training_loss_on_synthetic_data(tiny_cfg):
    """60 pirat iterations on 4 synthetic images (a tiny model): the adversarial and the clean loss fall."""
    from datasets import build_dataset
    from engine.trainer import build_optimizer
    cfg = tiny_cfg("train.method=pirat", "train.attack={eps: 4, steps: 2}", "train.lr=0.05", "data.transform=none")
    data = build_dataset(cfg, "train")
    items = [data[i] for i in range(4)]
    batch = {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items]),
             "index": torch.arange(4)}
    torch.manual_seed(0)
    model = _TinySeg().train()
    defense, opt = build_defense(cfg), build_optimizer(cfg, model)
    curve = []
    for _ in range(60):
        loss, logs = defense.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append([float(logs[k]) for k in ("loss_adv", "loss_clean", "acc_adv")])
    first, last = torch.tensor(curve[:10]).mean(0), torch.tensor(curve[-10:]).mean(0)
    assert last[0] < 0.5 * first[0] and last[1] < 0.5 * first[1] and last[2] > first[2] + 0.2, (first, last)


def test_pirat_one_iteration_touches_what_it_should(tiny_config, tmp_path, monkeypatch):
    """One training iteration through the trainer: during the attack no parameter has a gradient and
    no BatchNorm statistic moves; afterwards every parameter has a gradient from the adversarial batch and
    the BN statistics moved once, exactly as one training-mode forward on x_adv moves them."""
    from engine.trainer import Trainer
    from utils.config import load_config
    cfg = load_config(tiny_config(), ["train.method=pirat", "train.epochs=1", "train.eval_freq=0"])
    trainer = Trainer(cfg)
    model = trainer.model
    start = copy.deepcopy(model)
    seen = {}
    adversarial = trainer.defense.adversarial

    def checked(net, x, y, index, forward=None, clean_forward=None):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        x_adv = adversarial(net, x, y, index, forward, clean_forward)
        seen["grads"] = [n for n, p in net.named_parameters() if p.grad is not None]
        seen["moved"] = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
        seen["x"], seen["x_adv"], seen["training"] = x, x_adv, net.training
        return x_adv
    monkeypatch.setattr(trainer.defense, "adversarial", checked)
    batch = next(iter(trainer.loader))
    torch.manual_seed(3)
    logs = trainer.train_step(batch)
    assert seen["grads"] == [] and seen["moved"] == [] and seen["training"]   # the attack left no trace
    assert 0 < (seen["x_adv"] - seen["x"]).abs().max() <= 4 / 255 + 1e-6
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    for k in ("loss_clean", "loss_adv", "acc_clean", "acc_adv", "loss_aux", "loss"):
        assert torch.isfinite(logs[k]), k
    torch.manual_seed(3)  # the same dropout masks
    start.train()(seen["x_adv"])  # one training-mode forward on the adversarial batch
    bn = [k for k in model.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn and all(torch.equal(model.state_dict()[k], start.state_dict()[k]) for k in bn)
    assert all(int(v) == 1 for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))


def test_attack_warmup_is_logged_per_epoch(tiny_config, monkeypatch):
    """The trainer sets the warm-up factor at every epoch start, logs the eps of each warm-up epoch
    and writes train/attack_eps per epoch (steps skipped here: only the bookkeeping is under test)."""
    import logging
    from engine.trainer import Trainer
    cfg = load_config(tiny_config(), ["train.method=pirat", "train.epochs=3", "train.eval_freq=0",
                                      "train.attack_warmup_epochs=2"])
    trainer = Trainer(cfg)
    scalars, eps = [], []
    monkeypatch.setattr(trainer, "_scalar", lambda tag, value, step: scalars.append((tag, value, step)))
    monkeypatch.setattr(trainer, "train_step", lambda batch: eps.append(trainer.defense.attack.kwargs["eps"]))
    records: list = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # on the trainer's own logger: it may not propagate to the root
    trainer.log.addHandler(handler)
    level = trainer.log.level
    trainer.log.setLevel(logging.INFO)
    try:
        for epoch in range(3):
            trainer.epoch = epoch
            trainer.train_epoch()
    finally:
        trainer.log.removeHandler(handler)
        trainer.log.setLevel(level)
    logged = [(s, v) for t, v, s in scalars if t == "train/attack_eps"]
    assert [s for s, _ in logged] == [0, 1, 2] and [v for _, v in logged] == pytest.approx([4 / 3, 8 / 3, 4.0])
    assert sorted(set(round(e * 255, 6) for e in eps)) == pytest.approx([4 / 3, 8 / 3, 4.0])
    warm = [r.getMessage() for r in records if "warm-up" in r.getMessage()]
    assert warm == ["epoch 1: training attack at 0.333 x eps (1.33/255, warm-up)",
                    "epoch 2: training attack at 0.667 x eps (2.67/255, warm-up)"]


def test_pirat_clean_statistics_with_and_without_random_start(tiny_cfg):
    """loss_clean / acc_clean are the eval-mode model on the clean batch: read from the attack's first forward
    when it starts at the clean image (the attack hands it over), from one extra forward without gradients
    when it starts elsewhere; the same values."""
    batch = _pirat_batch()
    torch.manual_seed(0)
    model = _TinySeg().train()
    model.eval()
    with torch.no_grad():
        clean = model(batch["image"])
    model.train()
    want_loss = F.cross_entropy(clean, batch["label"], ignore_index=255)
    want_acc = pixel_accuracy(clean, batch["label"])
    for attack, extra in (("{steps: 2}", 0), ("{steps: 2, random_start: true}", 1), ("{name: apgd, steps: 2}", 1),
                          ("{name: apgd, steps: 2, random_start: false}", 0)):
        defense = build_defense(tiny_cfg("train.method=pirat", f"train.attack={attack}"))
        net = copy.deepcopy(model)  # (its training forward moves the BN statistics)
        calls = _Calls(net)
        _, logs = defense.loss(net, batch)
        assert defense.attack.starts_at_x == (not extra), attack
        assert torch.allclose(logs["loss_clean"], want_loss, atol=1e-6) and logs["acc_clean"] == want_acc, attack
        assert logs["loss_adv"] > want_loss  # (training mode on x_adv)
        # eval-mode forwards: the attack's counted passes, plus the extra clean one (no gradients) if any
        assert sum(not c[0] for c in calls.calls) * 4 == defense.attack.counter.forward + 4 * extra, attack
        assert calls.calls[-1 - extra:] == [(False, False, 4)] * extra + [(True, True, 4)], attack
    assert "pgd(eps=4.0, alpha=2.55, steps=5, random_start=False)" in build_defense(
        tiny_cfg("train.method=pirat")).describe()


def test_pirat_refuses_multitask_and_ddcat_models(tiny_cfg):
    defense = build_defense(tiny_cfg("train.method=pirat"))
    multitask = nn.Module()
    multitask.multitask, multitask.tasks = True, ["segmentsemantic", "depth_zbuffer"]
    with pytest.raises(SetupError, match=r"pirat trains one segmentation output; model 'pspnet' is multitask"):
        defense.prepare(multitask)
    ddcat = nn.Module()
    ddcat.mask1 = nn.Conv2d(1, 2, 1)
    with pytest.raises(SetupError, match="DDC-AT's routed heads"):
        defense.prepare(ddcat)
    defense.prepare(_TinySeg())


def _pirat_experiment(name, *overrides):
    """A shipped pirat config with the tiny-model settings of the launcher tests (no ImageNet file)."""
    from utils.config import load_config
    cfg = load_config(PIRAT_CONFIGS[name])
    return load_config(PIRAT_CONFIGS[name], [*fx.TINY_MODELS[cfg.model.name], *overrides])


def _decay_split(cfg, model):
    """({name: (lr, weight decay)} of every parameter in the optimiser built for `cfg`."""
    from engine.trainer import build_optimizer
    opt = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert sorted(out) == sorted(names.values())  # every parameter exactly once
    return out, opt


# the PIR-AT rule, written out by name: conv and linear weights decay; biases, norms, layer-scale gammas do not
UPERNET_DECAYED = re.compile(r"^(backbone\.stem\.[03]\.weight|backbone\.stages\.[1-3]\.downsample\.1\.weight|"
                             r"backbone\.stages\.\d\.blocks\.\d+\.(conv_dw|mlp\.fc1|mlp\.fc2)\.weight|"
                             r"decode_head\.(ppm\.\d|bottleneck|lateral_convs\.\d|fpn_convs\.\d|fpn_bottleneck)\.conv\.weight|"
                             r"decode_head\.classifier\.weight|aux_head\.(conv\.conv|classifier)\.weight)$")
UPERNET_KEPT = re.compile(r"(\.bias|\.gamma|\.norm\.weight|out_norms\.\d\.weight|\.bn\.weight|stem\.[14]\.weight|"
                          r"downsample\.0\.weight)$")


@pytest.mark.parametrize("name,lr,wd", [("voc2012_upernet_pirat", 1e-3, 0.01), ("ade20k_upernet_pirat", 1e-4, 0.05)])
def test_pirat_adamw_decays_exactly_the_conv_and_linear_weights(name, lr, wd):
    from models import build_model
    cfg = _pirat_experiment(name)
    model = build_model(cfg)
    split, opt = _decay_split(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    decayed = sorted(n for n, (_, d) in split.items() if d)
    assert decayed == sorted(n for n in split if UPERNET_DECAYED.match(n))
    # ConvNeXt-T: 2 stem convs, 3 downsampling convs, 18 blocks x 3; UperNet 13 convs + classifier; aux 2
    assert len(decayed) == 2 + 3 + 18 * 3 + 13 + 2
    kept = [n for n, (_, d) in split.items() if not d]  # biases, layer-scale gammas, LayerNorm / BatchNorm
    assert all(UPERNET_KEPT.search(n) for n in kept) and sum(n.endswith(".gamma") for n in kept) == 18
    assert {d for _, d in split.values()} == {0.0, wd} and {r for r, _ in split.values()} == {lr}  # one lr


def test_pirat_pspnet_recipe_is_sgd_with_ten_times_heads():
    """voc_pspnet_cais: SGD, momentum 0.9, weight decay on every parameter, heads (PPM, cls, aux) at 10 x lr."""
    from models import build_model
    cfg = _pirat_experiment("voc2012_pspnet_pirat")
    model = build_model(cfg)
    split, opt = _decay_split(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    heads = {n for n in split if n.split(".")[0] in ("ppm", "cls", "aux")}
    assert heads and heads == {n for n in split if not n.startswith("backbone.")}
    assert all(split[n] == (4e-3 if n in heads else 4e-4, 1e-4) for n in split)


def test_pirat_schedules_per_iteration():
    """Warmup in epochs (PIR-AT's unit) x iterations per epoch, then poly, every iteration, against the
    formula lr = base (r + (1 - r) it / W) for it <= W, base (1 - (it - W)/(T - W))^power after (it = step + 1)."""
    from engine.trainer import build_optimizer, build_scheduler, warmup_iterations
    from models import build_model
    for name, per_epoch, base, warm, power, ratio in [("voc2012_upernet_pirat", 10582 // 256, 1e-3, 410, 1.0, 1e-5),
                                                      ("ade20k_upernet_pirat", 20210 // 128, 1e-4, 785, 1.0, 1e-5),
                                                      ("ade20k_segmenter_pirat", 20210 // 112, 2e-3, 900, 0.9, 1e-5),
                                                      ("voc2012_pspnet_pirat", 10582 // 128, 4e-4, 0, 0.9, 0)]:
        cfg = _pirat_experiment(name)
        assert warmup_iterations(cfg, per_epoch) == warm  # 10 x 41 (VOC train_aug, batch 256), 5 x 157, 5 x 180, none
        total = cfg.train.epochs * per_epoch
        opt = build_optimizer(cfg, build_model(cfg))
        sched = build_scheduler(cfg, opt, total, per_epoch)
        factor = sched.lr_lambdas[0]
        assert all(f is factor for f in sched.lr_lambdas)  # one schedule for every group
        for step in range(total):
            it = step + 1
            want = ratio + (1 - ratio) * it / warm if it <= warm else (1 - (it - warm) / (total - warm)) ** power
            assert factor(step) == pytest.approx(want, rel=1e-12, abs=1e-15), (name, step)
        assert {g["lr"] / (base * factor(0)) for g in opt.param_groups} == ({1.0, 10.0} if "pspnet" in name else {1.0})
    # by hand: VOC UperNet first, second, last warmup step, mid-poly and last; PSPNet first and half-way
    lrs = []
    cfg = _pirat_experiment("voc2012_upernet_pirat")
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    sched = build_scheduler(cfg, opt, 2050, 41)
    for _ in range(2050):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.449e-6) and lrs[1] == pytest.approx(4.888e-6)
    assert lrs[409] == pytest.approx(1e-3) and lrs[1229] == pytest.approx(5e-4) and lrs[2049] == 0.0
    cfg = _pirat_experiment("voc2012_pspnet_pirat")
    opt = build_optimizer(cfg, nn.Linear(2, 2))
    sched = build_scheduler(cfg, opt, 4100, 82)
    lrs = []
    for _ in range(2050):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(3.9991219e-4) and lrs[2049] == pytest.approx(2.1435469e-4)  # 4e-4 * 0.5^0.9
    with pytest.raises(SetupError, match="'train.warmup_epochs' and train.warmup_iters are both set"):
        _pirat_experiment("voc2012_upernet_pirat", "train.warmup_iters=100")
    for bad, words in (("train.warmup_epochs=-1", "'train.warmup_epochs' must be a number >= 0"),
                       ("train.weight_decay_on=norms", "'train.weight_decay_on' must be one of all, matrices")):
        with pytest.raises(SetupError, match=words):
            _pirat_experiment("voc2012_upernet_pirat", bad)


def test_pirat_upernet_heads_start_from_n002_and_the_backbone_from_the_robust_file(tiny_config, tmp_path):
    """Decode and aux heads: conv weights N(0, 0.02), biases 0, BN at its defaults; the backbone is the
    robust ImageNet file (timm naming, wrappers and classifier as published) and nothing else touches it."""
    from engine.trainer import Trainer
    from models.backbones.convnext import convnext_cvst
    from utils.config import load_config
    torch.manual_seed(7)
    robust = convnext_cvst("convnext_t_cvst", 0.4, 0.25)
    state = {"module.base_model." + re.sub(r"^stem\.", "stem.stem.", k): v for k, v in robust.state_dict().items()
             if not k.startswith("out_norms.")}
    state["module.base_model.head.fc.weight"] = torch.zeros(1000, 192)
    os.makedirs(tmp_path / "initmodel")
    torch.save(state, tmp_path / "initmodel" / "robust.pth")
    upernet = ["model.name=upernet_convnext", "model.backbone=convnext_t_cvst", "model.width=0.25", "model.mean=null",
               "model.std=null", "train.method=pirat", "train.epochs=1"]
    cfg = load_config(tiny_config(), [*upernet, f"model.pretrained={tmp_path / 'initmodel' / 'robust.pth'}"])
    torch.manual_seed(0)
    model = Trainer(cfg).model
    for k, v in robust.state_dict().items():
        if not k.startswith("out_norms."):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    convs = [m for h in (model.decode_head, model.aux_head) for m in h.modules() if isinstance(m, nn.Conv2d)]
    w = torch.cat([m.weight.detach().flatten() for m in convs])
    assert len(convs) == 15 and w.numel() > 10 ** 5
    assert abs(w.mean()) < 1e-3 and w.std() == pytest.approx(0.02, rel=0.02)
    assert (w.abs() > 4 * 0.02).float().mean() == pytest.approx(6.3e-5, abs=1e-4)  # normal, not truncated at 2 std
    assert all(m.bias is None or not m.bias.any() for m in convs)
    bns = [m for h in (model.decode_head, model.aux_head) for m in h.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    # without a file the backbone is exactly the one the ConvNeXt constructor draws: the head init comes after it
    from models import build_model
    torch.manual_seed(5)
    fresh = convnext_cvst("convnext_t_cvst", 0.4, 0.25)
    torch.manual_seed(5)
    built = build_model(load_config(tiny_config(), upernet))
    assert all(torch.equal(v, built.backbone.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_pirat_missing_robust_init_file_is_one_line_error_before_anything_runs(tmp_path):
    """model.pretrained names a file in initmodel/ for every real-data pirat config; when it is missing, the
    launcher stops before starting a process and train.py before reading any data, with one line each."""
    import subprocess
    import sys
    from engine.trainer import Trainer
    from utils.config import load_config
    for name, path in PIRAT_CONFIGS.items():
        if not name.startswith("synthetic"):
            assert load_config(path).model.pretrained.startswith("initmodel/"), name
    missing = tmp_path / "initmodel" / "convnext_tiny_cvst_robust.pth"
    exp = tmp_path / "exp"
    args = [f"exp_dir={exp}", f"data.root={tmp_path / 'no_data'}", "device=cpu", "data.workers=0"]
    cfg = _pirat_experiment("voc2012_upernet_pirat", *args, f"model.pretrained={missing}")
    with pytest.raises(SetupError, match=f"^model.pretrained: checkpoint not found: {re.escape(str(missing))}$"):
        Trainer(cfg)  # (a missing data root would be the error if the data came first)
    r = subprocess.run(["sh", os.path.join(ROOT, "tool_train", "voc2012", "upernet_pirat.sh"), *args,
                        "model.backbone=convnext_t_cvst", "model.width=0.25", f"model.pretrained={missing}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: model.pretrained: checkpoint not found: "
                                                                   f"{missing}"], r.stderr
    assert not exp.exists()


# ---------------------------------------------------------------- mtl: multitask training (MTRobust)
SEG, DEPTH, AE = "segmentsemantic", "depth_zbuffer", "autoencoder"


def test_mtl_task_weights_by_hand():
    """main tasks 1/|M|, auxiliary lambda/|aux| (mtl_fpd.md §A2.3)."""
    assert task_weights([SEG, DEPTH, AE], [SEG], 0.001, {}) == {SEG: 1.0, DEPTH: 0.0005, AE: 0.0005}
    assert task_weights([SEG, DEPTH, AE], [], 0.01, {}) == {SEG: 1.0, DEPTH: 0.005, AE: 0.005}  # [] = segmentation
    assert task_weights([SEG, DEPTH, AE], [SEG, DEPTH], 0.1, {}) == {SEG: 0.5, DEPTH: 0.5, AE: 0.1}
    assert task_weights([SEG, DEPTH, AE], [SEG], 0.01, {DEPTH: 0.2}) == {SEG: 1.0, DEPTH: 0.1, AE: 0.005}
    assert task_weights([SEG, DEPTH, AE], [SEG], 0.01, {}, equally=True) == {t: 1 / 3 for t in (SEG, DEPTH, AE)}
    assert task_weights([DEPTH, AE], [], 0.01, {}) == {DEPTH: 0.5, AE: 0.5}  # no segmentation: every task main
    assert task_weights([SEG], [SEG], 0.01, {}) == {SEG: 1.0}


def test_mtl_per_task_losses_by_hand():
    """MSE reconstruction (in model-input units), masked L1 disparity with the mean over all pixels (in the
    original's raw/1000 units on Cityscapes), CE over the labelled pixels, each against numbers by hand."""
    out = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])              # [1,1,2,2]
    tgt = torch.tensor([[[[0.0, 0.0], [1.0, 0.25]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    assert float(task_loss("l1", out, tgt, mask)) == pytest.approx((0.5 + 1.0 + 0 + 0) / 4)   # masked, over all 4
    assert float(task_loss("mse", out, tgt)) == pytest.approx((0.25 + 1.0 + 1.0 + 0) / 4)
    assert float(task_loss(TaskLoss("l1", scale=(4.0,)), out, tgt, mask)) == pytest.approx(1.5 / 4 / 4)
    cs = published_task_losses("cityscapes", [SEG, DEPTH, AE], input_std=[0.5, 0.25, 0.2])
    assert (cs[SEG].kind, cs[DEPTH].kind, cs[AE].kind) == ("ce", "l1", "mse")
    assert cs[DEPTH].scale == (1000 / 256,) and CITYSCAPES_DISPARITY_SCALE == 1000 / 256
    rec, img = torch.zeros(1, 3, 1, 2), torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    assert float(task_loss(cs[AE], rec, img)) == pytest.approx(1.0)   # ((x - 0) / std)^2 = 1 everywhere
    assert float(task_loss(cs[DEPTH], out, tgt, mask)) == pytest.approx(1.5 * 0.256 / 4)
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 1, 0, 0] = math.log(2.0)                                # p(class 1) = 2/4 at pixel 0
    y = torch.tensor([[[1, 0, 255, 2]]])
    assert float(task_loss("ce", logits, y)) == pytest.approx((math.log(2) + 2 * math.log(3)) / 3)


def test_mtl_taskonomy_prior_weighted_ce(tmp_path):
    """Taskonomy segmentation: CE times semseg_prior_factor[label], mean over all pixels (labelled or not)."""
    fx.make_taskonomy(str(tmp_path))
    cfg = load_config(os.path.join(ROOT, "config", "taskonomy", "taskonomy_resnet18_normal_mtl.yaml"),
                      [f"data.root={tmp_path}", "data.taskonomy.size=16"])
    ds = build_dataset(cfg, "train")
    assert torch.equal(ds.seg_class_weights, torch.from_numpy(fx.TK_PRIOR))
    spec = published_task_losses("taskonomy", [SEG, "normal"], ds.seg_class_weights, cfg.model.std)[SEG]
    label = ds[0]["label"][None]                                      # fx.tk_seg: 2 unlabelled rows, classes 0/2/16
    assert [(label == c).sum().item() for c in (0, 2, 16, 255)] == [128, 32, 64, 32]
    by_hand = math.log(18) * (128 * 0.542 + 32 * 7.125 + 64 * 8.875) / 256   # zero logits: CE = log(18 channels)
    assert float(task_loss(spec, torch.zeros(1, 18, 16, 16), label)) == pytest.approx(by_hand, rel=1e-6)
    unweighted = float(task_loss(TaskLoss("prior_ce"), torch.zeros(1, 18, 16, 16), label))
    assert unweighted == pytest.approx(math.log(18) * 224 / 256) and unweighted != pytest.approx(by_hand)


class _TasksOnChannels(nn.Module):
    """Multitask model whose task i reads input channel i only (segmentation 3 classes, depth, reconstruction)."""
    multitask, main_output = True, SEG

    def __init__(self, tasks=(SEG, DEPTH, AE), bn=True):
        super().__init__()
        self.tasks = list(tasks)
        ch = {SEG: 3, DEPTH: 1, AE: 3}
        self.convs = nn.ModuleDict({t: nn.Conv2d(1, ch[t], 3, padding=1) for t in self.tasks})
        self.bns = nn.ModuleDict({t: nn.BatchNorm2d(ch[t]) if bn else nn.Identity() for t in self.tasks})
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)   # like DRN's fixed upsampler
        self.batches = []                                                 # (training, batch size) per forward

    def forward(self, x):
        self.batches.append((self.training, x.shape[0]))
        return {t: self.bns[t](self.convs[t](x[:, i:i + 1])) * self.frozen for i, t in enumerate(self.tasks)}


def _mt_batch(n=2, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g) * 0.6 + 0.2
    label = torch.randint(0, 3, (n, h, w), generator=g)
    label[:, 0, 0] = 255
    depth, dmask = torch.rand(n, 1, h, w, generator=g) * 5, torch.ones(n, 1, h, w)
    dmask[:, :, :2, :2] = 0
    return {"image": x, "label": label, "index": torch.arange(n),
            "targets": {SEG: label, DEPTH: depth, AE: x.clone()},
            "masks": {SEG: (label != 255).float()[:, None], DEPTH: dmask, AE: torch.ones(n, 1, h, w)}}


def _mtl(tiny_cfg, *overrides, model=None):
    cfg = tiny_cfg("train.method=mtl", "data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]", *overrides)
    defense = build_defense(cfg)
    model = model if model is not None else _TasksOnChannels()
    defense.prepare(model)
    return defense, model


def test_mtl_none_and_mtl_share_the_weighted_loss(tiny_cfg):
    """`none` on multitask data: the same weighted loss (train.mtl defaults: main segmentation, lambda 0.01);
    `mtl` without attack gives the same value; both are the weighted sum of the per-task losses."""
    torch.manual_seed(0)
    batch, model = _mt_batch(), _TasksOnChannels().train()
    with torch.no_grad():
        out = model(batch["image"])
    none = build_defense(tiny_cfg("data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]"))
    loss, logs = none.multitask_loss(out, batch)
    std = (0.229, 0.224, 0.225)  # the tiny config's model.std: reconstruction in model-input units
    ce = nn.functional.cross_entropy(out[SEG], batch["label"], ignore_index=255)
    l1 = ((out[DEPTH] - batch["targets"][DEPTH]).abs() * batch["masks"][DEPTH]).mean()
    mse = (((out[AE] - batch["image"]) / torch.tensor(std).view(1, 3, 1, 1)) ** 2).mean()
    assert float(logs["loss_segmentsemantic"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(logs["loss_depth_zbuffer"]) == pytest.approx(float(l1), rel=1e-6)
    assert float(logs["loss_autoencoder"]) == pytest.approx(float(mse), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce + 0.005 * l1 + 0.005 * mse), rel=1e-6)
    mtl, _ = _mtl(tiny_cfg, model=model)
    assert float(mtl.objective(out, batch["targets"], batch["masks"])[0]) == pytest.approx(float(loss), rel=1e-6)


def test_mtl_attack_and_training_use_the_same_losses(tmp_path):
    """The evaluator's multitask attack, the mtl training attack and the training loss use one set of per-task
    losses: the same specs (prior weights and scales included) and the same values on the same outputs, the
    attack's averaged over the images' own losses (Cityscapes' CE: not pooled over the batch's labelled pixels)."""
    from engine.evaluator import build_attack_runs
    for maker, config, tasks in ((fx.make_taskonomy, "taskonomy/taskonomy_resnet18_autoencoder_mtl.yaml", [SEG, AE]),
                                 (fx.make_cityscapes, "cityscapes/cityscapes_drn_sdA_mtl.yaml", [SEG, DEPTH, AE])):
        root = tmp_path / config.split("/")[0]
        maker(str(root))
        cfg = load_config(os.path.join(ROOT, "config", config),
                          [f"data.root={root}", "data.taskonomy.size=16", "data.crop_size=[17,17]",
                           f"test.attack_tasks=[{','.join(tasks)}]", "train.mtl.adversarial=true",
                           f"train.mtl.attack_tasks=[{','.join(tasks)}]", "test.attacks=[{name: multitask, steps: 1, alpha: 1.0}]",
                           "test.eps=[4]"])
        ds = build_dataset(cfg, "train")
        defense = build_defense(cfg)
        defense.set_dataset(ds)
        model = _TasksOnChannels(tasks)
        defense.prepare(model)
        (run,) = build_attack_runs(cfg, model=model, dataset=ds)
        losses = defense.objective.losses
        assert run.attack.options["task_losses"] == losses == defense.attack.options["task_losses"]
        assert run.attack.options["tasks"] == tasks == defense.attack.options["tasks"]
        if SEG in losses and cfg.data.name == "taskonomy":
            assert losses[SEG].class_weights == tuple(fx.TK_PRIOR.tolist())
        assert losses[AE].scale == tuple(cfg.model.std)
        batch = torch.utils.data.default_collate([ds[0], ds[1]])
        torch.manual_seed(1)
        out = {t: torch.randn_like(batch["targets"][t].float()) if t != SEG else
               torch.randn(2, 18 if cfg.data.name == "taskonomy" else 19, *batch["label"].shape[-2:]) for t in tasks}
        _, per_task = defense.objective(out, batch["targets"], batch["masks"])
        alone = [defense.objective({t: o[i:i + 1] for t, o in out.items()},
                                   {t: v[i:i + 1] for t, v in batch["targets"].items()},
                                   {t: v[i:i + 1] for t, v in batch["masks"].items()})[1] for i in range(2)]
        y = task_targets(batch["targets"], batch["masks"])
        for t in tasks:   # the attack ascends the training loss, image by image: the mean of each image's own
            got = float(multitask_loss(out, y, [t], run.attack.options["task_losses"]))
            assert got == pytest.approx((float(alone[0][t]) + float(alone[1][t])) / 2, rel=1e-6)
            if t != SEG or cfg.data.name == "taskonomy":   # pooled over the batch = mean of the images' own
                assert got == pytest.approx(float(per_task[t]), rel=1e-6)
        assert float(multitask_loss(out, y, tasks, losses)) == pytest.approx(
            sum(float(alone[0][t]) + float(alone[1][t]) for t in tasks) / 2, rel=1e-6)


def test_mtl_one_iteration_touches_exactly_the_trained_parameters(tmp_path):
    """One adversarial mtl step of the DRN-D-22 sd model through the trainer: every trainable parameter gets a
    gradient (the disparity head's is exactly 0 with lambda 0), the frozen upsamplers none and stay as they were,
    and BatchNorm statistics move once, by the training forward on the adversarial batch (not the attack's)."""
    from engine.trainer import Trainer
    fx.make_cityscapes(str(tmp_path / "cs"))
    cfg = load_config(os.path.join(ROOT, "config", "cityscapes", "cityscapes_drn_sd_mtl.yaml"),
                      [f"data.root={tmp_path / 'cs'}", f"exp_dir={tmp_path / 'exp'}", "data.workers=0",
                       "data.crop_size=[17,17]", "train.batch_size=2", "train.mtl.task_lambdas={depth_zbuffer: 0.0}",
                       "train.weight_decay=0.0", "train.attack={random_start: false}"])
    trainer = Trainer(cfg)
    model = trainer.model
    batch = next(iter(trainer.loader))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    x_adv = trainer.defense.adversarial_batch(reference, batch)
    reference.train()(x_adv)                     # the one BatchNorm update the step should make
    assert trainer.train_step(batch) is not None
    after = model.state_dict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(after[name], before[name]), name   # fixed bilinear upsamplers
        elif name.startswith("heads.depth_zbuffer."):
            assert p.grad is not None and (p.grad == 0).all(), name                  # weight 0: no update
            assert torch.equal(after[name], before[name]), name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not torch.equal(after[name], before[name]), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["heads.segmentsemantic.up.weight", "heads.depth_zbuffer.up.weight"]
    for name, buf in model.named_buffers():
        if "running_" in name or "num_batches" in name:
            assert torch.equal(buf, reference.state_dict()[name]) and not torch.equal(buf, before[name]), name


def test_mtl_attack_is_frozen_and_hits_only_the_configured_tasks(tiny_cfg):
    """After the attack no parameter has a gradient and BatchNorm statistics are unchanged; the attack moves
    only the input channels of the attacked tasks (only their losses' gradients reach the input)."""
    batch = _mt_batch()
    for attacked, channels in (([SEG], [0]), ([DEPTH], [1]), ([DEPTH, AE], [1, 2]), ([], [0])):  # [] = main task
        defense, model = _mtl(tiny_cfg, "train.mtl.adversarial=true", "train.attack={random_start: false}",
                              f"train.mtl.attack_tasks=[{','.join(attacked)}]")
        model.train()
        stats = {k: v.clone() for k, v in model.state_dict().items()}
        x_adv = defense.adversarial_batch(model, batch)
        assert model.training and all(p.grad is None for p in model.parameters())
        assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
        moved = [c for c in range(3) if (x_adv[:, c] - batch["image"][:, c]).abs().max() > 0]
        assert moved == channels, (attacked, moved)
        assert (x_adv - batch["image"]).abs().max() <= 8 / 255 + 1e-6
        assert defense.attack_tasks == (attacked or [SEG])


def test_mtl_adversarial_loss_keeps_clean_targets_and_mixes_as_configured(tiny_cfg):
    """The adversarial batch is scored against the clean targets (reconstruction: the clean image); mix_clean m
    gives (1 - m) L(x_adv) + m L(x) from one forward of both halves; m = 0 trains on x_adv alone."""
    batch = _mt_batch()
    for mix in (0.0, 0.25):
        defense, model = _mtl(tiny_cfg, "train.mtl.adversarial=true", f"train.mtl.mix_clean={mix}",
                              "train.mtl.attack_tasks=[segmentsemantic,autoencoder]",
                              model=_TasksOnChannels(bn=False))
        model.train()
        loss, logs = defense.loss(model, batch)
        forwards = model.batches
        assert [b for b in forwards if b[0]] == [(True, 2 * 2 if mix else 2)]      # one training forward
        x_adv = defense.adversarial_batch(model, batch)
        with torch.no_grad():
            adv_out, clean_out = model(x_adv), model(batch["image"])
        l_adv, per_adv = defense.objective(adv_out, batch["targets"], batch["masks"])
        l_clean, _ = defense.objective(clean_out, batch["targets"], batch["masks"])
        assert float(logs["loss_adv"]) == pytest.approx(float(l_adv), rel=1e-6) and float(l_adv) != float(l_clean)
        std = torch.tensor(tiny_cfg().model.std).view(1, 3, 1, 1)
        to_clean = (((adv_out[AE] - batch["image"]) / std) ** 2).mean()
        to_adv = (((adv_out[AE] - x_adv) / std) ** 2).mean()
        assert float(logs["loss_adv_autoencoder"]) == pytest.approx(float(to_clean), rel=1e-6)
        assert float(to_adv) != pytest.approx(float(to_clean), rel=1e-3)
        assert float(loss.detach()) == pytest.approx(float((1 - mix) * l_adv + mix * l_clean), rel=1e-6)
        assert ("loss_clean" in logs) == bool(mix) and "acc_adv" in logs
        assert "training attack multitask(" in defense.describe() and f"mix_clean {mix:g}" in defense.describe()


def test_mtl_training_lowers_the_loss(tiny_cfg):
    """200 adversarial mtl iterations of a tiny model on tiny images lower every term of the loss (each by > 2x)."""
    torch.manual_seed(0)
    defense, _ = _mtl(tiny_cfg, "train.mtl.adversarial=true", "train.attack={steps: 1}", "train.mtl.mt_lambda=0.5")
    net = _SmallMultitask()
    defense.prepare(net)
    batches = [_mt_batch(4, 8, 8, seed=s) for s in range(4)]
    for b in batches:    # learnable targets: segmentation and depth from the image
        b["targets"][SEG] = (b["image"][:, 0] > b["image"][:, 1]).long()
        b["targets"][DEPTH] = b["image"][:, 2:3] * 4
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    history = []
    for it in range(200):
        defense.set_epoch(it // 4)
        loss, logs = defense.loss(net.train(), batches[it % 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v) for k, v in logs.items()})
    for key in ("loss_adv", "loss_adv_segmentsemantic", "loss_adv_depth_zbuffer", "loss_adv_autoencoder"):
        first, last = (sum(h[key] for h in part) / 20 for part in (history[:20], history[-20:]))
        assert last < 0.5 * first, (key, first, last)


class _SmallMultitask(nn.Module):
    multitask, main_output, tasks = True, SEG, [SEG, DEPTH, AE]

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleDict({SEG: nn.Conv2d(16, 3, 1), DEPTH: nn.Conv2d(16, 1, 1), AE: nn.Conv2d(16, 3, 1)})

    def forward(self, x):
        f = self.enc(x)
        return {t: h(f) for t, h in self.heads.items()}


@pytest.mark.parametrize("overrides,model,message", [
    (["data.tasks=[segmentsemantic]"], "pspnet", "train.method mtl needs a multitask model"),
    (["data.tasks=[]", "model.tasks=[segmentsemantic,depth_zbuffer,autoencoder]"], "mt",
     "train.method mtl: data.tasks is empty"),
    (["train.mtl.main_tasks=[depth_zbuffer]", "data.tasks=[segmentsemantic,autoencoder]",
      "model.tasks=[segmentsemantic,autoencoder]"], "mt",
     "train.mtl.main_tasks: 'depth_zbuffer' is not a trained task"),
    (["train.mtl.task_lambdas={normal: 0.1}"], "mt", "train.mtl.task_lambdas: 'normal' is not a trained task"),
    (["train.mtl.task_lambdas={segmentsemantic: 0.1}"], "mt", "train.mtl.task_lambdas: 'segmentsemantic' is a main"),
    (["train.mtl.adversarial=true", "train.mtl.attack_tasks=[normal]"], "mt",
     "train.mtl.attack_tasks: ['normal'] not among the trained tasks"),
    (["train.mtl.adversarial=true", "train.attack={name: pgd, alpha: 2.0, steps: 1}", "train.mtl.attack_tasks=[autoencoder]"], "mt",
     "the training attack 'pgd' attacks the segmentation output only"),
], ids=["single_task_model", "no_tasks", "main_not_trained", "lambda_not_trained", "lambda_of_main",
        "attack_task_not_trained", "single_task_attack_on_aux"])
def test_mtl_bad_input_is_one_line_before_any_step(tiny_cfg, tmp_path, overrides, model, message):
    from engine.trainer import Trainer
    mt = ["model.name=taskonomy_resnet", "model.width=0.125", "model.tasks=[segmentsemantic,depth_zbuffer,autoencoder]",
          "model.task_channels={segmentsemantic: 6}"]
    cfg = tiny_cfg("train.method=mtl", "data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]", "data.transform=crop_flip",
                   *(mt if model == "mt" else []), *overrides)
    with pytest.raises(SetupError) as e:
        Trainer(cfg)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(cfg.exp_dir)   # nothing written, no step taken
