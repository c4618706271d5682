"""tools/output_dimension.py / engine/output_dimension.py: MTRobust's robustness vs output dimension
(mtl_fpd.md §A3.4): gradient norm per output vs M, robust accuracy vs M, single- vs all-task attacks."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine import output_dimension as od
from models import build_model
from tools.output_dimension import main as cli_main
from utils.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MT = ["model.name=taskonomy_resnet", "model.layers=18", "model.width=0.125", "model.pretrained=null",
      "model.tasks=[segmentsemantic,depth_zbuffer,autoencoder]", "model.task_channels={segmentsemantic: 6}",
      "data.tasks=[segmentsemantic,depth_zbuffer,autoencoder]"]


class ChannelNet(nn.Module):
    """3x3 conv, 3 classes: logits ~ 10 * the image's channels plus small neighbour terms, so the label
    argmax(channels) is mostly right and an 8/255 attack flips the pixels of small margin."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g))
            self.conv.weight[:, :, 1, 1] += 10 * torch.eye(3)
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _groups(n: int = 2, size: int = 24, batch: int = 2, ignore_some: bool = True):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, size, size, generator=g)
    y = x.argmax(1)
    if ignore_some:
        y[:, :3, :3] = 255
    return [{"image": x[i:i + batch], "label": y[i:i + batch], "index": torch.arange(i, min(i + batch, n))}
            for i in range(0, n, batch)]


def test_masks_are_reproducible_and_exact():
    a, b = od.pixel_mask(9, 7, 5, 0, 3), od.pixel_mask(9, 7, 5, 0, 3)
    assert torch.equal(a, b) and int(a.sum()) == 5
    assert not torch.equal(a, od.pixel_mask(9, 7, 5, 0, 4))          # another batch, another mask
    assert od.default_sizes(100) == [1, 4, 16, 64, 100] and od.default_sizes(64) == [1, 4, 16, 64]
    assert od.parse_sizes("16, 1,4,4") == [1, 4, 16]


def test_grad_norm_per_output_decreases_with_m():
    """(a) ||grad||/M falls strictly across well-spaced M (about 1/sqrt(M) for local gradients)."""
    model = ChannelNet()
    data = od.grad_norm_vs_m(model, _groups(4), [1, 16, 256], seed=0)
    g = data["grad_norm"]
    assert data["M"] == [1, 16, 256] and data["num_images"] == 4
    assert g[0] > g[1] > g[2] > 0, g
    assert g[2] < g[0] / 4                                            # well below: 1/sqrt(256) = 1/16
    assert all(p.requires_grad for p in model.parameters())           # restored after attack_mode
    assert all(p.grad is None for p in model.parameters())            # gradients w.r.t. the input only


def test_grad_norm_m1_is_the_single_pixel_gradient():
    """(b) M=1: the input-gradient norm of that one pixel's CE, computed directly."""
    model = ChannelNet().eval()
    groups = _groups(1, size=16, batch=1, ignore_some=False)
    x, y = groups[0]["image"], groups[0]["label"]
    mask = od.pixel_mask(16, 16, 1, 7, 0)
    i, j = [int(v) for v in mask.nonzero()[0]]
    xr = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xr)[:, :, i, j], y[:, i, j])
    expected = float(torch.autograd.grad(loss, xr)[0].norm())
    got = od.grad_norm_vs_m(model, groups, [1], seed=7)["grad_norm"][0]
    assert got == pytest.approx(expected, rel=1e-5)
    # a selected pixel with the ignore label contributes nothing
    y2 = y.clone()
    y2[0, i, j] = 255
    assert od.grad_norm_vs_m(model, [{**groups[0], "label": y2}], [1], seed=7)["grad_norm"][0] == 0.0


def test_robust_accuracy_vs_m_is_consistent():
    """(c) accuracies in [0,1], clean >= attacked, same M list; reproducible."""
    model = ChannelNet()
    groups = _groups(4)
    data = od.robust_accuracy_vs_m(model, groups, [1, 16, 256], seed=0)
    assert data["M"] == [1, 16, 256] and len(data["clean_acc"]) == len(data["adv_acc"]) == 3
    for c, a, n in zip(data["clean_acc"], data["adv_acc"], data["images"]):
        if n:
            assert 0.0 <= a <= c <= 1.0, (a, c)
    assert data["adv_acc"][-1] < data["clean_acc"][-1]               # the attack does something
    assert data["attack"]["eps"] == 8.0 and data["attack"]["steps"] == 5
    assert od.robust_accuracy_vs_m(model, groups, [1, 16, 256], seed=0) == data


def test_robust_accuracy_counts_only_the_selected_pixels():
    """With every selected pixel ignored the image drops out (no division by zero)."""
    model = ChannelNet()
    g = _groups(1, size=8, batch=1, ignore_some=False)[0]
    mask = od.pixel_mask(8, 8, 1, 0, 0)
    g["label"] = torch.where(mask[None], torch.full_like(g["label"], 255), g["label"])
    data = od.robust_accuracy_vs_m(model, [g], [1], seed=0)
    assert data["images"] == [0] and data["clean_acc"] == [None]


