"""Segmenter-ViT-S: published size, a plain re-implementation on the released key names, released and
robust-backbone weight formats, padding and position-embedding resizing, recipe, SEA through the launcher."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import data_fixtures as fx
from models import build_model, load_pretrained
from models.backbones.vit import VisionTransformer, resize_pos_embed
from models.segmenter import LinearDecoder, MaskTransformer, Segmenter
from models.weight_formats import load_backbone_weights
from models.weights import load_model_weights
from utils.config import ROOT, load_config
from utils.errors import SetupError
from utils.logger import NAME

FRAGMENT = os.path.join(ROOT, "config", "_base_", "models", "segmenter_vit_s.yaml")
PIRAT = os.path.join(ROOT, "config", "ade20k", "ade20k_segmenter_pirat.yaml")
TINY = dict(img_size=64, patch_size=16, dim=32, depth=2, heads=2, decoder_layers=2)


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------ sizes, counted from the architecture

def block_count(dim: int, hidden: int) -> int:
    """One pre-norm block: 2 LayerNorms, qkv and proj with bias, fc1 and fc2 with bias."""
    return 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)


def vit_count(dim: int, depth: int, hidden: int, patch: int, tokens: int, head_classes: int = 1000) -> int:
    """timm's VisionTransformer written out: conv patch stem, cls token, position embedding, blocks,
    final LayerNorm, classifier."""
    head = dim * head_classes + head_classes if head_classes else 0
    return (3 * patch * patch * dim + dim) + dim + tokens * dim + depth * block_count(dim, hidden) + 2 * dim + head


def mask_transformer_count(classes: int, d_enc: int, dim: int, layers: int, hidden: int) -> int:
    """cls_emb, proj_dec, blocks, proj_patch, proj_classes, decoder_norm, mask_norm (LayerNorm over classes)."""
    return (classes * dim + (d_enc * dim + dim) + layers * block_count(dim, hidden) + 2 * dim * dim + 2 * dim
            + 2 * classes)


def test_count_formula_is_timm_vit_s16():
    # timm vit_small_patch16_224: 22,050,664 parameters, 21,665,664 without the 1000-class head
    assert vit_count(384, 12, 1536, 16, 197) == 22_050_664
    assert vit_count(384, 12, 1536, 16, 197, head_classes=0) == 21_665_664


def test_fragment_has_the_published_parameter_count(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"_base_: {FRAGMENT}\ndata:\n  classes: 151\n")
    with torch.device("meta"):
        m = build_model(load_config(str(exp)))
    expected = vit_count(384, 12, 1536, 16, 1 + 32 * 32) + mask_transformer_count(151, 384, 384, 2, 1536)
    assert nparams(m) == expected == 26_419_350  # 26,034,350 without the unused ImageNet head
    assert nparams(m) - nparams(m.backbone.head) == 26_034_350
    assert not any(p.requires_grad for p in m.backbone.head.parameters())
    assert m.normalized is False and isinstance(m.decode_head, MaskTransformer)


@pytest.mark.parametrize("dim, depth, heads, img, classes, layers", [(64, 3, 4, 128, 7, 1), (48, 2, 3, 96, 19, 3)])
def test_other_sizes_match_the_formula(dim, depth, heads, img, classes, layers):
    with torch.device("meta"):
        m = Segmenter(classes, img, 16, dim, depth, heads, decoder_layers=layers)
        lin = Segmenter(classes, img, 16, dim, depth, heads, decoder="linear")
    vit = vit_count(dim, depth, 4 * dim, 16, 1 + (img // 16) ** 2)
    assert nparams(m) == vit + mask_transformer_count(classes, dim, dim, layers, 4 * dim)
    assert isinstance(lin.decode_head, LinearDecoder) and nparams(lin) == vit + dim * classes + classes


def test_drop_path_and_dropout_as_published():
    m = Segmenter(5, **TINY, drop_path=0.1)
    enc = Segmenter(5, img_size=64, dim=32, depth=12, heads=2)
    assert [b.drop_path.p for b in enc.backbone.blocks] == pytest.approx([0.1 * i / 11 for i in range(12)])
    assert all(b.attn.dropout == 0.0 and b.mlp.drop.p == 0.0 for b in m.backbone.blocks)
    assert all(b.drop_path.p == 0.0 and b.attn.dropout == 0.1 and b.mlp.drop.p == 0.1 for b in m.decode_head.blocks)


# ------------------------------------------------------------------ a plain re-implementation on released keys

def randomized(m: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn_like(t) / math.sqrt(t[0].numel()) if t.ndim > 1 else torch.rand_like(t) + 0.5)
    return m


def released(model: Segmenter) -> dict:
    """The state dict of the released SegMenter (``model.module.state_dict()``) for our model."""
    return {re.sub(r"^decode_head\.", "decoder.", re.sub(r"^backbone\.", "encoder.", k)): v.clone()
            for k, v in model.state_dict().items()}


def plain_segmenter(s: dict, x: torch.Tensor, heads: int, patch: int = 16) -> torch.Tensor:
    """Segmenter's forward from the released state dict, step by step, loops over images and heads."""
    def ln(z, p):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * s[p + ".weight"] + s[p + ".bias"]

    def lin(z, p):
        return z @ s[p + ".weight"].t() + s[p + ".bias"]

    def block(z, p):
        n, d = z.shape
        qkv = lin(ln(z, p + ".norm1"), p + ".attn.qkv")
        dh = d // heads
        out = []
        for h in range(heads):
            q, k, v = (qkv[:, i * d + h * dh:i * d + (h + 1) * dh] for i in range(3))
            a = torch.exp(q @ k.t() / math.sqrt(dh))
            out.append((a / a.sum(-1, keepdim=True)) @ v)
        z = z + lin(torch.cat(out, -1), p + ".attn.proj")
        hid = lin(ln(z, p + ".norm2"), p + ".mlp.fc1")
        return z + lin(0.5 * hid * (1 + torch.erf(hid / math.sqrt(2))), p + ".mlp.fc2")

    h, w = x.shape[-2:]
    H, W = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    outs = []
    for img in x:
        canvas = torch.zeros(3, H, W)
        canvas[:, :h, :w] = img
        gh, gw = H // patch, W // patch
        cells = canvas.reshape(3, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, -1)
        tok = cells @ s["encoder.patch_embed.proj.weight"].reshape(s["encoder.patch_embed.proj.weight"].shape[0], -1).t() \
            + s["encoder.patch_embed.proj.bias"]
        pos = s["encoder.pos_embed"][0]
        g0 = math.isqrt(pos.shape[0] - 1)
        grid = F.interpolate(pos[1:].t().reshape(1, -1, g0, g0), size=(gh, gw), mode="bilinear", align_corners=False)
        z = torch.cat([s["encoder.cls_token"][0] + pos[:1], tok + grid[0].reshape(-1, gh * gw).t()])
        i = 0
        while f"encoder.blocks.{i}.norm1.weight" in s:
            z = block(z, f"encoder.blocks.{i}")
            i += 1
        z = ln(z, "encoder.norm")[1:]
        c = s["decoder.cls_emb"].shape[1]
        z = torch.cat([lin(z, "decoder.proj_dec"), s["decoder.cls_emb"][0]])
        i = 0
        while f"decoder.blocks.{i}.norm1.weight" in s:
            z = block(z, f"decoder.blocks.{i}")
            i += 1
        z = ln(z, "decoder.decoder_norm")
        pt, ct = z[:-c] @ s["decoder.proj_patch"], z[-c:] @ s["decoder.proj_classes"]
        pt, ct = pt / pt.norm(dim=-1, keepdim=True), ct / ct.norm(dim=-1, keepdim=True)
        masks = ln(pt @ ct.t(), "decoder.mask_norm").t().reshape(1, c, gh, gw)
        outs.append(F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)[0, :, :h, :w])
    return torch.stack(outs)


