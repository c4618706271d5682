"""test.py end to end on the tiny synthetic model: metrics.json, runs, ensembles, protocols, errors."""
import glob
import json
import os

import numpy as np
import pytest
import rounding
from PIL import Image
from rounding import count_difference

from engine.cli import main
from engine.evaluator import run_test
from utils.config import load_config
from utils.errors import SetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ATTACKS = """
test:
  checkpoint: {ckpt}
  eps: [4.0, 8.0]
  examples: 4
  save_images: true
  plots: true
  attacks:
    - {{name: pgd, steps: 2, alpha: 4.0}}
    - {{name: ensemble, label: ens, members: [{{name: pgd, label: pgd1, steps: 1, alpha: 8.0}}, fgsm]}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_model):
    """The session's trained model with a config of several attacks and eps; (config, exp_dir)."""
    tmp = tmp_path_factory.mktemp("evalexp")
    (tmp / "c.yaml").write_text(f"_base_: [{trained_model.config}]\nexp_dir: {tmp / 'exp'}\n"
                                + ATTACKS.format(ckpt=trained_model.checkpoint))
    return str(tmp / "c.yaml"), tmp / "exp"


def test_metrics_json_schema_and_outputs(trained):
    path, exp = trained
    assert main("test", run_test, ["--config", path]) == 0
    m = json.loads((exp / "result" / "metrics.json").read_text())
    assert m["num_images"] == 16 and m["split"] == "val" and m["checkpoint"].endswith("last.pth")
    for key in ("mIoU", "mAcc", "aAcc", "iou_per_class", "seconds"):
        assert key in m["clean"]
    assert set(m["attacks"]) == {"pgd@4", "pgd@8", "ens/pgd1@4", "ens/fgsm@4", "ens@4", "ens/pgd1@8",
                                 "ens/fgsm@8", "ens@8"}
    pgd = m["attacks"]["pgd@8"]
    assert pgd["forward_passes"] == 16 * 2 and pgd["backward_passes"] == 16 * 2  # totals: 16 images x 2 steps
    assert m["attacks"]["ens@8"]["forward_passes"] == 16 * 2                      # pgd1 + fgsm
    assert pgd["mIoU"] < m["attacks"]["pgd@4"]["mIoU"] < m["clean"]["mIoU"] - 0.05  # the attacks bite
    for eps in ("4", "8"):
        runs = [v for k, v in m["attacks"].items() if k.endswith("@" + eps) and k != f"ens@{eps}"]
        wc = m["worst_case"][eps]
        assert wc["mIoU"] <= min(r["mIoU"] for r in runs) + 1e-12
        assert m["attacks"][f"ens@{eps}"]["mIoU"] <= min(m["attacks"][f"ens/{a}@{eps}"]["mIoU"] for a in ("pgd1", "fgsm")) + 1e-12
        assert wc["aAcc"] <= min(r["aAcc_img"] for r in runs) + 1e-12
        assert sum(wc["images_per_attack"]) == 16
    for run in ("clean", "pgd@8", "ens/fgsm@4"):
        files = sorted(os.listdir(exp / "result" / run))
        assert len(files) == 16
        ids = np.array(Image.open(exp / "result" / run / files[0]))
        assert ids.max() < 6                                                 # palette PNG reads back as ids
    assert os.path.isfile(exp / "result" / "examples" / "pgd@8" / "0.png")
    assert os.path.isfile(exp / "result" / "config.yaml")
    assert not os.path.exists(str(exp / "result") + ".partial")              # staged, then published
    _check_plots(exp, m)


