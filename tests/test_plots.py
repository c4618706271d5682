"""Robustness curves, per-class chart, compare tool and example panels, on hand-made inputs."""
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.plots import eps_steps, plot_curves, plot_per_class, read_curves, robustness_curves
from engine.results import write_plots
from utils.errors import SetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compare_curves.py")


def metrics_dict(clean_miou: float = 0.8) -> dict:
    """A metrics.json of 3 classes, eps 4 and 16 (keys that sort the other way round as strings),
    PGD and an ensemble 'ens' of one member 'a'."""
    def run(miou, aacc, iou=None):
        return {"mIoU": miou, "mAcc": 0.0, "aAcc": aacc, "iou_per_class": iou or [0.0, 0.0, None]}
    return {"class_names": ["bg", "disc", "square"],
            "clean": run(clean_miou, 0.9, [0.9, 0.7, None]),
            "attacks": {"pgd@16": run(0.2, 0.3), "pgd@4": run(0.5, 0.6), "ens/a@4": run(0.45, 0.55),
                        "ens@4": run(0.4, 0.5), "ens/a@16": run(0.1, 0.2), "ens@16": run(0.05, 0.15)},
            "worst_case": {"16": run(0.04, 0.1, [0.1, 0.0, None]), "4": run(0.3, float("nan"), [0.5, 0.2, None])}}


def pts(*rows):
    return [{"eps": e, "mIoU": m, "aAcc": a} for e, m, a in rows]


EXPECTED = {"eps_unit": "1/255",
            "attacks": {"pgd": pts((0.0, 0.8, 0.9), (4.0, 0.5, 0.6), (16.0, 0.2, 0.3)),
                        "ens/a": pts((0.0, 0.8, 0.9), (4.0, 0.45, 0.55), (16.0, 0.1, 0.2)),
                        "ens": pts((0.0, 0.8, 0.9), (4.0, 0.4, 0.5), (16.0, 0.05, 0.15))},
            "worst_case": pts((0.0, 0.8, 0.9), (4.0, 0.3, None), (16.0, 0.04, 0.1))}


class Recorder:
    """Stands in for a tensorboardX SummaryWriter."""
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value


def test_robustness_curves_by_hand():
    assert robustness_curves(metrics_dict()) == EXPECTED  # numeric eps order, NaN -> null, clean at 0
    assert robustness_curves({"clean": {"mIoU": 1.0, "aAcc": 1.0}, "attacks": {}, "worst_case": {}}) is None


