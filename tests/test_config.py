"""Config loading: inheritance, overrides, validation errors, resolved output."""
import os

import pytest
import yaml

from utils.config import load_config, parse_overrides, save_config
from utils.errors import SetupError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    os.makedirs(tmp_path / "_base_")
    write(tmp_path / "_base_" / "a.yaml", "data: {classes: 19, crop_size: [9, 9]}\ntrain: {lr: 0.5}\n")
    write(tmp_path / "_base_" / "b.yaml", "_base_: a.yaml\ntrain: {epochs: 3}\n")
    cfg = load_config(write(tmp_path / "exp.yaml", "_base_: [_base_/b.yaml]\ntrain: {lr: 0.25}\n"),
                      ["train.epochs=7", "test.eps=[4, 8]", "model.mean=null", "model.std=null"])
    assert cfg.data.classes == 19 and cfg.data.crop_size == [9, 9]   # from a.yaml through b.yaml
    assert cfg.train.lr == 0.25                                      # the file beats its base
    assert cfg.train.epochs == 7 and cfg.test.eps == [4, 8]          # the command line beats the file
    assert cfg.model.mean is None
    assert cfg.train.momentum == 0.9                                 # untouched default


def test_unknown_key_names_closest(tmp_path):
    path = write(tmp_path / "e.yaml", "train: {lrr: 0.1}\n")
    with pytest.raises(SetupError, match=r"unknown config key 'train.lrr'; closest valid key: 'train.lr'"):
        load_config(path)
    with pytest.raises(SetupError, match=r"'trian'.*closest valid key: 'train'"):
        load_config(write(tmp_path / "f.yaml", ""), ["trian.lr=1"])


