"""test.py end to end on the tiny synthetic model: metrics.json, runs, ensembles, protocols, errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.evaluator import run_test
from engine.trainer import Trainer
from utils.config import load_config
from utils.errors import SetupError

ATTACKS = """
  attacks:
    - {name: pgd, steps: 2, alpha: 4.0}
    - {name: ensemble, label: ens, members: [{name: pgd, label: pgd1, steps: 1, alpha: 8.0}, fgsm]}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """A tiny model trained for one epoch; returns (config text, exp_dir)."""
    from tests.conftest import TINY
    tmp = tmp_path_factory.mktemp("evalexp")
    text = TINY.format(exp=tmp / "exp", data=synthetic_root).replace("  attacks: [{name: pgd, steps: 2, alpha: 4.0}]\n", "")
    (tmp / "c.yaml").write_text(text + "  eps: [4.0, 8.0]\n" + ATTACKS)
    path = str(tmp / "c.yaml")
    assert main("train", lambda cfg: Trainer(cfg).fit(), ["--config", path, "train.epochs=1", "train.eval_freq=0"]) == 0
    return path, tmp / "exp"


def test_metrics_json_schema_and_outputs(trained):
    path, exp = trained
    assert main("test", run_test, ["--config", path]) == 0
    m = json.loads((exp / "result" / "metrics.json").read_text())
    assert m["num_images"] == 6 and m["split"] == "val" and m["checkpoint"].endswith("last.pth")
    for key in ("mIoU", "mAcc", "aAcc", "iou_per_class", "seconds"):
        assert key in m["clean"]
    assert set(m["attacks"]) == {"pgd@4", "pgd@8", "ens/pgd1@4", "ens/fgsm@4", "ens@4", "ens/pgd1@8",
                                 "ens/fgsm@8", "ens@8"}
    pgd = m["attacks"]["pgd@8"]
    assert pgd["forward_passes"] == 6 * 2 and pgd["backward_passes"] == 6 * 2  # per image, 2 steps
    assert m["attacks"]["ens@8"]["forward_passes"] == 6 * 2                     # pgd1 + fgsm
    for eps in ("4", "8"):
        runs = [v for k, v in m["attacks"].items() if k.endswith("@" + eps) and k != f"ens@{eps}"]
        wc = m["worst_case"][eps]
        assert wc["mIoU"] <= min(r["mIoU"] for r in runs) + 1e-12
        assert m["attacks"][f"ens@{eps}"]["mIoU"] <= min(m["attacks"][f"ens/{a}@{eps}"]["mIoU"] for a in ("pgd1", "fgsm")) + 1e-12
        assert wc["aAcc"] <= min(r["aAcc_img"] for r in runs) + 1e-12
        assert sum(wc["images_per_attack"]) == 6
    for run in ("clean", "pgd@8", "ens/fgsm@4"):
        files = sorted(os.listdir(exp / "result" / run))
        assert len(files) == 6
        ids = np.array(Image.open(exp / "result" / run / files[0]))
        assert ids.max() < 6                                                 # palette PNG reads back as ids
    assert os.path.isfile(exp / "result" / "examples" / "pgd@8" / "0.png")
    assert os.path.isfile(exp / "result" / "config.yaml")


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
    assert m["attacks"]["pgd@8"]["mIoU"] <= m["clean"]["mIoU"] + 0.05


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
        run_test(load_config(path, ["model.layers=34", f"exp_dir={other}",
                                    f"test.checkpoint={exp / 'model' / 'last.pth'}"]))
    assert not os.path.exists(other / "result")  # failed before any image was processed
