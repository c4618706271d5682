"""DRN / DRNSeg / multitask DRN / Taskonomy ResNet / FPD-Seg models, their converters and configs."""
import os

import pytest
import torch

from models import build_model
from models.backbones.drn import DRN
from models.drn_seg import DRNMultitask, DRNSeg, bilinear_upsampler
from models.fpd_seg import FPDSeg, nonlocal_term
from models.taskonomy import TaskonomyResNet
from models.weight_formats_mtl import load_drn_imagenet
from models.weights import load_model_weights
from utils.config import ROOT, load_config
from utils.errors import SetupError

torch.set_num_threads(1)
CITY_MEAN, CITY_STD = [0.29010, 0.32808, 0.28696], [0.18295, 0.18657, 0.18448]
MT_CH = {"segmentsemantic": 19, "depth_zbuffer": 1, "autoencoder": 3}
TK_CH = {"segmentsemantic": 18, "depth_zbuffer": 1}


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def randomize(model, seed=0):
    """Fill every float tensor of the state dict with random values (so a load is visible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    return model


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def small_fpd(**kw):
    args = dict(classes=5, layers=18, width=0.25, fpn_width=16, dropout=0.0)
    args.update(kw)
    return FPDSeg(**args)


# ---------------------------------------------------------------- parameter counts (published sizes)

@pytest.mark.parametrize("arch,count", [("drn_c_26", 20628195), ("drn_d_22", 15895363),
                                        ("drn_d_38", 26003523), ("drn_d_105", 54302915)])
def test_drnseg_parameter_count(arch, count):
    assert nparams(DRNSeg(arch, 19)) == count


@pytest.mark.parametrize("tasks,count", [(["segmentsemantic"], 15895363),
                                         (["segmentsemantic", "depth_zbuffer"], 15896132),
                                         (["segmentsemantic", "depth_zbuffer", "autoencoder"], 15898439)])
def test_multitask_parameter_count(tasks, count):
    assert nparams(DRNMultitask("drn_d_22", tasks, MT_CH, "layer8")) == count


@pytest.mark.parametrize("layers,tasks,count", [(18, ["segmentsemantic"], 12686226),
                                                (18, ["segmentsemantic", "depth_zbuffer"], 14191027),
                                                (50, ["segmentsemantic"], 26590610),
                                                (50, ["segmentsemantic", "depth_zbuffer"], 29668275)])
def test_taskonomy_parameter_count(layers, tasks, count):
    assert nparams(TaskonomyResNet(layers, tasks, TK_CH, {})) == count


def test_separate_decoders_add_one_layer6_8_copy_per_extra_task():
    shared = DRNMultitask("drn_d_22", list(MT_CH), MT_CH, "layer8")
    sep = DRNMultitask("drn_d_22", list(MT_CH), MT_CH, "layer5")
    trunk = sum(nparams(getattr(shared.backbone, s)) for s in ("layer6", "layer7", "layer8"))
    assert nparams(sep) == nparams(shared) + 2 * trunk


# ---------------------------------------------------------------- DRN structure

def test_drn_module_names_follow_published_layout():
    assert DRN("drn_c_26").stage_names == ["conv1", "bn1", "relu"] + [f"layer{i}" for i in range(1, 9)]
    assert DRN("drn_d_22").stage_names == [f"layer{i}" for i in range(0, 9)]
    assert DRN("drn_a_50").stage_names == ["conv1", "bn1", "relu", "maxpool"] + [f"layer{i}" for i in range(1, 5)]
    d = DRN("drn_d_22")
    assert d.layer3[0].conv1.stride == (2, 2) and d.layer5[0].conv1.stride == (1, 1)
    assert d.layer5[0].conv1.dilation == (2, 2) and d.layer6[1].conv2.dilation == (4, 4)
    assert d.layer7[0].dilation == (2, 2) and d.layer8[0].dilation == (1, 1)
    assert d.layer5[0].downsample is not None  # 128 -> 256 projection
    assert "layer2.0.weight" in d.state_dict() and "layer8.1.running_var" in d.state_dict()


@pytest.mark.parametrize("arch", ["drn_c_26", "drn_d_22", "drn_a_50"])
def test_drn_output_stride_8(arch):
    d = DRN(arch).eval()
    with torch.no_grad():
        y = d(torch.randn(1, 3, 64, 48))
    assert y.shape == (1, d.out_dim, 8, 6)


def test_drn_c_58_layer7_has_no_skip():
    d = DRN("drn_c_58").eval()
    assert d.layer7[0].downsample is not None  # present in published checkpoints, never used
    x = torch.randn(1, 2048, 4, 4)
    with torch.no_grad():
        a = d.layer7(x)
        d.layer7[0].downsample[0].weight.mul_(3.0)
        b = d.layer7(x)
    assert torch.equal(a, b)


def test_bilinear_upsampler_kernel_and_frozen():
    up = bilinear_upsampler(2)
    r = torch.tensor([1 - abs(i / 8 - 0.9375) for i in range(16)])
    assert torch.allclose(r[[0, 7, 8, 15]], torch.tensor([0.0625, 0.9375, 0.9375, 0.0625]))
    assert torch.allclose(up.weight[1, 0], r[:, None] * r[None, :])
    assert not up.weight.requires_grad
    # a constant map stays constant away from the border (bilinear interpolation)
    y = up(torch.ones(1, 2, 4, 4))
    assert y.shape == (1, 2, 32, 32) and torch.allclose(y[..., 8:24, 8:24], torch.ones(1, 2, 16, 16))


# ---------------------------------------------------------------- forward / backward / contracts

@pytest.mark.parametrize("size", [(64, 64), (33, 41)])
def test_drnseg_forward_backward(size):
    m = DRNSeg("drn_d_22", 4, CITY_MEAN, CITY_STD)
    x = torch.rand(2, 3, *size)
    out = m(x)
    assert isinstance(out, dict) and out["out"].shape == (2, 4, *size)
    out["out"].logsumexp(1).mean().backward()
    assert m.backbone.layer0[0].weight.grad is not None and m.seg.weight.grad is not None
    assert m.up.weight.grad is None
    m.eval()
    with torch.no_grad():
        y = m(x)
    assert torch.is_tensor(y) and y.shape == (2, 4, *size)


def test_drnseg_no_crop_for_multiples_of_8():
    m = DRNSeg("drn_d_22", 3).eval()
    with torch.no_grad():
        raw = m.up(m.seg(m.backbone(torch.rand(1, 3, 64, 40))))
    assert raw.shape[-2:] == (64, 40)


def test_normalisation_inside():
    a = DRNSeg("drn_d_22", 3, CITY_MEAN, CITY_STD).eval()
    b = DRNSeg("drn_d_22", 3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 32, 32)
    xn = (x - torch.tensor(CITY_MEAN).view(1, 3, 1, 1)) / torch.tensor(CITY_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(a(x), b(xn), atol=1e-5)


def test_multitask_seg_only_equals_drnseg():
    seg = DRNSeg("drn_d_22", 5).eval()
    mt = DRNMultitask("drn_d_22", ["segmentsemantic"], {"segmentsemantic": 5}, "layer8").eval()
    sd = {k.replace("seg.", "heads.segmentsemantic.conv.").replace("up.", "heads.segmentsemantic.up."): v
          for k, v in seg.state_dict().items()}
    mt.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 32, 24)
    with torch.no_grad():
        assert torch.allclose(mt(x)["segmentsemantic"], seg(x), atol=1e-5)


@pytest.mark.parametrize("shared_until", ["layer8", "layer5"])
def test_multitask_outputs_and_sharing(shared_until):
    m = DRNMultitask("drn_d_22", list(MT_CH), MT_CH, shared_until, CITY_MEAN, CITY_STD)
    x = torch.rand(1, 3, 33, 40)
    out = m(x)  # training mode
    assert list(out) == list(MT_CH)
    for t, c in MT_CH.items():
        assert out[t].shape == (1, c, 33, 40)
    sum(o.mean() for o in out.values()).backward()
    m.eval()
    with torch.no_grad():
        before = m(x)
        assert list(before) == list(MT_CH)
        # perturb the depth task's layer6: the segmentation output changes only when layer6 is shared
        layer6 = m.backbone.layer6 if shared_until == "layer8" else m.decoders["depth_zbuffer"].layer6
        layer6[0].conv1.weight.mul_(2.0)
        after = m(x)
    assert not torch.allclose(before["depth_zbuffer"], after["depth_zbuffer"])
    assert torch.allclose(before["segmentsemantic"], after["segmentsemantic"]) == (shared_until == "layer5")


def test_taskonomy_outputs():
    m = TaskonomyResNet(18, ["segmentsemantic", "depth_zbuffer", "class_places"], TK_CH, {"class_places": 63},
                        [0.5] * 3, [0.5] * 3)
    x = torch.rand(2, 3, 64, 40)
    out = m(x)
    assert out["segmentsemantic"].shape == (2, 18, 64, 40) and out["depth_zbuffer"].shape == (2, 1, 64, 40)
    assert out["class_places"].shape == (2, 63)
    sum(o.mean() for o in out.values()).backward()
    assert m.decoders["segmentsemantic"].upconv0.weight.grad is not None
    m.eval()
    with torch.no_grad():
        assert m.backbone(m.normalize(x))[3].shape == (2, 512, 2, 2)  # output stride 32
        y = m(torch.rand(1, 3, 33, 47))
    assert y["segmentsemantic"].shape == (1, 18, 33, 47)


def test_taskonomy_width_scales_encoder_and_decoders():
    path = os.path.join(ROOT, "config", "_base_", "models", "taskonomy_resnet18.yaml")
    m = build_model(load_config(path, ["data.classes=17", "model.width=0.25"]))
    assert m.backbone.channels[3] == 128 and m.decoders["segmentsemantic"].upconv0.in_channels == 128
    assert m.decoders["segmentsemantic"].upconv0.out_channels == 64
    assert m.decoders["depth_zbuffer"].conv_decode4.in_channels == 8
    assert nparams(m) < 14191027 / 10  # the width-1 model of test_taskonomy_parameter_count
    m.eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, 32, 48))
    assert out["segmentsemantic"].shape == (1, 18, 32, 48) and out["depth_zbuffer"].shape == (1, 1, 32, 48)


def _all_outputs(m, x):
    out = m(x)
    return list(out.values()) if isinstance(out, dict) else [out]


@pytest.mark.parametrize("make", [
    lambda: DRNSeg("drn_c_26", 3, CITY_MEAN, CITY_STD),
    lambda: DRNMultitask("drn_d_22", list(MT_CH), MT_CH, "layer5"),
    lambda: TaskonomyResNet(18, ["segmentsemantic", "depth_zbuffer"], TK_CH, {}),
    lambda: small_fpd(denoise_normalize=True),
    lambda: small_fpd(),
], ids=["drnseg_c26", "multitask", "taskonomy", "fpd_normalized", "fpd"])
def test_channels_last_matches_default(make):
    torch.manual_seed(0)
    m = make().eval()
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        ref = _all_outputs(m, x)
        m = m.to(memory_format=torch.channels_last)
        got = _all_outputs(m, x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, got):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- FPD-Seg

def test_nonlocal_term_matches_brute_force():
    torch.manual_seed(0)
    f = torch.randn(2, 4, 3, 5)
    x = f.flatten(2)  # B,C,N
    n = x.shape[-1]
    # y_p = (1/N) sum_q <x_p, x_q> x_q, one position at a time
    brute = torch.stack([torch.stack([sum((x[b, :, p] @ x[b, :, q]) * x[b, :, q] for q in range(n)) / n
                                      for p in range(n)], -1) for b in range(2)])
    assert torch.allclose(nonlocal_term(f), brute.view_as(f), atol=1e-5)
    k = x / x.norm(dim=1, keepdim=True)
    brute_n = torch.stack([torch.stack([sum((k[b, :, p] @ k[b, :, q]) * x[b, :, q] for q in range(n)) / n
                                        for p in range(n)], -1) for b in range(2)])
    assert torch.allclose(nonlocal_term(f, normalize=True), brute_n.view_as(f), atol=1e-5)


def test_nonlocal_term_fp32_under_autocast():
    f = torch.randn(1, 8, 6, 6) * 30
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nonlocal_term(f)
    assert got.dtype == torch.float32
    assert torch.allclose(got, nonlocal_term(f), rtol=1e-6)


def test_fpd_outputs_and_backward():
    torch.manual_seed(0)
    m = small_fpd(logit_scale=2.0, denoise_normalize=True, dropout=0.5)
    x = torch.rand(2, 3, 33, 47)
    out = m(x)
    assert set(out) == {"out", "restored"}
    assert out["out"].shape == (2, 5, 33, 47) and out["restored"].shape == (2, 3, 33, 47)
    assert out["out"].abs().max() <= 2.0
    (out["out"].logsumexp(1).mean() + ((out["restored"] - x) ** 2).mean()).backward()
    for name in ("backbone.layer0.0.weight", "backbone.layer4.0.conv1.weight", "lateral2.weight",
                 "restore.0.weight", "cls.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert not any(isinstance(mod, torch.nn.ReLU) for mod in m.modules())  # ELU everywhere
    names = {id(p) for p in m.phase1_parameters()}
    assert id(m.cls.weight) not in names and id(m.lateral5.weight) in names
    m.eval()
    with torch.no_grad():
        y = m(x)
        assert torch.is_tensor(y) and y.shape == (2, 5, 33, 47)
        assert torch.equal(m.outputs(x)["out"], y)


def test_fpd_restored_in_pixel_space():
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    # bounded denoise: the published one overflows to NaN in eval mode at initialisation (mtl_fpd.md §B1)
    a = small_fpd(mean=mean, std=std, denoise_normalize=True).eval()
    b = small_fpd(denoise_normalize=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 32, 32)
    mt, st = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ra, rb = a.outputs(x), b.outputs((x - mt) / st)
    assert torch.allclose(ra["restored"], rb["restored"] * st + mt, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ra["out"], rb["out"], atol=1e-4)


def test_fpd_middle_denoise_switch():
    a = small_fpd(middle_denoise=True, denoise_normalize=True).eval()
    b = small_fpd(middle_denoise=False, denoise_normalize=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.outputs(x)["restored"], b.outputs(x)["restored"])
        assert not torch.allclose(a(x), b(x))


# ---------------------------------------------------------------- published checkpoint formats

D_NAMES = [f"layer{i}" for i in range(9)]
C_NAMES = ["conv1", "bn1", "relu"] + [f"layer{i}" for i in range(1, 9)]


def _rename(state, mapping):
    """Apply (our_prefix -> published_prefix) pairs; the first matching prefix wins."""
    out = {}
    for k, v in state.items():
        for ours, theirs in mapping:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        out[k] = v.clone()
    return out


def _save(tmp_path, state, name="ckpt.pth", wrap=True):
    path = os.path.join(tmp_path, name)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}} if wrap else state, path)
    return path


@pytest.mark.parametrize("arch,names", [("drn_d_22", D_NAMES), ("drn_c_26", C_NAMES)])
def test_load_mtrobust_drnseg(tmp_path, arch, names):
    src = randomize(DRNSeg(arch, 19))
    published = _rename(src.state_dict(), [(f"backbone.{n}.", f"base.{i}.") for i, n in enumerate(names)])
    first_block = "base.1.0.weight" if arch.startswith("drn_d") else "base.3.0.conv1.weight"
    assert "seg.weight" in published and "up.weight" in published and first_block in published
    dst = DRNSeg(arch, 19)
    assert load_model_weights(dst, _save(tmp_path, published)) == "mtrobust_drnseg"
    assert same_state(src, dst)


def test_wrong_architecture_lists_keys(tmp_path):
    src = DRNSeg("drn_d_22", 19)
    published = _rename(src.state_dict(), [(f"backbone.{n}.", f"base.{i}.") for i, n in enumerate(D_NAMES)])
    with pytest.raises(SetupError, match=r"missing keys: .*backbone\.layer3\.2\."):
        load_model_weights(DRNSeg("drn_d_38", 19), _save(tmp_path, published))
    with pytest.raises(SetupError, match="shape mismatches"):
        load_model_weights(DRNSeg("drn_d_22", 7), _save(tmp_path, published, "b.pth"), fmt="mtrobust_drnseg")


def _mtrobust_multitask_state(model, separate):
    """Published DRNSegDepth state dict: encoder.<i>, task_to_decoder.<task>.<0..4> (layer6..8 repeated)."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        for i, n in enumerate(D_NAMES[:6]):
            if k.startswith(f"backbone.{n}."):
                out[f"encoder.{i}." + k[len(f"backbone.{n}."):]] = v.clone()
    for t in model.tasks:
        for j, s in enumerate(("layer6", "layer7", "layer8")):
            src = f"decoders.{t}.{s}." if separate else f"backbone.{s}."
            out.update({f"task_to_decoder.{t}.{j}." + k[len(src):]: v.clone() for k, v in sd.items()
                        if k.startswith(src)})
        for j, part in ((3, "conv"), (4, "up")):
            src = f"heads.{t}.{part}."
            out.update({f"task_to_decoder.{t}.{j}." + k[len(src):]: v.clone() for k, v in sd.items()
                        if k.startswith(src)})
    return out