def test_wrong_type(tmp_path):
    path = write(tmp_path / "e.yaml", "")
    with pytest.raises(SetupError, match=r"'train.epochs' must be int"):
        load_config(path, ["train.epochs=2.5"])
    with pytest.raises(SetupError, match=r"'data.crop_size' must be list"):
        load_config(path, ["data.crop_size=65"])
    assert load_config(path, ["train.lr=1"]).train.lr == 1   # an int where a float is expected is fine


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(SetupError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(SetupError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_saved_config_reads_back(tmp_path):
    cfg = load_config(write(tmp_path / "e.yaml", "test: {attacks: [pgd, {name: pgd, steps: 3}]}\n"))
    save_config(cfg, str(tmp_path / "out" / "config.yaml"))
    back = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert back == cfg.to_dict()
    assert back["test"]["attacks"][1] == {"name": "pgd", "steps": 3}
    assert load_config(str(tmp_path / "out" / "config.yaml")).to_dict() == back  # resolved config is loadable


def test_config_saved_by_an_earlier_version_still_loads(tmp_path):
    """A config.yaml saved before train.debug_nan_at_iter was removed holds it as null: it loads (the key
    dropped, the rest as saved); any other value is a one-line error naming the file and the key."""
    saved = load_config(write(tmp_path / "e.yaml", "train: {lr: 0.005}\n")).to_dict()
    saved["train"]["debug_nan_at_iter"] = None
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(saved))
    back = load_config(str(old)).to_dict()
    assert "debug_nan_at_iter" not in back["train"] and back["train"]["lr"] == 0.005
    saved["train"]["debug_nan_at_iter"] = 3
    old.write_text(yaml.safe_dump(saved))
    with pytest.raises(SetupError, match=r"old.yaml: config key 'train.debug_nan_at_iter' was removed .*got 3"):
        load_config(str(old))


def test_every_shipped_config_loads():
    root = os.path.join(os.path.dirname(__file__), "..", "config")
    found = 0
    for d, _, files in os.walk(root):
        if "_base_" in d:
            continue
        for f in files:
            if f.endswith(".yaml"):
                load_config(os.path.join(d, f))
                found += 1
    assert found >= 1


@pytest.mark.parametrize("override", [
    "seed=-1", "device=gpu", "data.classes=0", "data.ignore_label=3", "data.workers=-1", "data.transform=mixup",
    "data.crop_size=[33]", "data.crop_size=[0,33]", "data.crop_size=[33.0,33.0]", "data.scale_range=[2.0,1.0]",
    "data.scale_range=[0,1]", "data.rotate_range=[10,-10]", "data.base_size=0", "data.eval_transform=resize",
    "data.eval_crop=[473]", "data.synthetic.size=200", "data.synthetic.num_train=0", "model.layers=20",
    "model.width=0", "model.output_stride=4", "model.bins=[]", "model.dropout=1.0", "model.drop_path=-0.1",
    "model.mean=[0.5,0.5]", "model.std=[0.2,0,0.2]", "model.std=null", "model.shared_until=layer6",
    "model.task_channels={depth: 0}", "model.fpd.logit_scale=0", "model.weights=''", "train.epochs=0",
    "train.batch_size=0", "train.optimizer=adam", "train.lr=0", "train.lr=-0.1", "train.lr=.nan", "train.lr=.inf",
    "train.head_lr_mult=0", "train.momentum=1.0", "train.weight_decay=-1e-4", "train.scheduler=cosine",
    "train.power=-1", "train.warmup_iters=-1", "train.warmup_ratio=2", "train.aux_weight=-0.4", "train.save_freq=0",
    "train.eval_freq=-1", "train.print_freq=0", "train.resume=5", "train.val_batch_size=0", "train.save_iter_freq=-1",
    "train.amp=fp8", "test.split=dev", "test.checkpoint=''", "test.protocol=fast",
    "test.crop_size=[33,33,3]", "test.stride_rate=0", "test.stride_rate=1.5", "test.batch_size=0",
    "test.num_images=0", "test.eps=[]", "test.eps=[0]", "test.eps=[-8]", "test.attacks=[3]",
    "test.class_weights=[1,2]", "test.class_weights=[1,1,1,1,1,-1]", "test.examples=-1",
])
def test_values_that_make_no_sense_are_refused_naming_the_key(tmp_path, override):
    path = write(tmp_path / "e.yaml", "")
    key = override.split("=")[0]
    with pytest.raises(SetupError) as e:
        load_config(path, [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"command line: config key '{key}' "), msg


def test_value_errors_name_the_file_that_set_them(tmp_path):
    path = write(tmp_path / "e.yaml", "train: {save_freq: 0}\n")
    with pytest.raises(SetupError, match=r"e\.yaml: config key 'train.save_freq' must be an integer >= 1, got 0$"):
        load_config(path)
    load_config(path, ["train.save_freq=2"])  # the command line wins, and is valid


def test_sensible_values_pass_and_exponent_floats_are_numbers(tmp_path):
    path = write(tmp_path / "e.yaml", "train: {lr: 1e-4, weight_decay: 5e-4}\n")
    cfg = load_config(path, ["train.lr=1e12", "test.eps=[1e-3, 8]", "model.drop_path=2e-1", "train.amp=off",
                             "test.num_images=null", "test.crop_size=[33, 33]", "test.stride_rate=1"])
    assert cfg.train.lr == 1e12 and isinstance(cfg.train.lr, float)   # YAML 1.1 reads 1e12 as a string
    assert cfg.train.weight_decay == 5e-4 and cfg.test.eps == [0.001, 8] and cfg.model.drop_path == 0.2
    assert cfg.train.amp is False
    assert load_config(path).train.lr == 1e-4                          # from the file too
    with pytest.raises(SetupError, match="'train.weight_decay' must be a number >= 0, got -0.001"):
        load_config(path, ["train.weight_decay=-1e-3"])
    with pytest.raises(SetupError, match="'train.epochs' must be int"):
        load_config(path, ["train.epochs=1e3"])                        # an integer key stays an integer


def test_every_non_boolean_key_has_a_rule():
    from utils.config import DEFAULT_PATH, RULES, _read_yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    missing = [k for k, v in leaves(_read_yaml(DEFAULT_PATH)) if not isinstance(v, bool) and k not in RULES]
    assert not missing
    assert set(RULES) <= {k for k, _ in leaves(_read_yaml(DEFAULT_PATH))}  # no rule for a key that is gone