def _check_plots(exp, m: dict) -> None:
    """robustness.json holds metrics.json's numbers; robustness.png / per_class.png are the figures
    drawn from them (rendering is deterministic); tensorboard got the curves and the titled panels."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from engine.plots import plot_curves, plot_per_class
    from engine.visualize import tile_scale
    res = exp / "result"
    curves = json.loads((res / "robustness.json").read_text())
    assert set(curves["attacks"]) == {"pgd", "ens", "ens/pgd1", "ens/fgsm"}
    for name, key in (("pgd", "pgd@{}"), ("ens/fgsm", "ens/fgsm@{}"), ("worst_case", None)):
        runs = [m["clean"]] + [m["worst_case"][e] if key is None else m["attacks"][key.format(e)] for e in ("4", "8")]
        points = curves["worst_case"] if key is None else curves["attacks"][name]
        assert points == [{"eps": e, "mIoU": r["mIoU"], "aAcc": r["aAcc"]} for e, r in zip((0.0, 4.0, 8.0), runs)]
    for name, fig in (("robustness.png", plot_curves(curves)), ("per_class.png", plot_per_class(m))):
        fig.savefig(str(exp / name), format="png", dpi=100)
        assert (res / name).read_bytes() == (exp / name).read_bytes(), name
    scalars, images = {}, set()
    for f in os.listdir(exp / "events"):
        for ev in EventFileLoader(str(exp / "events" / f)).Load():
            for v in ev.summary.value:
                kind = v.metadata.plugin_data.plugin_name  # (the loader turns summaries into tensors)
                if kind == "images":
                    images.add(v.tag)
                elif kind == "scalars":
                    scalars[(v.tag, ev.step)] = v.tensor.float_val[0]
    for e, run in ((0, m["clean"]), (4, m["attacks"]["pgd@4"]), (8, m["attacks"]["pgd@8"])):
        assert scalars[("robustness/pgd/mIoU", e)] == pytest.approx(run["mIoU"], rel=1e-6)
    assert scalars[("robustness/worst_case/aAcc", 8)] == pytest.approx(m["worst_case"]["8"]["aAcc"], rel=1e-6)
    assert "examples/pgd_8/0" in images                                            # (tensorboardX: '@' -> '_')
    panel = np.array(Image.open(res / "examples" / "pgd@8" / "0.png"))
    k = tile_scale(41)
    assert panel.shape[0] > 41 * k and panel.shape[1] > 6 * 41 * k                # titles, legend, gaps


def test_attacked_metrics_agree_up_to_rounding_for_batch_sizes_1_and_4(trained_model, tmp_path):
    """Random starts are seeded per image, so another batch size changes an attacked result only by the
    kernels' rounding (docs/reproducibility.md: equal up to rounding; tests/rounding.py)."""
    import torch
    from engine.eval_resume import saved_counts
    results = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    for b in (1, 4):
        exp = tmp_path / f"b{b}"
        assert main("test", run_test, ["--config", trained_model.config, f"exp_dir={exp}", f"test.batch_size={b}",
                                       f"test.checkpoint={trained_model.checkpoint}"]) == 0
        files = [f for f in os.listdir(exp / "result" / "per_image") if f.endswith(".all.npz")]
        results[b] = (json.loads((exp / "result" / "metrics.json").read_text()),
                      saved_counts(str(exp / "result" / "per_image" / files[0])))
    torch.set_num_threads(n)
    (m1, c1), (m4, c4) = results[1], results[4]
    assert m1["attacks"]["pgd@8"]["mIoU"] < m1["clean"]["mIoU"] - 0.1         # the attack changes the result
    assert count_difference(c1, {"pgd@8": c1["clean"]}, "pgd@8") > 10 * rounding.PIXEL_FRACTION
    rounding.assert_agree_up_to_rounding(c1, c4, m1, m4)
    # and the numbers come from the config: another seed moves the random starts, hence the result
    exp = tmp_path / "seed1"
    assert main("test", run_test, ["--config", trained_model.config, f"exp_dir={exp}", "seed=1",
                                   f"test.checkpoint={trained_model.checkpoint}"]) == 0
    other = json.loads((exp / "result" / "metrics.json").read_text())
    assert other["clean"]["mIoU"] == m1["clean"]["mIoU"]
    assert other["attacks"]["pgd@8"]["iou_per_class"] != m1["attacks"]["pgd@8"]["iou_per_class"]


def other_cpu_kernels() -> dict:
    """Environment variables that select CPU kernels other than this process's: ATen's generic
    (non-vectorised) kernels, or AVX2 where this process already runs the generic ones; oneDNN's
    convolutions capped at AVX2, or at SSE4.1 where they are capped at AVX2 already."""
    import torch
    aten = "avx2" if torch.backends.cpu.get_cpu_capability() == "DEFAULT" else "default"
    onednn = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" else "AVX2"
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}