@pytest.mark.parametrize("size", [(64, 64), (37, 45), (17, 80)])
def test_equals_plain_reimplementation_on_released_keys(size):
    """Padding to 16 and cropping back, the position grid resized at run time (4x4 built; 3x3, 2x5 used)."""
    m = randomized(Segmenter(5, **TINY)).eval()
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    s = released(m)
    with torch.no_grad():
        y = m(x)
        ref = plain_segmenter(s, x, heads=2)
        s["decoder.proj_patch"] = s["decoder.proj_patch"] + 0.1 * torch.randn_like(s["decoder.proj_patch"])
        other = plain_segmenter(s, x, heads=2)
    assert (other - ref).abs().max() > 1e-2  # the comparison sees a changed weight
    assert y.shape == (2, 5) + size
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()


def test_zero_padding_then_crop():
    m = randomized(Segmenter(5, **TINY)).eval()
    x = torch.rand(1, 3, 37, 45)
    padded = F.pad(x, (0, 3, 0, 11))
    with torch.no_grad():
        y, yp = m(x), m(padded)
        shifted = m(F.pad(x, (3, 0, 11, 0)))[:, :, 11:, 3:]
    assert not torch.allclose(y, shifted, atol=1e-3)  # where the padding goes matters
    assert torch.allclose(y, yp[:, :, :37, :45], atol=1e-6)


# ------------------------------------------------------------------ position-embedding resizing

