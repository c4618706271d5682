"""Bring your own model: external modules and Hugging Face models behind the project's contract,
on the folder fixture; the Python entry (engine.api) and SEA as a plain function; the examples/ recipes."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.sea import sea
from datasets import build_dataset
from engine.api import evaluate_model
from engine.cli import main
from engine.common import group_collate
from engine.evaluator import balanced_class_weights, run_test
from engine.trainer import Trainer
from models import build_model
from models.external import ModelAdapter, adapt, hf_normalisation, logits_of
from models.weights import load_model_weights
from tests import data_fixtures as fx
from tests.conftest import ROOT
from tests.rounding import PIXEL_FRACTION
from utils.config import load_config
from utils.errors import SetupError
from utils.folder_lock import FolderLock
from utils.metrics import correct_pixels

EXAMPLES = os.path.join(ROOT, "examples")
VOLATILE = ("seconds", "env", "config")  # what two evaluations of the same numbers may differ in


def numbers(m):
    """metrics.json without timings, env and config path (recursively)."""
    if isinstance(m, dict):
        return {k: numbers(v) for k, v in m.items() if k not in VOLATILE}
    if isinstance(m, list):
        return [numbers(v) for v in m]
    return m


def folder_args(root, exp) -> list:
    """A folder-fixture experiment: 3 classes through a label map, one thread's worth of work."""
    return [f"data.root={root}", f"exp_dir={exp}", *fx.FOLDER_OVERRIDES, "data.workers=0", "data.crop_size=[33,33]",
            "test.plots=false", "test.save_images=false", "test.examples=0", "device=cpu"]


# ---------------------------------------------------------------- the adapter
class Half(nn.Module):
    """Logits at half the input size, in a chosen wrapping."""

    def __init__(self, wrap):
        super().__init__()
        self.conv, self.wrap = nn.Conv2d(3, 4, 3, stride=2, padding=1), wrap

    def forward(self, x):
        return self.wrap(self.conv(x))


@pytest.mark.parametrize("wrap", [lambda z: z, lambda z: {"out": z, "aux": z}, lambda z: {"logits": z},
                                  lambda z: SimpleNamespace(logits=z, loss=None), lambda z: (z, None)],
                         ids=["tensor", "mapping_out", "mapping_logits", "object_logits", "tuple"])
def test_adapter_normalises_unwraps_and_upsamples(wrap):
    torch.manual_seed(0)
    net = Half(wrap)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    model = adapt(net, 4, mean, std).eval()
    x = torch.rand(2, 3, 13, 10)
    raw = net.conv((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert raw.shape[-2:] == (7, 5)                            # smaller than the input: upsampled
    want = F.interpolate(raw, size=(13, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)
    model.train()
    assert set(model(x)) == {"out"}                           # training mode: the outputs dict
    assert [g["lr_mult"] for g in model.param_groups(10.0)] == [1.0]


def test_hf_normalisation_from_the_processor_config(tmp_path):
    own = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    assert hf_normalisation(str(tmp_path), *own) == own          # no preprocessor_config.json: the config's
    pre = tmp_path / "preprocessor_config.json"
    pre.write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_rescale": True,
                               "rescale_factor": 1 / 255}))
    assert hf_normalisation(str(tmp_path), *own) == ([0.5] * 3, [0.25] * 3)
    pre.write_text(json.dumps({"do_normalize": False}))
    assert hf_normalisation(str(tmp_path), *own) == (None, None)
    pre.write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3, "rescale_factor": 1.0}))
    with pytest.raises(SetupError, match="only 1/255"):
        hf_normalisation(str(tmp_path), *own)


def test_adapter_refuses_outputs_it_cannot_read():
    with pytest.raises(SetupError, match="output is a str"):
        logits_of("no", "model.entry x:y")
    with pytest.raises(SetupError, match="outputs 4 classes, data.classes is 5"):
        adapt(Half(lambda z: z), 5)
    with pytest.raises(SetupError, match=r"logits have shape \(2, 4, 7, 5, 1\)"):
        ModelAdapter(Half(lambda z: z[..., None]), 4)(torch.rand(2, 3, 13, 10))

    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("expected 4 channels\nmore")
    with pytest.raises(SetupError, match=r"a forward of a 1x3x64x64 image failed: RuntimeError: expected 4 channels$"):
        adapt(Fails(), 4)
    cfg = load_config(os.path.join(EXAMPLES, "my_model.yaml"), ["model.pretrained=initmodel/resnet50_v2.pth"])
    with pytest.raises(SetupError, match="model.pretrained is for the registry's backbones"):
        build_model(cfg)


# ---------------------------------------------------------------- Hugging Face model and entry point
@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_data")
    fx.make_folder(str(root))
    return root