def test_evaluation_on_other_cpu_kernels_agrees_up_to_rounding(trained_model, tmp_path):
    """The same checkpoint evaluated with other CPU kernels (as on another CPU) agrees up to rounding."""
    import subprocess
    import sys
    from engine.eval_resume import saved_counts
    env = dict(os.environ, OMP_NUM_THREADS="1", **other_cpu_kernels())
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    caps = [subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True).stdout.strip()
            for e in (dict(os.environ), env)]
    assert caps[0] != caps[1], caps                                          # other kernels really run
    common = [f"test.checkpoint={trained_model.checkpoint}", "device=cpu"]
    r = subprocess.run([sys.executable, "test.py", "--config", trained_model.config, *common,
                        f"exp_dir={tmp_path / 'other'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = torch_threads(1)
    assert main("test", run_test, ["--config", trained_model.config, *common, f"exp_dir={tmp_path / 'here'}"]) == 0
    torch_threads(n)
    m, c = {}, {}
    for d in ("other", "here"):
        m[d] = json.loads((tmp_path / d / "result" / "metrics.json").read_text())
        c[d] = saved_counts(glob.glob(str(tmp_path / d / "result" / "per_image" / "*.all.npz"))[0])
    assert m["here"]["attacks"]["pgd@8"]["mIoU"] < m["here"]["clean"]["mIoU"] - 0.1   # the attack bites
    rounding.assert_agree_up_to_rounding(c["other"], c["here"], m["other"], m["here"])


def torch_threads(n: int) -> int:
    """Set torch's intra-op threads to n; returns the previous number."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def test_semseg_protocol_with_covering_window_equals_whole(trained):
    path, exp = trained
    whole = run_test(load_config(path, ["test.attacks=[]", "test.save_images=false", f"exp_dir={exp}"]))
    semseg = run_test(load_config(path, ["test.attacks=[]", "test.save_images=false", "test.protocol=semseg",
                                         "test.crop_size=[41,41]", "test.flip=false", "data.eval_transform=semseg",
                                         "data.base_size=41", f"exp_dir={exp}"]))
    assert semseg["clean"]["mIoU"] == pytest.approx(whole["clean"]["mIoU"], abs=1e-9)
    # sliding windows smaller than the image run too, with a per-window attack
    m = run_test(load_config(path, ["test.save_images=false", "test.protocol=semseg", "test.crop_size=[25,25]",
                                    "data.eval_transform=semseg", "data.base_size=41", f"exp_dir={exp}",
                                    "test.attacks=[{name: pgd, steps: 1, alpha: 8.0}]", "test.eps=[8]"]))
    assert m["attacks"]["pgd@8"]["mIoU"] < m["clean"]["mIoU"]
    assert m["attacks"]["pgd@8"]["forward_passes"] == 16 * 4  # 2x2 windows of 25 (stride 17) per image, 1 step
    # the network sees the image at a long side of 33; scores are resized back and scored against the
    # labels at their original 41x41 (every label pixel counted)
    m = run_test(load_config(path, ["test.attacks=[]", "test.save_images=false", "test.protocol=semseg",
                                    "test.crop_size=[33,33]", "data.eval_transform=semseg", "data.base_size=33",
                                    f"exp_dir={exp}"]))
    assert 0 < m["clean"]["mIoU"] != whole["clean"]["mIoU"]
    per_image = [f for f in os.listdir(exp / "result" / "per_image") if f.endswith(".all.npz")][0]
    from engine.eval_resume import saved_counts
    target = saved_counts(str(exp / "result" / "per_image" / per_image))["clean"]["target"]
    assert target.sum() == sum(int((np.array(Image.open(p)) != 255).sum()) for p in _labels(path)[:16])


def test_default_alpha_is_computed_for_each_eps(trained, tmp_path):
    """A pgd entry without alpha steps 2.5 eps / steps at each eps of test.eps: the same results as alpha
    5 at eps 4 and alpha 10 at eps 8 (2 steps, no random start)."""
    path, _ = trained
    bim = "steps: 2, random_start: false"
    m = run_test(load_config(path, [f"exp_dir={tmp_path}", "test.save_images=false", "test.plots=false",
                                    "test.examples=0", "test.num_images=4", "test.eps=[4, 8]",
                                    f"test.attacks=[{{name: pgd, {bim}}}, {{name: pgd, label: a5, alpha: 5.0, {bim}}},"
                                    f" {{name: pgd, label: a10, alpha: 10.0, {bim}}}]"]))
    a = {k: v["iou_per_class"] for k, v in m["attacks"].items()}
    assert a["pgd@4"] == a["a5@4"] and a["pgd@8"] == a["a10@8"] and a["pgd@8"] != a["a5@8"]


def test_bad_attacks_and_mismatched_checkpoint(trained, tmp_path):
    path, exp = trained
    with pytest.raises(SetupError, match="unknown attack 'pgdd'.*valid:.*pgd"):
        run_test(load_config(path, ["test.attacks=[pgdd]"]))
    with pytest.raises(SetupError, match="'test.eps' must be a list of one or more items, each a number > 0"):
        run_test(load_config(path, ["test.eps=[0]"]))  # refused with the config, before anything runs
    with pytest.raises(SetupError, match="steps must be an integer >= 1"):
        run_test(load_config(path, ["test.attacks=[{name: pgd, steps: 0, alpha: 1}]"]))
    other = tmp_path / "other"
    with pytest.raises(SetupError, match="missing keys|unexpected keys|shape mismatches"):
        run_test(load_config(path, ["model.layers=34", f"exp_dir={other}"]))
    assert not os.path.exists(other)  # failed before anything was written


def _labels(config: str) -> list:
    """Label files of the config's test list, in order."""
    cfg = load_config(config)
    with open(os.path.join(cfg.data.root, cfg.data.test_list)) as f:
        return [os.path.join(cfg.data.root, line.split()[1]) for line in f if line.strip()]


# ----------------------------------------------------------------------------- building blocks

def test_group_collate_groups_by_every_shape_in_order():
    import torch
    from engine.common import group_collate

    def sample(i, h, w, lh=None, lw=None, depth=False):
        s = {"image": torch.full((3, h, w), float(i)), "label": torch.zeros(lh or h, lw or w, dtype=torch.long),
             "index": i}
        if depth:
            s["targets"] = {"depth": torch.zeros(1, h, w)}
        return s
    groups = group_collate([sample(0, 4, 6), sample(1, 6, 4), sample(2, 4, 6), sample(3, 4, 6, 8, 12),
                            sample(4, 6, 4)])
    assert [g["index"].tolist() for g in groups] == [[0, 2], [1, 4], [3]]   # landscape, portrait, other label size
    assert groups[1]["image"].shape == (2, 3, 6, 4) and groups[2]["label"].shape == (1, 8, 12)
    assert (groups[0]["image"][1] == 2).all()
    nested = group_collate([sample(0, 4, 6, depth=True), sample(1, 4, 6, depth=True)])
    assert len(nested) == 1 and nested[0]["targets"]["depth"].shape == (2, 1, 4, 6)


def test_scores_are_resized_to_the_label_before_the_argmax():
    """semseg scoring: the probability map at the network's size is resized (bilinear, as cv2's
    INTER_LINEAR) to the label's original size, then the argmax is taken there."""
    import cv2
    import torch
    from engine.evaluator import segmentation_pred
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 5, 7, generator=g)
    label = torch.zeros(2, 9, 13, dtype=torch.long)
    pred = segmentation_pred(scores, label, None)
    assert pred.shape == (2, 9, 13)
    for b in range(2):
        ref = cv2.resize(scores[b].permute(1, 2, 0).numpy(), (13, 9), interpolation=cv2.INTER_LINEAR).argmax(-1)
        assert (pred[b].numpy() == ref).mean() > 0.99   # (float ties aside)
    assert torch.equal(segmentation_pred({"seg": scores}, torch.zeros(2, 5, 7), "seg"), scores.argmax(1))


def test_balanced_weights_published_estimated_or_given(tmp_path):
    from attacks.sea_weights import ADE20K, VOC
    from engine.evaluator import balanced_class_weights
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def weights(config, *over):
        cfg = load_config(os.path.join(root, "config", config), [f"exp_dir={tmp_path}", "test.attacks=[sea]", *over])
        from engine.evaluator import build_attack_runs
        runs = build_attack_runs(cfg)
        bal = [r for r in runs if r.key.startswith("sea/apgd-mask-ce-bal@")]
        assert bal and all(r.attack.options["class_weights"] == bal[0].attack.options["class_weights"] for r in bal)
        return bal[0].attack.options["class_weights"]
    assert weights("voc2012/voc2012_pspnet_none.yaml") == list(VOC)
    assert weights("ade20k/ade20k_upernet_none.yaml") == list(ADE20K)
    assert weights("voc2012/voc2012_pspnet_none.yaml", f"test.class_weights=[{','.join(['1.0'] * 21)}]") == [1.0] * 21
    with pytest.raises(SetupError, match="test.class_weights' needs one weight per class"):
        load_config(os.path.join(root, "config", "voc2012", "voc2012_pspnet_none.yaml"), ["test.class_weights=[1.0,2.0]"])
    assert len(balanced_class_weights(load_config(os.path.join(root, "config", "synthetic",
                                                               "synthetic_pspnet18_none.yaml"),
                                                  [f"exp_dir={tmp_path}", "data.root=" + str(tmp_path / "syn"),
                                                   "data.synthetic.num_train=4", "data.synthetic.num_val=2",
                                                   "data.synthetic.size=33"]))) == 6  # estimated


def test_attack_runs_build_each_attack_once_and_load_each_transfer_source_once(tmp_path, monkeypatch):
    """Two transfer entries from one source at two eps: the source model is loaded once and shared; every
    run's attack is built once, a multitask attack with its tasks and losses already in its options."""
    import torch
    from engine import evaluator
    loads, builds = [], []
    source = torch.nn.Conv2d(3, 6, 1)
    monkeypatch.setattr(evaluator, "_load_model", lambda *a: loads.append(a[:2]) or source)
    real_build = evaluator.build_attack
    monkeypatch.setattr(evaluator, "build_attack", lambda name, **o: builds.append(name) or real_build(name, **o))
    (tmp_path / "a.yaml").write_text("")
    (tmp_path / "b.pth").write_bytes(b"")
    entry = (f"{{name: transfer, source_config: {tmp_path / 'a.yaml'}, source_checkpoint: {tmp_path / 'b.pth'}, "
             "inner: pgd, steps: 1, alpha: 1.0")
    cfg = load_config(os.path.join(ROOT, "config", "synthetic", "synthetic_pspnet18_none.yaml"),
                      [f"exp_dir={tmp_path}", f"test.attacks=[{entry}}}, {entry}, label: t2}}]", "test.eps=[2,4]"])
    runs = evaluator.build_attack_runs(cfg)
    assert [r.key for r in runs] == ["transfer@2", "t2@2", "transfer@4", "t2@4"]
    assert loads == [(str(tmp_path / "a.yaml"), str(tmp_path / "b.pth"))] and builds == ["transfer"] * 4
    assert all(r.attack.options["source_forward"] is source for r in runs)

    builds.clear()
    cfg = load_config(os.path.join(ROOT, "config", "taskonomy", "taskonomy_resnet18_autoencoder_mtl.yaml"),
                      [f"exp_dir={tmp_path}", "test.attacks=[{name: multitask, steps: 1, alpha: 1.0}]", "test.eps=[4]",
                       "test.attack_tasks=[segmentsemantic,depth_zbuffer]",
                       "data.tasks=[segmentsemantic,depth_zbuffer]"])
    (run,) = evaluator.build_attack_runs(cfg, model=_FakeMultitask())
    assert builds == ["multitask"] and run.tasks == ["segmentsemantic", "depth_zbuffer"]
    assert run.attack.options["tasks"] == run.tasks and set(run.attack.options["task_losses"]) == set(run.tasks)


class _FakeMultitask(__import__("torch").nn.Module):
    """seg: class 1 where channel 0 > 0.5; depth: channel 1 (times a weight 1)."""
    multitask, main_output, tasks = True, "segmentsemantic", ["segmentsemantic", "depth_zbuffer"]

    def __init__(self):
        import torch
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        import torch
        return {"segmentsemantic": torch.stack([0.5 - x[:, 0], x[:, 0] - 0.5], 1) * 10,
                "depth_zbuffer": self.w * x[:, 1:2]}


def test_multitask_evaluation_by_hand():
    """Per-task metrics of clean and attacked runs against values computed by hand: the multitask
    attack on depth alone moves only the depth input channel, by 2 steps of 2/255 away from the target."""
    import torch
    from attacks import build_attack
    from engine.evaluator import AttackRun, evaluate
    from engine.results import aggregate
    samples = []
    for i in range(3):
        x = torch.zeros(3, 4, 4)
        x[0, :, :2] = 1.0                      # left half: class 1
        x[1] = 0.25                            # depth prediction 0.25 everywhere
        label = (x[0] > 0.5).long()
        label[0, 0] = 255                      # one ignored pixel
        depth, mask = torch.full((1, 4, 4), 0.5), torch.ones(1, 4, 4)
        mask[0, 3, 3] = 0                      # one invalid depth pixel
        samples.append({"image": x, "label": label, "index": i, "targets": {"segmentsemantic": label,
                        "depth_zbuffer": depth}, "masks": {"segmentsemantic": (label != 255).float()[None],
                                                           "depth_zbuffer": mask}})
    loader = [[torch.utils.data.default_collate(samples[:2])], [torch.utils.data.default_collate(samples[2:])]]
    attack = build_attack("multitask", eps=8.0, alpha=2.0, steps=2, tasks=["depth_zbuffer"], random_start=False)
    run = AttackRun("mt@8", "mt@8", "8", attack, ["depth_zbuffer"])
    model = _FakeMultitask()
    stats = evaluate(model, loader, 2, 255, [run], reg_tasks=["depth_zbuffer"])
    gathered = {k: s.gathered() for k, s in stats.items()}
    clean, attacks, worst = aggregate(gathered, [run], {"clean": 0.0, "mt@8": 0.0}, {"mt@8": (6, 6)},
                                      ["a", "b"], ("segmentsemantic", ["depth_zbuffer"]))
    assert clean["mIoU"] == 1.0 and clean["tasks"]["segmentsemantic"] == {"mIoU": 1.0, "mAcc": 1.0, "aAcc": 1.0}
    d = clean["tasks"]["depth_zbuffer"]
    assert d["elements"] == 3 * 15 and d["mae"] == pytest.approx(0.25) and d["rmse"] == pytest.approx(0.25)
    a = attacks["mt@8"]
    assert a["attacked_tasks"] == ["depth_zbuffer"] and a["forward_passes"] == 6
    assert a["tasks"]["segmentsemantic"]["mIoU"] == 1.0                     # seg input channel untouched
    assert a["tasks"]["depth_zbuffer"]["mae"] == pytest.approx(0.25 + 4 / 255, abs=1e-6)
    assert a["tasks"]["depth_zbuffer"]["backward_passes"] == 6
    assert attack.counter.forward == 3 * 2 and all(p.grad is None for p in model.parameters())



STRONGEST = """
test:
  checkpoint: {ckpt}
  num_images: 2
  eps: [8.0]
  attacks:
    - {{name: sea, steps: 2}}
    - {{name: rse, steps: 2}}
    - {{name: sea+, steps: 2}}
"""


def test_rse_and_sea_plus_worst_case_and_passes(trained_model, tmp_path):
    """On the fixture model (2 iterations per member for time): sea+ is sea and rse run for run (the same
    draws), so its worst case is <= theirs and every member's; each ensemble's passes are its members'
    sum."""
    (tmp_path / "c.yaml").write_text(f"_base_: [{trained_model.config}]\nexp_dir: {tmp_path / 'exp'}\n"
                                     + STRONGEST.format(ckpt=trained_model.checkpoint))
    assert main("test", run_test, ["--config", str(tmp_path / "c.yaml")]) == 0
    m = json.loads((tmp_path / "exp" / "result" / "metrics.json").read_text())["attacks"]
    members = {g: [k for k in m if k.startswith(g + "/")] for g in ("sea", "rse", "sea+")}
    assert [len(members[g]) for g in members] == [3, 8, 11]
    for k in members["sea"] + members["rse"]:
        assert m["sea+/" + k.split("/", 1)[1]]["iou_per_class"] == m[k]["iou_per_class"]
    assert len({str(m[k]["iou_per_class"]) for k in members["sea+"]}) > 3      # the members do differ
    plus = m["sea+@8"]
    for g in ("sea", "rse"):
        assert plus["mIoU"] <= m[f"{g}@8"]["mIoU"] + 1e-12 and plus["aAcc"] <= m[f"{g}@8"]["aAcc"] + 1e-12
    assert plus["mIoU"] <= min(m[k]["mIoU"] for k in members["sea+"]) + 1e-12
    assert m["rse@8"]["mIoU"] <= min(m[k]["mIoU"] for k in members["rse"]) + 1e-12
    for g in ("sea", "rse", "sea+"):
        for p in ("forward_passes", "backward_passes"):
            assert m[f"{g}@8"][p] == sum(m[k][p] for k in members[g])
    # per image: APGD 2 iterations = 3 forwards, 2 backwards; PAdam 2 and 2; DAG at most 2 and 1
    assert m["rse@8"]["forward_passes"] == 2 * (4 * 3 + 2 * 2 + 2 * 2)
    assert m["sea+@8"]["backward_passes"] == 2 * (7 * 2 + 2 * 2 + 2 * 1)


def test_skip_solved_members_skip_images_at_zero_accuracy():
    """An ensemble with skip_solved: once a member brings an image to 0 pixel accuracy, the later members
    do not attack it and copy that member's counts. Model: two classes, z_0 = x_R - 1/2, z_1 = 0.
    DAG (first) flips every pixel of image 0 (margins < eps) and not image 1's (margins > eps), so
    PAdam and PGD (3 steps each) run on image 1 only: 3 passes saved each, reported; aAcc and the
    per-image mIoU equal the full run's."""
    import torch
    from attacks import build_attack
    from engine.evaluator import AttackRun, evaluate
    from engine.results import aggregate

    class RedModel(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0] - 0.5, torch.zeros_like(x[:, 0])], 1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g)
    margins = torch.rand(2, 4, 4, generator=g) * 0.02 + 0.005
    margins[1] += 0.05                                               # image 1: beyond eps = 16/255
    sign = torch.where(torch.rand(2, 4, 4, generator=g) < 0.5, -1.0, 1.0)
    x[:, 0] = 0.5 + sign * margins
    y = (x[:, 0] < 0.5).long()
    batch = {"image": x, "label": y, "index": torch.tensor([0, 1])}
    members = [("dag", "dag", dict(steps=15, gamma=0.003)), ("padam", "padam", dict(steps=3)),
               ("pgd", "pgd", dict(steps=3))]

    def run(skip: bool):
        runs = [AttackRun(f"e/{lab}@16", "e@16", "16", build_attack(n, eps=16.0, label=lab, **o), skip_solved=skip)
                for lab, n, o in members]
        stats = evaluate(RedModel(), [batch], 2, 255, runs)
        gathered = {k: v.gathered() for k, v in stats.items()}
        passes = {r.key: (r.attack.counter.forward, r.attack.counter.backward) for r in runs}
        seconds = {k: 0.0 for k in gathered}
        return gathered, aggregate(gathered, runs, seconds, passes, ["a", "b"])[1], passes

    g_full, full, p_full = run(False)
    g_skip, skip, p_skip = run(True)
    assert g_full["e/dag@16"]["inter"][0].sum() == 0 and g_full["e/dag@16"]["inter"][1].sum() > 0
    assert g_full["e/padam@16"]["inter"][0].sum() > 0                # PAdam alone leaves image 0 partly right
    assert p_full["e/padam@16"] == (6, 6) and p_skip["e/padam@16"] == p_skip["e/pgd@16"] == (3, 3)
    for k in ("inter", "union"):                                    # image 0's rows are DAG's
        assert (g_skip["e/padam@16"][k][0] == g_skip["e/dag@16"][k][0]).all()
        assert (g_skip["e/pgd@16"][k][1] == g_full["e/pgd@16"][k][1]).all()
    e = skip["e@16"]
    assert e["skipped_images"] == [0, 1, 1] and e["saved_forward_passes"] == e["saved_backward_passes"] == 6
    assert e["forward_passes"] + 6 == full["e@16"]["forward_passes"]
    assert e["aAcc"] == full["e@16"]["aAcc"] and e["mIoU_img"] == full["e@16"]["mIoU_img"]
    assert "skipped_images" not in full["e@16"]