def test_pos_embed_resize_by_hand():
    """2x2 -> 4x4 bilinear (align_corners False): rows/cols weights [1,0], [.75,.25], [.25,.75], [0,1]."""
    g = torch.randn(2, 2, 3)
    cls = torch.randn(1, 3)
    pos = torch.cat([cls, g.reshape(4, 3)])[None]
    out = resize_pos_embed(pos, (2, 2), (4, 4))
    a = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    ref = torch.einsum("ik,jl,klc->ijc", a, a, g).reshape(16, 3)
    assert out.shape == (1, 17, 3) and torch.equal(out[0, 0], cls[0])
    assert torch.allclose(out[0, 1:], ref, atol=1e-6)
    assert resize_pos_embed(pos, (2, 2), (2, 2)) is pos


# ------------------------------------------------------------------ weight formats

@contextlib.contextmanager
def project_log():
    """The lines logged on the project's logger; caplog misses them once an entry point ran in this
    process (utils/logger.setup_logger stops propagation to the root logger)."""
    lines: list = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger(NAME)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_released_checkpoint_loads_strictly_and_computes_the_same(tmp_path):
    src = randomized(Segmenter(7, **TINY)).eval()
    path = tmp_path / "segmenter_released.pth"
    torch.save(released(src), path)  # a bare state dict, as the released file
    dst = Segmenter(7, **TINY).eval()
    x = torch.rand(2, 3, 40, 33)
    with torch.no_grad():
        before = dst(x)
        assert not torch.allclose(before, src(x), atol=1e-3)
        assert load_model_weights(dst, str(path)) == "segmenter"
        assert torch.equal(dst(x), src(x))
    # a released file of another position grid (2x2, a 32 model) is resized on load and logged
    small = randomized(Segmenter(7, **dict(TINY, img_size=32)))
    with project_log() as lines:
        assert load_model_weights(dst, "small.pth", state=released(small)) == "segmenter"
    assert any("resized from a 2x2 to a 4x4 grid" in ln for ln in lines)
    assert torch.allclose(dst.backbone.pos_embed, resize_pos_embed(small.backbone.pos_embed, (2, 2), (4, 4)))


@pytest.mark.parametrize("rename, named", [
    (("decoder.mask_norm.weight", "decoder.mask_norm.gamma"), ["decode_head.mask_norm.weight", "decode_head.mask_norm.gamma"]),
    (("encoder.blocks.1.attn.qkv.bias", "encoder.blocks.1.attn.in_proj_bias"), ["backbone.blocks.1.attn.qkv.bias"]),
])
def test_released_checkpoint_with_a_renamed_key_is_refused(rename, named):
    s = released(Segmenter(7, **TINY))
    s[rename[1]] = s.pop(rename[0])
    dst = Segmenter(7, **TINY)
    with pytest.raises(SetupError) as e:
        load_model_weights(dst, "seg.pth", state=s, key="test.checkpoint")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("test.checkpoint: seg.pth") and "'segmenter'" in msg
    assert all(k in msg for k in named)


