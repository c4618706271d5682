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


# ---------------------------------------------------------------- mtl: multitask training (MTRobust)
import math  # noqa: E402
import os  # noqa: E402

import data_fixtures as fx  # noqa: E402
from attacks.multitask import (CITYSCAPES_DISPARITY_SCALE, TaskLoss, multitask_loss, published_task_losses,  # noqa: E402
                               task_loss, task_targets)
from defenses.multitask import task_weights  # noqa: E402
from utils.config import load_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    from datasets import build_dataset
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
    losses: the same specs (prior weights and scales included) and the same values on the same outputs."""
    from datasets import build_dataset
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
        y = task_targets(batch["targets"], batch["masks"])
        for t in tasks:   # what the attack ascends (attacks.multitask.multitask_loss) is the training loss
            assert float(multitask_loss(out, y, [t], run.attack.options["task_losses"])) == float(per_task[t])
        assert float(multitask_loss(out, y, tasks, losses)) == pytest.approx(float(sum(per_task.values())))


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
    reference = __import__("copy").deepcopy(model)
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