def test_hf_model_through_test_py_and_the_same_model_as_an_entry_point(tmp_path, folder_data):
    """A random tiny SegFormer saved with save_pretrained, evaluated with SEA by test.py (model.name hf,
    examples/hf_segformer.yaml), then the same folder loaded by the entry point examples.hf_segformer:load."""
    pytest.importorskip("transformers")
    from examples.hf_segformer import save_tiny_segformer
    save_tiny_segformer(str(tmp_path / "segformer"), classes=3)
    common = [*folder_args(folder_data, tmp_path / "x"), "test.attacks=[{name: sea, steps: 4}]", "test.eps=[8]",
              "test.num_images=3", "test.batch_size=3"]
    runs = {"hf": ["model.name=hf", f"model.hf_path={tmp_path / 'segformer'}"],
            "entry": ["model.name=external", "model.entry=examples.hf_segformer:load",
                      f"model.kwargs={{path: {tmp_path / 'segformer'}}}"]}
    metrics = {}
    for name, model in runs.items():
        exp = tmp_path / f"exp_{name}"
        args = ["--config", os.path.join(EXAMPLES, "hf_segformer.yaml"), *common, f"exp_dir={exp}", *model]
        assert main("test", run_test, args) == 0
        metrics[name] = json.loads((exp / "result" / "metrics.json").read_text())
    m = metrics["hf"]
    assert m["checkpoint"] == str(tmp_path / "segformer" / "model.safetensors")  # its own weights
    assert m["class_names"] == ["road", "car", "bicycle"]
    members = [k for k in m["attacks"] if k.startswith("sea/")]
    assert len(members) == 3 and m["num_images"] == 3
    worst = m["attacks"]["sea@8"]
    assert worst["aAcc"] < m["clean"]["aAcc"]                  # the attack changed the numbers compared below
    for key in members:
        # (the worst case's aAcc is a mean over images, the members' is pooled: mIoU_img compares like with like)
        assert worst["mIoU"] <= m["attacks"][key]["mIoU"] and worst["mIoU_img"] <= m["attacks"][key]["mIoU_img"]
        assert m["attacks"][key]["forward_passes"] > 0 and m["attacks"][key]["backward_passes"] > 0
    assert worst["forward_passes"] == sum(m["attacks"][k]["forward_passes"] for k in members)
    assert m["worst_case"]["8"]["mIoU"] == worst["mIoU"]
    # the entry point: identical numbers (normalisation from model.mean / std = the processor's ImageNet values);
    # its own weights are named by the entry's file
    assert metrics["entry"]["checkpoint"] == os.path.join(EXAMPLES, "hf_segformer.py")
    assert numbers(dict(metrics["entry"], checkpoint=None)) == numbers(dict(m, checkpoint=None))


# ---------------------------------------------------------------- training an external model
def test_external_model_trains_with_pirat_and_its_checkpoint_evaluates(tmp_path, folder_data):
    exp = tmp_path / "exp"
    args = ["--config", os.path.join(EXAMPLES, "my_model.yaml"), *folder_args(folder_data, exp),
            "model.kwargs={classes: 3, width: 8}", "train.epochs=1", "train.batch_size=2", "train.eval_freq=0",
            "train.attack={steps: 2}", "test.attacks=[{name: pgd, steps: 2}]", "test.eps=[8]"]
    cfg = load_config(args[1], args[2:])
    fresh = build_model(cfg)
    trainer_log = {}
    assert main("train", lambda c: trainer_log.setdefault("t", Trainer(c)).fit(), args) == 0
    trainer = trainer_log["t"]
    assert trainer.iteration == 2 and trainer.defense.attack.name == "pgd"
    ckpt = exp / "model" / "last.pth"
    state = torch.load(ckpt, weights_only=True)["model"]
    assert all(k.startswith("net.") for k in state)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in state.items() if v.is_floating_point())
    assert main("test", run_test, [*args, f"test.checkpoint={ckpt}"]) == 0
    m = json.loads((exp / "result" / "metrics.json").read_text())
    assert m["checkpoint"] == str(ckpt) and m["attacks"]["pgd@8"]["forward_passes"] == 2 * fx.SPLIT_SIZE
    # the bare module's own state dict loads strictly too (bare_module), into the same weights
    bare = tmp_path / "bare.pth"
    torch.save({k[len("net."):]: v for k, v in state.items()}, bare)
    other = build_model(cfg)
    assert load_model_weights(other, str(bare), key="model.weights") == "bare_module"
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


# ---------------------------------------------------------------- the Python entry and SEA on a batch
def fixture_model(trained_model, *overrides):
    cfg = load_config(trained_model.config, list(overrides))
    model = build_model(cfg)
    load_model_weights(model, trained_model.checkpoint)
    return cfg, model.eval(), build_dataset(cfg, cfg.test.split)