def test_load_mtrobust_multitask_shared(tmp_path):
    tasks = ["segmentsemantic", "depth_zbuffer", "autoencoder"]
    src = randomize(DRNMultitask("drn_d_22", tasks, MT_CH, "layer8"))
    published = _mtrobust_multitask_state(src, separate=False)
    assert "task_to_decoder.autoencoder.0.0.conv1.weight" in published and "encoder.5.0.conv1.weight" in published
    dst = DRNMultitask("drn_d_22", tasks, MT_CH, "layer8")
    assert load_model_weights(dst, _save(tmp_path, published)) == "mtrobust_multitask"
    assert same_state(src, dst)
    # a checkpoint with a different task list fails strictly, naming the keys
    with pytest.raises(SetupError, match="unexpected keys: .*task_to_decoder|heads.autoencoder"):
        load_model_weights(DRNMultitask("drn_d_22", tasks[:2], MT_CH, "layer8"), _save(tmp_path, published, "c.pth"),
                           fmt="mtrobust_multitask")


def test_load_mtrobust_multitask_separate(tmp_path):
    tasks = ["segmentsemantic", "depth_zbuffer"]
    src = randomize(DRNMultitask("drn_d_22", tasks, MT_CH, "layer5"), seed=3)
    published = _mtrobust_multitask_state(src, separate=True)
    dst = DRNMultitask("drn_d_22", tasks, MT_CH, "layer5")
    assert load_model_weights(dst, _save(tmp_path, published)) == "mtrobust_multitask"
    assert same_state(src, dst)
    with pytest.raises(SetupError, match="shared_until"):
        load_model_weights(DRNMultitask("drn_d_22", tasks, MT_CH, "layer8"), _save(tmp_path, published, "d.pth"),
                           fmt="mtrobust_multitask")


