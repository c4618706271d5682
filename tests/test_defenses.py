"""Training methods: the shared adversarial step (frozen parameters, BN statistics, train mode,
seeded starts, train.attack overrides) and each registered method."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from defenses import DEFENSES, build_defense
from defenses.base import Defense, pixel_accuracy
from utils.errors import SetupError


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

    def spy(forward, xx, yy, keys):
        seen.update(labels=yy.clone(), training=model.training, frozen=not any(p.requires_grad for p in model.parameters()))
        seen["x_adv"] = real(forward, xx, yy, keys)
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