def test_python_entry_returns_what_test_py_wrote(trained_model):
    """evaluate_model on the fixture model, dataset and config: test.py's metrics.json numbers exactly,
    from a dataset, from a loader, and for the module behind a plain wrapper (wrapped by the adapter)."""
    cfg, model, dataset = fixture_model(trained_model)
    want = numbers(trained_model.metrics)
    assert want["attacks"]["pgd@8"]["mIoU"] < want["clean"]["mIoU"] - 0.1   # attacked numbers differ from clean
    got = evaluate_model(model, dataset, cfg, checkpoint=trained_model.checkpoint)
    assert numbers(got) == want
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.test.batch_size, collate_fn=group_collate)

    class Plain(nn.Module):  # not a project model: evaluate_model wraps it (no normalisation of its own)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)
    got = evaluate_model(Plain(model), loader, cfg.path, checkpoint=trained_model.checkpoint)
    assert numbers(got) == want


def test_sea_on_a_batch_is_the_per_image_worst_case_of_test_py(trained_model, tmp_path):
    """sea(model, x, y) with test.py's seeds and class weights: per image the member with the lowest
    accuracy; its accuracies average to the worst-case aAcc test.py reports for the same SEA."""
    steps = 6
    cfg, model, dataset = fixture_model(trained_model, f"test.attacks=[{{name: sea, steps: {steps}}}]",
                                        "test.num_images=4", "test.batch_size=4")
    batch = group_collate([dataset[i] for i in range(4)])
    assert len(batch) == 1                                    # one same-size group: test.py's batch
    x, y, idx = batch[0]["image"], batch[0]["label"], batch[0]["index"].tolist()
    for p in model.parameters():
        p.requires_grad_(False)
    x_adv, stats = sea(model, x, y, eps=8, steps=steps, class_weights=balanced_class_weights(cfg), seed=cfg.seed,
                       keys=idx)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    acc = torch.stack([stats["member_accuracy"][m] for m in ("apgd-mask-ce-bal", "apgd-mask-ce", "apgd-js")])
    assert torch.equal(stats["accuracy"], acc.min(0).values)
    assert stats["member"] == [("apgd-mask-ce-bal", "apgd-mask-ce", "apgd-js")[i] for i in acc.argmin(0).tolist()]
    with torch.no_grad():                                     # the accuracy of the image returned
        valid = y != 255
        fresh = correct_pixels(model(x_adv), y, valid).flatten(1).sum(1) / valid.flatten(1).sum(1)
    assert (fresh - stats["accuracy"]).abs().max() <= PIXEL_FRACTION
    clean_acc = (correct_pixels(model(x), y, valid).flatten(1).sum(1) / valid.flatten(1).sum(1))
    assert (stats["accuracy"] < clean_acc).any()              # the attack did something
    cfg.test.result_dir = str(tmp_path / "result")
    with FolderLock(str(tmp_path / "result.lock"), "result folder"):  # another evaluation writing there
        with pytest.raises(SetupError, match="is in use by"):
            evaluate_model(model, dataset, cfg, write=True)
    assert not (tmp_path / "result").exists()
    m = evaluate_model(model, dataset, cfg, write=True)      # weights in memory: written, never resumed
    assert not (tmp_path / "result.lock").exists()
    assert numbers(json.loads((tmp_path / "result" / "metrics.json").read_text())) == numbers(m)
    assert abs(m["attacks"]["sea@8"]["aAcc"] - float(stats["accuracy"].mean())) <= PIXEL_FRACTION
    assert m["attacks"]["sea@8"]["forward_passes"] == stats["forward_passes"]
    assert m["attacks"]["sea@8"]["backward_passes"] == stats["backward_passes"]


def test_mmseg_recipe_with_a_stand_in_for_mmsegmentation(monkeypatch, tmp_path):
    """examples/mmseg_model.yaml's entry on a stand-in `mmseg.apis.init_model` (mmsegmentation is not a
    dependency): the EncoderDecoder's mode="tensor" logits, at 1/4 size, come out at the input size."""
    import sys
    import types
    calls = []

    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 19, 4, stride=4)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            assert mode == "tensor"
            return self.head(inputs)

    def init_model(config, checkpoint=None, device="cuda:0"):
        calls.append((config, checkpoint, device))
        return EncoderDecoder()
    apis = types.ModuleType("mmseg.apis")
    apis.init_model = init_model
    monkeypatch.setitem(sys.modules, "mmseg", types.ModuleType("mmseg"))
    monkeypatch.setitem(sys.modules, "mmseg.apis", apis)
    cfg = load_config(os.path.join(EXAMPLES, "mmseg_model.yaml"),
                      ["model.kwargs={config: m.py, checkpoint: m.pth}", "data.crop_size=[32, 32]"])
    model = build_model(cfg).eval()
    assert calls == [("m.py", "m.pth", "cpu")]
    x = torch.rand(1, 3, 40, 24)
    with torch.no_grad():
        raw = model.net.segmentor.head((x - model.mean) / model.std)
        assert raw.shape[-2:] == (10, 6)
        torch.testing.assert_close(model(x), F.interpolate(raw, size=(40, 24), mode="bilinear", align_corners=False))