def test_written_json_plotted_lines_and_scalars_agree(tmp_path):
    """robustness.json read back equals the hand-computed curves; the plot drawn from it has exactly
    its values as line data; the tensorboard scalars are its points at step = eps."""
    rec = Recorder()
    write_plots(metrics_dict(), str(tmp_path), rec, logging.getLogger("t"))
    curves = json.loads((tmp_path / "robustness.json").read_text())
    assert curves == EXPECTED
    for f in ("robustness.png", "per_class.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_curves(curves)
    series = {**curves["attacks"], "worst_case": curves["worst_case"]}
    for ax, key in zip(fig.axes, ("mIoU", "aAcc")):
        assert ax.get_ylabel() == key
        assert [ln.get_label() for ln in ax.lines] == list(series)
        for ln in ax.lines:
            points = series[ln.get_label()]
            assert list(ln.get_xdata()) == [p["eps"] for p in points]
            want = [math.nan if p[key] is None else p[key] for p in points]
            np.testing.assert_array_equal(ln.get_ydata(), want)
    assert rec.scalars[("robustness/pgd/mIoU", 16)] == 0.2 and rec.scalars[("robustness/ens/a/aAcc", 0)] == 0.9
    assert rec.scalars[("robustness/worst_case/mIoU", 4)] == 0.3
    assert ("robustness/worst_case/aAcc", 4) not in rec.scalars           # null: no scalar
    assert len(rec.scalars) == 4 * 3 * 2 - 1
    # test.plots=false: the numbers without the pictures
    (tmp_path / "noplots").mkdir()
    write_plots(metrics_dict(), str(tmp_path / "noplots"), Recorder(), logging.getLogger("t"), draw=False)
    assert sorted(os.listdir(tmp_path / "noplots")) == ["robustness.json"]
    # radii of 0.5/255: steps in tenths, said by the tag
    half = robustness_curves({"clean": {"mIoU": 1.0, "aAcc": 1.0}, "attacks": {"pgd@0.5": {"mIoU": 0.5, "aAcc": 0.5}},
                              "worst_case": {"0.5": {"mIoU": 0.5, "aAcc": 0.5}}})
    assert eps_steps(half) == 10 and eps_steps(EXPECTED) == 1
    from engine.plots import write_curve_scalars
    rec = Recorder()
    assert write_curve_scalars(half, rec) == "robustness_eps_x10"
    assert rec.scalars[("robustness_eps_x10/pgd/mIoU", 5)] == 0.5


def test_per_class_bars_are_the_iou_values():
    m = metrics_dict()
    fig = plot_per_class(m)
    ax = fig.axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == ["clean", "worst case eps 4", "worst case eps 16"]
    for label, iou in (("clean", m["clean"]["iou_per_class"]), ("worst case eps 4", [0.5, 0.2, None]),
                       ("worst case eps 16", [0.1, 0.0, None])):
        heights = [p.get_height() for p in bars[label].patches]
        np.testing.assert_array_equal(heights, [math.nan if v is None else v for v in iou])  # absent: no bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bg", "disc", "square"]
    centres = [p.get_x() + p.get_width() / 2 for c in ax.containers for p in c.patches]
    assert sorted(centres)[:3] == pytest.approx([-0.8 / 3, 0, 0.8 / 3])    # grouped around class 0
    assert plot_per_class({**m, "worst_case": {}}) is None


def write_json(path, data) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_compare_overlays_one_line_per_experiment(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from compare_curves import compare
    # an experiment folder, a result folder and a file; clean mIoU tells them apart
    a = write_json(tmp_path / "expA" / "result" / "robustness.json", robustness_curves(metrics_dict(0.81)))
    write_json(tmp_path / "expB" / "result" / "ck" / "robustness.json", robustness_curves(metrics_dict(0.82)))
    c = write_json(tmp_path / "c.json", robustness_curves(metrics_dict(0.83)))
    fig = compare([str(tmp_path / "expA"), str(tmp_path / "expB" / "result" / "ck"), c], None)
    for ax, key in zip(fig.axes, ("mIoU", "aAcc")):
        assert [ln.get_label() for ln in ax.lines] == ["expA", "ck", os.path.basename(tmp_path)]
        for ln, clean in zip(ax.lines, (0.81, 0.82, 0.83)):
            want = [p[key] for p in robustness_curves(metrics_dict(clean))["worst_case"]]
            np.testing.assert_array_equal(ln.get_ydata(), [math.nan if v is None else v for v in want])
    fig = compare([a, c], None, attack="ens/a", labels=["one", "two"])
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["one", "two"]
    assert list(fig.axes[0].lines[1].get_ydata()) == [0.83, 0.45, 0.1]
    with pytest.raises(SetupError, match="no curve 'sea'"):
        compare([a], None, attack="sea")
    out = tmp_path / "cmp.png"
    r = subprocess.run([sys.executable, TOOL, str(tmp_path / "expA"), c, "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_a_broken_file_and_writes_nothing(tmp_path):
    good = write_json(tmp_path / "good" / "robustness.json", EXPECTED)
    out = tmp_path / "cmp.png"
    out.write_bytes(b"earlier")
    for bad, text in (("{", "not a readable JSON file"), ('{"attacks": {}, "worst_case": [{"eps": "x"}]}',
                                                         "not a robustness.json")):
        (tmp_path / "bad.json").write_text(bad)
        r = subprocess.run([sys.executable, TOOL, good, str(tmp_path / "bad.json"), "--out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and str(tmp_path / "bad.json") in r.stderr and text in r.stderr
        assert out.read_bytes() == b"earlier" and not os.path.exists(str(out) + ".tmp")
    with pytest.raises(SetupError, match="missing.*robustness.json: not found"):
        read_curves(str(tmp_path / "missing" / "robustness.json"))


def test_panel_titles_legend_and_tiles(monkeypatch):
    import cv2

    import engine.visualize as vis
    from datasets.palettes import palette
    texts = []
    put = cv2.putText
    monkeypatch.setattr(vis.cv2, "putText", lambda img, t, *a, **k: (texts.append(t), put(img, t, *a, **k))[1])
    h = w = 12
    img = torch.full((3, h, w), 0.5)
    adv = img.clone()
    adv[0, 0, 0] += 4 / 255                       # peak |delta| 4/255: shown x 0.5 * 255 / 4 = 31.9
    label = np.zeros((h, w), np.int64)
    label[:3] = 255
    clean = np.zeros((h, w), np.int64)
    clean[5:, 5:] = 2
    attacked = np.full((h, w), 3)
    pal = palette("synthetic")
    panel = vis.example_panel(img, adv, clean, attacked, label, pal, ["bg", "disc", "square", "triangle"])
    assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3
    k = vis.tile_scale(w)
    assert k == 16 and panel.shape[1] == 6 * w * k + 5 * vis.GAP
    assert texts[:6] == ["image", "perturbation x31.9", "adversarial", "ground truth", "clean prediction",
                         "attacked prediction"]
    assert texts[6:] == ["bg", "square", "triangle", "ignore"]       # the classes in the three maps
    # the row of tiles: find it as the rows of the attacked-prediction tile's colour
    x5 = 5 * (w * k + vis.GAP)
    rows = np.where((panel[:, x5:x5 + w * k] == pal[3]).all(-1).all(-1))[0]
    top, bottom = rows[0], rows[-1] + 1
    assert bottom - top == h * k and top > 0 and bottom < panel.shape[0]   # title band above, legend below
    title, legend = panel[:top], panel[bottom:]
    for i in range(6):                             # text above every tile
        assert (title[:, i * (w * k + vis.GAP):i * (w * k + vis.GAP) + w * k] < 128).any()
    ground = panel[top:bottom, 3 * (w * k + vis.GAP):3 * (w * k + vis.GAP) + w * k]
    np.testing.assert_array_equal(ground, np.repeat(np.repeat(pal[label], k, 0), k, 1))
    for c in (0, 2, 3):                            # every class colour has a swatch in the legend
        assert (legend == pal[c]).all(-1).sum() >= 25, c
    assert not (legend == pal[1]).all(-1).any()    # 'disc' is in none of the maps
    texts.clear()
    vis.example_panel(img, img, clean, attacked, label, pal)
    assert texts[1] == "perturbation (none)" and "class_2" in texts
