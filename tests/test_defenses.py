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