def robust_vit(src: VisionTransformer, head: bool = True) -> dict:
    """A robust ImageNet ViT file as Singh et al.'s "Revisiting Adversarial Training for ImageNet" code writes it."""
    ckpt = {"module.base_model.model." + k: v.clone() for k, v in src.state_dict().items() if head or not k.startswith("head.")}
    ckpt["module.base_model.normalize.mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    ckpt["module.base_model.normalize.std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ckpt


def test_robust_vit_backbone_loads_strictly_into_the_encoder(tmp_path):
    src = randomized(VisionTransformer(224, 16, 32, 2, 2))  # ImageNet size: 14x14 grid
    path = tmp_path / "vit_s_robust.pth"
    torch.save({"model": robust_vit(src)}, path)
    model = Segmenter(5, **dict(TINY, img_size=512))
    with project_log() as lines:
        load_pretrained(model, str(path), "model.pretrained")  # as training does
    assert any("resized from a 14x14 to a 32x32 grid" in ln for ln in lines)
    got, ref = model.backbone.state_dict(), src.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref if k != "pos_embed")  # ImageNet head included
    assert torch.allclose(got["pos_embed"], resize_pos_embed(ref["pos_embed"], (14, 14), (32, 32)))
    assert torch.equal(got["pos_embed"][0, 0], ref["pos_embed"][0, 0])
    # plain timm naming without the head: the head keeps its fresh value
    enc = VisionTransformer(224, 16, 32, 2, 2)
    fresh = enc.head.weight.clone()
    plain = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    assert load_backbone_weights(enc, "vit.pth", state=plain) == "timm_vit"
    assert torch.equal(enc.head.weight, fresh) and torch.equal(enc.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


def test_robust_vit_with_a_renamed_key_is_refused():
    ckpt = robust_vit(VisionTransformer(224, 16, 32, 2, 2))
    ckpt["module.base_model.model.blocks.0.mlp.fc3.weight"] = ckpt.pop("module.base_model.model.blocks.0.mlp.fc1.weight")
    with pytest.raises(SetupError) as e:
        load_backbone_weights(VisionTransformer(512, 16, 32, 2, 2), "vit.pth", state=ckpt, key="model.pretrained")
    msg = str(e.value)
    assert "\n" not in msg and "'timm_vit'" in msg and "blocks.0.mlp.fc1.weight" in msg and "blocks.0.mlp.fc3.weight" in msg


# ------------------------------------------------------------------ recipe and configs

def test_pirat_recipe_and_weight_decay_split():
    """SGD 0.9, lr 0.002, one lr; weight decay 0.01 on every tensor of >= 2 dims outside the LayerNorms
    (PIR-AT's rule: ndim >= 2 and no "norm" in the name), so biases and LayerNorms get none."""
    from engine.trainer import build_optimizer
    cfg = load_config(PIRAT, fx.TINY_MODELS["segmenter"])
    assert cfg.train.attack == {"name": "pgd", "eps": 4.0, "alpha": 2.55, "steps": 5, "random_start": False}
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.warmup_epochs, cfg.train.power) == (32, 112, 5.0, 0.9)
    assert (cfg.data.classes, cfg.data.reduce_zero_label, cfg.data.eval_transform, cfg.data.eval_crop,
            cfg.test.protocol) == (151, False, "sea", [512, 512], "sea")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and not opt.defaults["nesterov"]
    names = {id(p): n for n, p in model.named_parameters()}
    split = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert sorted(split) == sorted(names.values())
    assert {lr for lr, _ in split.values()} == {0.002}
    rule = {n: (0.01 if p.ndim >= 2 and "norm" not in n else 0.0) for n, p in model.named_parameters()}
    assert {n: wd for n, (_, wd) in split.items()} == rule
    assert rule["backbone.pos_embed"] == rule["decode_head.cls_emb"] == rule["decode_head.proj_patch"] == 0.01


def test_normalised_variant_and_bad_decoder(tmp_path):
    cfg = load_config(PIRAT, [*fx.TINY_MODELS["segmenter"], "model.mean=[0.485,0.456,0.406]",
                              "model.std=[0.229,0.224,0.225]"])
    m = build_model(cfg).eval()
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(cfg.model.mean).view(1, 3, 1, 1), torch.tensor(cfg.model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(m(x), m.forward_features((x - mean) / std, x.shape[-2:])["out"], atol=1e-6)
    with pytest.raises(SetupError, match="model.vit.decoder"):
        load_config(PIRAT, ["model.vit.decoder=deeplab"])
    with pytest.raises(SetupError, match="img_size a multiple of patch_size"):
        build_model(load_config(PIRAT, [*fx.TINY_MODELS["segmenter"], "model.vit.img_size=100"]))


# ------------------------------------------------------------------ SEA through the launcher

def test_sea_evaluation_through_the_launcher(launches, tmp_path):
    """The PIR-AT launcher pair's tiny Segmenter, evaluated with a short SEA (3 APGD losses, worst case)."""
    from test_launchers import launch
    run = launches.run(PIRAT)
    assert run.train.returncode == 0, run.train.stdout[-3000:] + run.train.stderr[-3000:]
    out = tmp_path / "sea"
    (tmp_path / "cwd").mkdir()
    # its own exp_dir: the launcher pair test checks what the pair's exp_dir holds
    r = launch("tool_test/ade20k/segmenter_pirat.sh", *run.args, f"exp_dir={tmp_path / 'exp'}",
               f"test.checkpoint={run.exp / 'model' / 'last.pth'}", f"test.result_dir={out}", "test.batch_size=4",
               "test.eps=[4]", "test.attacks=[{name: sea, steps: 3}]", "test.plots=false", "test.save_images=false",
               "test.examples=0", cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == fx.SPLIT_SIZE and len(m["clean"]["iou_per_class"]) == 151
    members = {k for k in m["attacks"] if k.startswith("sea/")}
    assert members == {"sea/apgd-mask-ce-bal@4", "sea/apgd-mask-ce@4", "sea/apgd-js@4"}, sorted(m["attacks"])
    assert set(m["attacks"]) == members | {"sea@4"}
    for worst in (m["attacks"]["sea@4"], m["worst_case"]["4"]):  # never above any member
        assert worst["mIoU"] <= min(m["attacks"][k]["mIoU"] for k in members) + 1e-9