def test_plots_draw_the_json(tmp_path):
    """(d) the plotted lines are the JSON's numbers; the reference falls as 1/sqrt(M)."""
    grad = {"M": [1, 4, 16], "grad_norm": [2.0, 1.1, 0.4], "num_images": 3}
    fig = od.plot_grad_norm(grad, str(tmp_path / "g.png"))
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["grad_norm"].get_xdata()) == grad["M"]
    assert list(lines["grad_norm"].get_ydata()) == grad["grad_norm"]
    assert list(lines["1/sqrt(M)"].get_ydata()) == pytest.approx([2.0, 1.0, 0.5])
    assert fig.axes[0].get_xscale() == fig.axes[0].get_yscale() == "log"
    acc = {"M": [1, 4, 16], "clean_acc": [1.0, 0.9, None], "adv_acc": [0.0, 0.5, None]}
    fig = od.plot_robust_accuracy(acc, str(tmp_path / "a.png"))
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["clean"].get_xdata()) == acc["M"]
    assert list(lines["clean"].get_ydata())[:2] == [1.0, 0.9] and math.isnan(lines["clean"].get_ydata()[2])
    assert list(lines["pgd"].get_ydata())[:2] == [0.0, 0.5]
    assert (tmp_path / "g.png").stat().st_size > 0 and (tmp_path / "a.png").stat().st_size > 0


def _checkpoint(cfg_path: str, overrides, path) -> str:
    torch.manual_seed(0)
    model = build_model(load_config(cfg_path, overrides))
    torch.save(model.state_dict(), str(path))
    return str(path)


def test_task_table_single_vs_all(tiny_config, tmp_path, capsys):
    """(e) one row per attacked-task set with every task's metrics; attacking all tasks changes the depth
    error vs attacking segmentation only."""
    cfg = tiny_config()
    ckpt = _checkpoint(cfg, MT, tmp_path / "mt.pth")
    out = tmp_path / "od"
    assert cli_main(["--config", cfg, "--checkpoint", ckpt, "--analyses", "tasks", "--num-images", "2",
                     "--out", str(out), *MT]) == 0
    table = json.loads((out / "task_attacks.json").read_text())
    assert [r["attacked"] for r in table["rows"]] == [["segmentsemantic"],
                                                      ["segmentsemantic", "depth_zbuffer", "autoencoder"]]
    tasks = ["segmentsemantic", "depth_zbuffer", "autoencoder"]
    assert table["tasks"] == tasks
    for row in [{"metrics": table["clean"]}, *table["rows"]]:
        assert set(row["metrics"]) == set(tasks)
        assert set(row["metrics"]["segmentsemantic"]) == {"mIoU", "aAcc"}
        assert set(row["metrics"]["depth_zbuffer"]) == {"mae", "rmse"}
    seg_only, all_tasks = table["rows"]
    assert seg_only["metrics"]["depth_zbuffer"]["mae"] != all_tasks["metrics"]["depth_zbuffer"]["mae"]
    md = (out / "task_attacks.md").read_text()
    assert md.count("\n") == 5 and "segmentsemantic+depth_zbuffer+autoencoder" in md  # header, rule, clean, 2 rows
    assert "depth_zbuffer mae" in capsys.readouterr().out


def test_cli_writes_json_and_png(tiny_config, tmp_path):
    cfg = tiny_config()
    ckpt = _checkpoint(cfg, [], tmp_path / "m.pth")
    out = tmp_path / "od"
    assert cli_main(["--config", cfg, "--checkpoint", ckpt, "--sizes", "1,16", "--num-images", "2",
                     "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["grad_norm.json", "grad_norm.png", "robust_accuracy.json",
                                       "robust_accuracy.png"]
    grad = json.loads((out / "grad_norm.json").read_text())
    acc = json.loads((out / "robust_accuracy.json").read_text())
    assert grad["M"] == acc["M"] == [1, 16] and grad["num_images"] == 2 and grad["checkpoint"] == ckpt


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing.pth"], "--checkpoint: checkpoint not found: {tmp}/missing.pth"),
    (["--checkpoint", "{ckpt}", "--sizes", "1,x"], "--sizes '1,x'"),
    (["--checkpoint", "{ckpt}", "--sizes", "1,5000"], "--sizes: 5000 exceeds"),
    (["--checkpoint", "{ckpt}", "--analyses", "tasks"], "--analyses tasks needs a multitask model"),
    (["--checkpoint", "{ckpt}", "--num-images", "0"], "--num-images must be >= 1"),
], ids=["missing_checkpoint", "bad_sizes", "size_too_large", "tasks_single_task_model", "num_images"])
def test_cli_bad_input_is_one_line(tiny_config, tmp_path, capsys, args, message):
    """(f) exit 2, one stderr line naming the key/file, nothing written."""
    cfg = tiny_config()
    ckpt = str(tmp_path / "m.pth")
    if "{ckpt}" in " ".join(args):
        _checkpoint(cfg, [], ckpt)
    args = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    out = tmp_path / "od"
    before = sorted(os.listdir(tmp_path))
    assert cli_main(["--config", cfg, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message.format(tmp=tmp_path) in err, err
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()