def test_load_taskonomy(tmp_path):
    tasks = ["segmentsemantic", "depth_zbuffer"]
    src = randomize(TaskonomyResNet(18, tasks, TK_CH, {}))
    published = _rename(src.state_dict(), [("backbone.layer0.0.", "encoder.conv1."),
                                           ("backbone.layer0.1.", "encoder.bn1."),
                                           ("backbone.", "encoder."), ("decoders.", "task_to_decoder.")])
    assert "encoder.conv1.weight" in published and "task_to_decoder.depth_zbuffer.conv_decode4.bias" in published
    dst = TaskonomyResNet(18, tasks, TK_CH, {})
    assert load_model_weights(dst, _save(tmp_path, published)) == "taskonomy_resnet"
    assert same_state(src, dst)
    with pytest.raises(SetupError, match="missing keys"):
        load_model_weights(TaskonomyResNet(18, tasks + ["normal"], {**TK_CH, "normal": 3}, {}),
                           _save(tmp_path, published, "e.pth"))


@pytest.mark.parametrize("shared_until", ["layer8", "layer5"])
def test_load_drn_imagenet(tmp_path, shared_until):
    trunk = randomize(DRN("drn_d_22"), seed=5)
    published = dict(trunk.state_dict())
    published["fc.weight"] = torch.randn(1000, 512, 1, 1)
    published["fc.bias"] = torch.randn(1000)
    path = _save(tmp_path, published, wrap=False)
    seg = DRNSeg("drn_d_22", 19)
    load_drn_imagenet(seg, path)
    assert same_state(trunk, seg.backbone)
    mt = DRNMultitask("drn_d_22", ["segmentsemantic", "depth_zbuffer"], MT_CH, shared_until)
    load_drn_imagenet(mt, path)
    ref = trunk.state_dict()
    got = mt.state_dict()
    for k, v in ref.items():
        if k.split(".")[0] in ("layer6", "layer7", "layer8") and shared_until == "layer5":
            assert all(torch.equal(got[f"decoders.{t}.{k}"], v) for t in mt.tasks)
        else:
            assert torch.equal(got[f"backbone.{k}"], v)
    # any other unexpected key is refused (only fc.* is dropped)
    published["extra.weight"] = torch.zeros(1)
    with pytest.raises(SetupError, match="extra.weight"):
        load_drn_imagenet(seg, _save(tmp_path, published, "f.pth", wrap=False))


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("name,cls", [("drn_d_22_seg", DRNSeg), ("drn_d_22_multitask", DRNMultitask),
                                      ("taskonomy_resnet18", TaskonomyResNet),
                                      ("taskonomy_resnet50", TaskonomyResNet), ("fpd_seg", FPDSeg)])
def test_config_fragments_build(name, cls):
    path = os.path.join(ROOT, "config", "_base_", "models", f"{name}.yaml")
    overrides = ["data.classes=19", "model.layers=18", "model.width=0.25"] if name == "fpd_seg" else ["data.classes=19"]
    model = build_model(load_config(path, overrides))
    assert type(model) is cls
    if name == "drn_d_22_multitask":
        assert model.tasks == ["segmentsemantic", "depth_zbuffer", "autoencoder"] and model.shared_until == "layer8"
        assert nparams(model) == 15898439
    if name == "taskonomy_resnet18":
        assert nparams(model) == 14191027


@pytest.mark.parametrize("override,match", [("model.arch=drn_d_23", "model.arch"),
                                            ("model.shared_until=layer6", "model.shared_until"),
                                            ("model.tasks=[segmentsemantic,normals]", "model.tasks")])
def test_config_errors(override, match):
    path = os.path.join(ROOT, "config", "_base_", "models", "drn_d_22_multitask.yaml")
    with pytest.raises(SetupError, match=match):
        build_model(load_config(path, [override]))
