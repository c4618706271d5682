"""ResNet / PSPNet / DeepLabv3 / DDC-AT / UperNet-ConvNeXt: sizes, output contract, layouts, weights."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from models import MODELS, build_model
from models.backbones.convnext import DropPath, LayerNorm2d, convnext_cvst
from models.backbones.resnet import ResNet
from models.ddcat import DeepLabV3DDCAT, PSPNetDDCAT, route
from models.deeplabv3 import DeepLabV3
from models.inference import slide_inference, window_stride
from models.pspnet import PSPNet
from models.segmenter import Segmenter
from models.upernet import UperNet
from models.weight_formats import load_backbone_weights
from models.weights import load_model_weights
from utils.config import ROOT, load_config
from utils.errors import SetupError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def on_meta(fn):
    """Build a big model without allocating or initialising its weights (counting only)."""
    with torch.device("meta"):
        return fn()


# ------------------------------------------------------------------ parameter counts (no forward)

@pytest.mark.parametrize("cls, classes, expected", [
    (PSPNet, 19, 49_080_038), (PSPNet, 21, 49_081_578),
    (PSPNetDDCAT, 19, 86_841_595), (PSPNetDDCAT, 21, 86_844_161),
    (DeepLabV3, 19, 39_439_334), (DeepLabV3, 21, 39_440_362),
    (DeepLabV3DDCAT, 19, 40_101_115), (DeepLabV3DDCAT, 21, 40_102_657),
])
def test_resnet50_model_param_counts(cls, classes, expected):
    assert nparams(on_meta(lambda: cls(classes, 50))) == expected


@pytest.mark.parametrize("variant, classes, expected", [
    ("convnext_t_cvst", 21, 60_181_610), ("convnext_t_cvst", 151, 60_281_710),
    ("convnext_s_cvst", 21, 81_816_170), ("convnext_s_cvst", 151, 81_916_270),
])
def test_upernet_param_counts(variant, classes, expected):
    assert nparams(on_meta(lambda: UperNet(classes, variant))) == expected


# torchvision ResNet sizes minus the 1000-way fc; the deep stem adds 123,776 parameters
# (3x3 convs 3-64-64-128 + BNs instead of 7x7 3-64, and layer1 then starts from 128 channels).
@pytest.mark.parametrize("layers, tv_total, fc_in", [(18, 11_689_512, 512), (34, 21_797_672, 512),
                                                     (50, 25_557_032, 2048), (101, 44_549_160, 2048),
                                                     (152, 60_192_808, 2048)])
def test_resnet_backbone_param_counts(layers, tv_total, fc_in):
    plain = tv_total - (fc_in * 1000 + 1000)
    assert nparams(on_meta(lambda: ResNet(layers, deep_base=False))) == plain
    stem = (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * (64 + 64 + 128)) - (3 * 64 * 49 + 2 * 64)
    layer1 = 64 * 64 * 9 + 64 * 128 + 128 if fc_in == 512 else 64 * 64 + 64 * 256  # extra inputs of block 1
    assert nparams(on_meta(lambda: ResNet(layers, deep_base=True))) == plain + stem + layer1


def test_standard_stem_layout():
    r = ResNet(18, deep_base=False, width=0.25)
    conv = r.layer0[0]
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and conv.padding == (3, 3)
    assert isinstance(r.layer0[3], torch.nn.MaxPool2d) and len(r.layer0) == 4
    # dilation as in semseg: every 3x3 of layer3 at 2, of layer4 at 4, no stride there
    r50 = on_meta(lambda: ResNet(50))
    assert all(b.conv2.dilation == (2, 2) and b.conv2.stride == (1, 1) for b in r50.layer3)
    assert all(b.conv2.dilation == (4, 4) and b.conv2.stride == (1, 1) for b in r50.layer4)
    assert r50.layer4[0].downsample[0].stride == (1, 1)


def test_upernet_width_scales_backbone_and_heads():
    cfg = load_config(os.path.join(ROOT, "config", "voc2012", "voc2012_upernet_none.yaml"), ["model.width=0.25"])
    m = build_model(cfg)
    assert m.backbone.channels == [24, 48, 96, 192] and m.backbone.stem[0].out_channels == 12
    assert m.decode_head.classifier.in_channels == 128 and m.aux_head.classifier.in_channels == 64
    assert [len(s.blocks) for s in m.backbone.stages] == [3, 3, 9, 3]  # depth kept: still ConvNeXt-T
    assert nparams(m) < nparams(on_meta(lambda: UperNet(21, "convnext_t_cvst"))) / 10
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, 32, 40)).shape == (1, 21, 32, 40)


def test_upernet_drop_path_schedule():
    t, s = on_meta(lambda: convnext_cvst("convnext_t_cvst")), on_meta(lambda: convnext_cvst("convnext_s_cvst"))
    rates = lambda m: [b.drop_path.p for st in m.stages for b in st.blocks]  # noqa: E731
    assert rates(t)[0] == 0.0 and rates(t)[-1] == pytest.approx(0.4) and len(rates(t)) == 18
    assert rates(s)[-1] == pytest.approx(0.3) and len(rates(s)) == 36
    assert rates(t)[1] == pytest.approx(0.4 / 17)


# ------------------------------------------------------------------ small models: forward contract

def small(name: str, classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "upernet_convnext":
        return UperNet(classes, "convnext_t_cvst", mean=None, std=None)
    if name == "segmenter":
        return Segmenter(classes, img_size=64, dim=32, depth=2, heads=2)
    kw = dict(layers=18, width=0.25, mean=MEAN, std=STD)
    return {"pspnet": PSPNet, "deeplabv3": DeepLabV3, "pspnet_ddcat": PSPNetDDCAT,
            "deeplabv3_ddcat": DeepLabV3DDCAT}[name](classes, **kw)


NAMES = ["pspnet", "deeplabv3", "pspnet_ddcat", "deeplabv3_ddcat", "upernet_convnext", "segmenter"]
TRAIN_KEYS = {"pspnet": {"out", "aux"}, "deeplabv3": {"out", "aux"}, "upernet_convnext": {"out", "aux"},
              "segmenter": {"out"},
              "pspnet_ddcat": {"out", "adv", "mask", "aux"}, "deeplabv3_ddcat": {"out", "adv", "mask", "aux"}}


def test_all_registered_models_covered():
    for n in NAMES:
        assert n in MODELS


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_contract(name):
    m = small(name)
    size = (33, 33) if name == "upernet_convnext" else (65, 65)
    x = torch.rand(2, 3, *size, requires_grad=True)
    m.train()
    out = m(x)
    assert isinstance(out, dict) and set(out) == TRAIN_KEYS[name]
    for k, v in out.items():
        assert v.shape == (2, 2 if k == "mask" else 5) + size, k
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and x.grad is not None and x.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        y = m(x)
        d = m.outputs(x)
    assert torch.is_tensor(y) and y.shape == (2, 5) + size
    assert isinstance(d, dict) and torch.allclose(d["out"], y, atol=1e-5)
    assert "aux" not in d  # the aux head only runs in training


@pytest.mark.parametrize("name", NAMES)
def test_aux_heads_are_exactly_the_modules_only_the_aux_output_trains(name):
    """`aux_heads()` (what the trainer freezes at train.aux_weight 0): the parameters that get a gradient
    from the "aux" output and none from every other output are exactly theirs."""
    m = small(name)
    size = (33, 33) if name == "upernet_convnext" else (65, 65)
    m.train()
    out = m(torch.rand(2, 3, *size))

    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]

    def touched(outputs) -> set:
        grads = torch.autograd.grad(sum(o.float().mean() for o in outputs), [p for _, p in params],
                                    allow_unused=True, retain_graph=True)
        return {n for (n, _), g in zip(params, grads) if g is not None}
    others = touched([v for k, v in out.items() if k != "aux"])
    only_aux = touched([out["aux"]]) - others if "aux" in out else set()
    declared = {f"{prefix}.{n}" for prefix, head in m.aux_heads().items() for n, _ in head.named_parameters()}
    assert declared == only_aux and (bool(declared) == ("aux" in TRAIN_KEYS[name]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(65, 65), (33, 49)])
def test_logits_at_input_resolution(name, size):
    m = small(name).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, *size)).shape == (1, 5) + size


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_matches_default_layout(name):
    m = small(name).eval()
    x = torch.rand(2, 3, 33, 49)
    with torch.no_grad():
        a = m(x)
        m = m.to(memory_format=torch.channels_last)
        b = m(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(a, b, atol=1e-4 * a.abs().max().item() + 1e-5)


def test_normalisation_inside_model():
    m = small("pspnet").eval()
    x = torch.rand(1, 3, 33, 33)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = m.forward_features((x - mean) / std, x.shape[-2:])["out"]
        assert torch.allclose(m(x), ref)
    assert "mean" not in m.state_dict()  # non-persistent: published checkpoints lack it


# ------------------------------------------------------------------ DDC-AT routing

def test_route_by_hand():
    o_n = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    o_a = -o_n - 1
    mask = torch.zeros(2, 2, 2, 2)
    mask[0, 1, 0, 1] = 1.0  # pixel (0,1) of image 0 -> f_a
    mask[1, 1, 1, 0] = 3.0  # pixel (1,0) of image 1 -> f_a
    mask[1, 0, 0, 0] = mask[1, 1, 0, 0] = 2.0  # tie -> f_n
    o = route({"out": o_n, "adv": o_a, "mask": mask})
    expected = o_n.clone()
    for b, i, j in [(0, 0, 1), (1, 1, 0)]:
        expected[b, :, i, j] = o_a[b, :, i, j]
    assert torch.equal(o, expected)


@pytest.mark.parametrize("name", ["pspnet_ddcat", "deeplabv3_ddcat"])
def test_ddcat_eval_returns_main_branch_only(name):
    m = small(name).eval()
    x = torch.rand(1, 3, 33, 41)
    with torch.no_grad():
        d = m.outputs(x)
        y = m(x)
        # routed output really mixes heads when the router says so
        d2 = dict(d, mask=torch.stack([-d["mask"][:, 0].abs() - 1, d["mask"][:, 0].abs() + 1], 1))
    assert set(d) == {"out", "adv", "mask"}
    assert torch.allclose(y, d["out"], atol=1e-6)
    assert torch.equal(route(d2), d["adv"])
    groups = m.param_groups(10.0)
    names = {n for n, _ in m.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert len(groups[0]["params"]) == sum(1 for n in names if n.startswith("backbone."))
    assert {n.split(".")[0] for n in names} == {"backbone", "ppm" if "psp" in name else "aspp",
                                                "cls1", "cls2", "mask1", "aux_cls1"}


def test_deeplabv3_structure():
    m = on_meta(lambda: DeepLabV3(21, 50))
    convs = m.aspp.convs
    assert [c[0].dilation[0] for c in convs[1:4]] == [6, 12, 18] and convs[0][0].kernel_size == (1, 1)
    assert m.cls[0].in_channels == 1280 and m.cls[0].kernel_size == (1, 1)
    assert m.aux[0].in_channels == 1024 and m.aux[0].kernel_size == (1, 1)


def test_drop_path_and_layernorm2d():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    x = torch.ones(4000, 3, 2, 2)
    y = dp(x)
    per_sample = y.view(4000, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # whole samples dropped
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(dp.eval()(x), x)
    ln = LayerNorm2d(3, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ln.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    z = torch.randn(2, 3, 4, 5)
    ref = F.layer_norm(z.permute(0, 2, 3, 1), (3,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(ln(z), ref, atol=1e-5)


# ------------------------------------------------------------------ configs

FRAGMENTS = {"pspnet50.yaml": (PSPNet, 49_080_038), "deeplabv3_50.yaml": (DeepLabV3, 39_439_334),
             "pspnet50_ddcat.yaml": (PSPNetDDCAT, 86_841_595),
             "deeplabv3_50_ddcat.yaml": (DeepLabV3DDCAT, 40_101_115),
             # 21-class counts less 2 classes x (512 + 1 decode + 256 + 1 aux classifier weights)
             "upernet_convnext_t.yaml": (UperNet, 60_181_610 - 2 * 770),
             "upernet_convnext_s.yaml": (UperNet, 81_816_170 - 2 * 770),
             # 151-class count less 132 classes x (384 class embedding + 2 mask_norm) (tests/test_models_segmenter.py)
             "segmenter_vit_s.yaml": (Segmenter, 26_419_350 - 132 * 386)}


@pytest.mark.parametrize("fragment", sorted(FRAGMENTS))
def test_config_fragments_build(fragment, tmp_path):
    base = os.path.join(ROOT, "config", "_base_", "models", fragment)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"_base_: {base}\ndata:\n  classes: 19\n")
    cfg = load_config(str(exp))
    m = on_meta(lambda: build_model(cfg))
    cls, count = FRAGMENTS[fragment]
    assert type(m) is cls and nparams(m) == count  # 19 classes
    assert m.normalized == (cls not in (UperNet, Segmenter))
    if cls is UperNet:
        depth = sum(len(s.blocks) for s in m.backbone.stages)
        assert m.backbone.stages[3].blocks[-1].drop_path.p == pytest.approx(0.4 if depth == 18 else 0.3)


def test_unknown_convnext_variant_is_a_setup_error(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("model:\n  name: upernet_convnext\n  backbone: convnext_b\n")
    with pytest.raises(SetupError, match="model.backbone"):
        build_model(load_config(str(exp)))



@pytest.mark.parametrize("name", ["pspnet", "deeplabv3", "pspnet_ddcat", "deeplabv3_ddcat"])
def test_semseg_models_want_crops_on_the_stride_8_grid(name, tiny_cfg):
    with pytest.raises(SetupError, match=rf"^config key 'data.crop_size' is \[34, 34\] but {name} needs \(h-1\) and "
                                         rf"\(w-1\) divisible by 8, e.g. \[33, 33\]$"):
        build_model(tiny_cfg(f"model.name={name}", "data.crop_size=[34,34]"))
    with pytest.raises(SetupError, match=r"'test.crop_size' is \[40, 49\] .* e.g. \[41, 49\]$"):
        build_model(tiny_cfg(f"model.name={name}", "test.crop_size=[40,49]"))
    build_model(tiny_cfg(f"model.name={name}", "data.crop_size=[34,34]", "data.transform=none"))  # no crop taken
    if name.endswith("_ddcat"):
        with pytest.raises(SetupError, match="'model.aux' must be true"):
            build_model(tiny_cfg(f"model.name={name}", "model.aux=false"))


# ------------------------------------------------------------------ weights

def rename_keys(state, fn):
    out = {}
    for k, v in state.items():
        nk = fn(k)
        if nk is not None:
            out[nk] = v.clone()
    return out


def to_semseg(k: str) -> str:
    return "module." + (k[len("backbone."):] if k.startswith("backbone.") else k)


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def randomized(m: torch.nn.Module) -> torch.nn.Module:
    """Every tensor (BN statistics included) set to fresh values, scaled to keep activations finite."""
    torch.manual_seed(3)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point() and t.ndim > 1:
                t.copy_(torch.randn_like(t) / math.sqrt(t[0].numel()))
            elif t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return m


@pytest.mark.parametrize("name", ["pspnet", "deeplabv3", "pspnet_ddcat", "deeplabv3_ddcat"])
def test_semseg_checkpoint_loads_strictly(name, tmp_path):
    src = randomized(small(name))
    keys = list(src.state_dict())
    assert any(k.startswith("backbone.layer0.") for k in keys)
    path = tmp_path / "train_epoch_400.pth"
    torch.save({"epoch": 400, "state_dict": rename_keys(src.state_dict(), to_semseg)}, path)
    dst = small(name)
    assert load_model_weights(dst, str(path)) == "semseg"
    assert_same(src, dst)


@pytest.mark.parametrize("ddcat, plain", [("pspnet_ddcat", "pspnet"), ("deeplabv3_ddcat", "deeplabv3")])
def test_ddcat_checkpoint_into_plain_model(ddcat, plain, tmp_path):
    src = randomized(small(ddcat)).eval()
    path = tmp_path / "ddcat.pth"
    torch.save({"state_dict": rename_keys(src.state_dict(), to_semseg)}, path)
    dst = small(plain).eval()
    assert load_model_weights(dst, str(path)) == "ddcat_main_head"
    x = torch.rand(1, 3, 33, 33)
    with torch.no_grad():
        y = dst(x)
        assert torch.isfinite(y).all() and torch.allclose(y, src(x), atol=1e-5)
    sd = dst.state_dict()
    assert torch.equal(sd["aux.4.weight"], src.state_dict()["aux_cls1.4.weight"])


def to_pirat(k: str) -> str:
    """Our UperNet keys -> nmndeep/Robust-Segmentation UperNetForSemanticSegmentation keys."""
    m = re.match(r"backbone\.stem\.(\d)\.(.*)", k)
    if m:
        return f"backbone.downsample_layers.0.stem.{m[1]}.{m[2]}"
    m = re.match(r"backbone\.stages\.(\d)\.downsample\.(\d)\.(.*)", k)
    if m:
        return f"backbone.downsample_layers.{m[1]}.{m[2]}.{m[3]}"
    m = re.match(r"backbone\.stages\.(\d)\.blocks\.(\d+)\.(.*)", k)
    if m:
        leaf = {"conv_dw": "dwconv", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}
        rest = m[3]
        for a, b in leaf.items():
            rest = rest.replace(a + ".", b + ".")
        return f"backbone.stages.{m[1]}.{m[2]}.{rest}"
    m = re.match(r"backbone\.out_norms\.(\d)\.(.*)", k)
    if m:
        return f"backbone.norm{m[1]}.{m[2]}"
    k = k.replace(".bn.", ".batch_norm.")
    m = re.match(r"decode_head\.ppm\.(\d)\.(.*)", k)
    if m:
        return f"decode_head.psp_modules.{m[1]}.1.{m[2]}"
    k = k.replace("aux_head.conv.", "auxiliary_head.convs.0.").replace("aux_head.classifier", "auxiliary_head.classifier")
    return k


def test_pirat_upernet_checkpoint_loads_strictly():
    src = randomized(UperNet(21, "convnext_t_cvst"))
    published = {"module." + k: v for k, v in rename_keys(src.state_dict(), to_pirat).items()}
    assert "module.backbone.stages.2.8.pwconv2.weight" in published
    assert "module.decode_head.psp_modules.3.1.batch_norm.running_var" in published
    assert "module.auxiliary_head.convs.0.conv.weight" in published
    dst = UperNet(21, "convnext_t_cvst")
    assert load_model_weights(dst, "pirat.pth", state=published) == "pirat_upernet"
    assert_same(src, dst)


def test_wrong_architecture_lists_keys(tmp_path):
    path = tmp_path / "psp.pth"
    torch.save({"state_dict": rename_keys(small("pspnet").state_dict(), to_semseg)}, path)
    with pytest.raises(SetupError) as e:
        load_model_weights(small("deeplabv3"), str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing keys" in msg and "aspp.convs" in msg and "unexpected keys" in msg and "ppm.features" in msg


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Exploit(str(marker))}}, path)
    with pytest.raises(SetupError, match="refused"):
        load_model_weights(small("pspnet"), str(path))
    with pytest.raises(SetupError, match="refused"):
        load_backbone_weights(ResNet(18, width=0.25), str(path))
    assert not marker.exists()


# backbone (ImageNet) formats
STEM = {"layer0.0.": "conv1.", "layer0.1.": "bn1.", "layer0.3.": "conv2.", "layer0.4.": "bn2.",
        "layer0.6.": "conv3.", "layer0.7.": "bn3."}


def to_imagenet_resnet(k: str) -> str:
    for a, b in STEM.items():
        if k.startswith(a):
            return b + k[len(a):]
    return k


def with_fc(state, dim):
    return dict(state, **{"fc.weight": torch.randn(1000, dim), "fc.bias": torch.randn(1000)})


@pytest.mark.parametrize("deep_base", [True, False])
def test_imagenet_resnet_formats(deep_base, tmp_path):
    src = randomized(ResNet(50, deep_base, width=0.25))
    state = with_fc(rename_keys(src.state_dict(), to_imagenet_resnet), src.channels[3])
    if deep_base:
        assert {"conv3.weight", "bn3.running_mean"} <= set(state)
        # old semseg files carry no BN counters
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50_v2.pth"
    torch.save(state, path)
    dst = ResNet(50, deep_base, width=0.25)
    assert load_backbone_weights(dst, str(path)) == "resnet_imagenet"
    sd = dst.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked"))


def test_robust_resnet_format(tmp_path):
    src = randomized(ResNet(50, False, width=0.25))
    plain = with_fc(rename_keys(src.state_dict(), to_imagenet_resnet), src.channels[3])
    ckpt = {"module.normalizer.new_mean": torch.zeros(3, 1, 1), "module.normalizer.new_std": torch.ones(3, 1, 1)}
    for k, v in plain.items():
        ckpt["module.model." + k] = v
        ckpt["module.attacker.model." + k] = v
    path = tmp_path / "imagenet_linf_4.pt"
    torch.save({"model": ckpt, "epoch": 90}, path)
    dst = ResNet(50, False, width=0.25)
    assert load_backbone_weights(dst, str(path)) == "robust_resnet"
    assert_same(src, dst)


def test_timm_convnext_cvst_format():
    src = randomized(convnext_cvst("convnext_t_cvst"))
    ckpt = {}
    for k, v in src.state_dict().items():
        if k.startswith("out_norms."):
            continue  # new layers of the segmentation model, absent from ImageNet weights
        ckpt["module.base_model." + re.sub(r"^stem\.", "stem.stem.", k)] = v
    ckpt.update({"module.base_model.head.norm.weight": torch.ones(768), "module.base_model.head.fc.weight":
                 torch.ones(1000, 768), "module.base_model.head.fc.bias": torch.ones(1000)})
    assert "module.base_model.stages.3.blocks.2.mlp.fc1.weight" in ckpt
    assert "module.base_model.stages.1.downsample.1.weight" in ckpt
    dst = convnext_cvst("convnext_t_cvst")
    fresh_norm = dst.out_norms[2].weight.clone()
    assert load_backbone_weights(dst, "convnext_t_cvst.pt", state=ckpt) == "timm_convnext_cvst"
    sd, ref = dst.state_dict(), src.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith("out_norms."))
    assert torch.equal(dst.out_norms[2].weight, fresh_norm)


def test_backbone_wrong_architecture(tmp_path):
    src = ResNet(18, True, width=0.25)
    path = tmp_path / "r18.pth"
    torch.save(with_fc(rename_keys(src.state_dict(), to_imagenet_resnet), src.channels[3]), path)
    with pytest.raises(SetupError) as e:
        load_backbone_weights(ResNet(50, True, width=0.25), str(path))
    assert "missing keys" in str(e.value) and "layer1.0.conv3.weight" in str(e.value)
    bad = {"conv1.weight": torch.zeros(3), "something.else": torch.zeros(1)}
    with pytest.raises(SetupError):
        load_backbone_weights(ResNet(18, True, width=0.25), "x.pth", state=bad)


# ------------------------------------------------------------------ sliding-window inference

def toy_forward():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    return lambda x: conv(x) * 3.0


def slow_slide(forward, x, crop, stride, pad_value):
    """Plain reference: pad, visit each window in Python, average the softmax, crop back."""
    b, c, h, w = x.shape
    ch, cw = crop
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    canvas = torch.empty(b, c, h + ph, w + pw)
    for i in range(c):
        canvas[:, i] = pad_value[i]
    canvas[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w] = x
    H, W = canvas.shape[-2:]
    rows = list(range(0, H - ch + 1, stride[0]))
    cols = list(range(0, W - cw + 1, stride[1]))
    if rows[-1] != H - ch:
        rows.append(H - ch)
    if cols[-1] != W - cw:
        cols.append(W - cw)
    acc = torch.zeros(b, 4, H, W)
    cnt = torch.zeros(H, W)
    for i in rows:
        for j in cols:
            acc[:, :, i:i + ch, j:j + cw] += F.softmax(forward(canvas[:, :, i:i + ch, j:j + cw]), 1)
            cnt[i:i + ch, j:j + cw] += 1
    return torch.log(acc / cnt)[:, :, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


def test_slide_single_window_equals_whole_image():
    f = toy_forward()
    x = torch.rand(2, 3, 17, 23)
    with torch.no_grad():
        out = slide_inference(f, x, crop=(17, 23), stride=(11, 15))
        assert torch.allclose(out, F.log_softmax(f(x), 1), atol=1e-5)


def test_slide_pads_small_image():
    f = toy_forward()
    x = torch.rand(1, 3, 9, 12)
    pad = (0.485, 0.456, 0.406)
    with torch.no_grad():
        out = slide_inference(f, x, crop=(15, 15), stride=(10, 10), pad_value=pad)
        ref = slow_slide(f, x, (15, 15), (10, 10), pad)
        assert out.shape == (1, 4, 9, 12)
        assert torch.allclose(out, ref, atol=1e-5)
        # the padding is really there: differs from running on the bare image
        assert not torch.allclose(out, F.log_softmax(f(x), 1), atol=1e-3)


@pytest.mark.parametrize("size, crop, stride", [((30, 41), (13, 17), (8, 11)), ((20, 9), (12, 12), (5, 5))])
def test_slide_multi_window_matches_plain_loop(size, crop, stride):
    f = toy_forward()
    x = torch.rand(2, 3, *size)
    pad = (0.485, 0.456, 0.406)
    with torch.no_grad():
        out = slide_inference(f, x, crop=crop, stride=stride, pad_value=pad)
        ref = slow_slide(f, x, crop, stride, pad)
    assert out.shape == (2, 4) + size
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, *size), atol=1e-5)


def test_window_stride_is_semsegs_ceil_of_two_thirds():
    """The default stride is ceil(2 crop / 3) exactly (ddcat.md §5: 300 for 449, 316 for 473), also at
    crops divisible by 3, where a float rate 0.6667 gave one more (343 for 513)."""
    from fractions import Fraction
    from engine.protocols import build_protocol
    assert (window_stride(513), window_stride(449), window_stride(473), window_stride(3), window_stride(1)) == \
        (342, 300, 316, 2, 1)
    for c in range(1, 3000):
        assert window_stride(c) == math.ceil(Fraction(2 * c, 3)), c
    assert window_stride(100, 0.5) == 50 and window_stride(101, 0.5) == 51 and window_stride(3, 0.1) == 1
    cfg = load_config(os.path.join(ROOT, "config", "_base_", "default.yaml"), ["test.crop_size=[513, 449]"])
    assert build_protocol(cfg, toy_forward()).forward.keywords["stride"] == [342, 300]


def test_slide_is_differentiable():
    f = toy_forward()
    x = torch.rand(1, 3, 20, 20, requires_grad=True)
    g, = torch.autograd.grad(slide_inference(f, x, (12, 12), (6, 6)).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
