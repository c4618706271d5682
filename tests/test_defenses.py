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


# ---------------------------------------------------------------- pirat (PIR-AT, sea.md §4)
import copy  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from tests.conftest import ROOT  # noqa: E402
from tests import data_fixtures as fx  # noqa: E402

PIRAT_CONFIGS = {name: os.path.join(ROOT, "config", name.split("_")[0], name + ".yaml") for name in (
    "voc2012_upernet_pirat", "voc2012_upernet_s_pirat", "voc2012_pspnet_pirat", "ade20k_upernet_pirat",
    "ade20k_upernet_s_pirat", "synthetic_pspnet18_pirat")}


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

    def checked(net, x, y, index, forward=None):
        before = {k: v.clone() for k, v in net.state_dict().items()}
        x_adv = adversarial(net, x, y, index, forward)
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


def test_pirat_clean_statistics_with_and_without_random_start(tiny_cfg):
    """loss_clean / acc_clean are the eval-mode model on the clean batch: read from the attack's first forward
    when it starts at the clean image, from one extra forward when it starts elsewhere; the same values."""
    batch = _pirat_batch()
    torch.manual_seed(0)
    model = _TinySeg().train()
    model.eval()
    with torch.no_grad():
        clean = model(batch["image"])
    model.train()
    want_loss = F.cross_entropy(clean, batch["label"], ignore_index=255)
    want_acc = pixel_accuracy(clean, batch["label"])
    for attack in ("{steps: 2}", "{steps: 2, random_start: true}", "{name: apgd, steps: 2}"):
        defense = build_defense(tiny_cfg("train.method=pirat", f"train.attack={attack}"))
        _, logs = defense.loss(copy.deepcopy(model), batch)  # (its training forward moves the BN statistics)
        assert torch.allclose(logs["loss_clean"], want_loss, atol=1e-6) and logs["acc_clean"] == want_acc, attack
        assert logs["loss_adv"] > want_loss  # (training mode on x_adv)
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
                                                      ("voc2012_pspnet_pirat", 10582 // 128, 4e-4, 0, 0.9, 0)]:
        cfg = _pirat_experiment(name)
        assert warmup_iterations(cfg, per_epoch) == warm  # 10 x 41 (VOC train_aug, batch 256), 5 x 157, none
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
