"""Every config key that names a checkpoint (train.resume, test.checkpoint, model.weights, model.pretrained)
goes through one reader: the same one-line errors for missing, cut, foreign and code-carrying files."""
import os
import pickle

import pytest
import torch

from engine.evaluator import load_for_test
from models import build_model, load_pretrained
from models.weights import load_model_weights
from utils.checkpoint import load_checkpoint, read_checkpoint, resolve_resume, save_checkpoint
from utils.errors import SetupError


class RunsCode:
    """Pickles to a call of os.system that would create `marker` (pickling never runs it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def bad_files(tmp_path):
    """{kind: (path, words expected in the message)} of files no loader may accept."""
    good = tmp_path / "good.pth"
    save_checkpoint({"model": {"w": torch.arange(20000.0)}, "epoch": 1}, str(good))
    files = {}

    def add(kind, name, words, data=None):
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        files[kind] = (p, words)
    add("missing", "missing.pth", ["checkpoint not found"])
    add("empty", "empty.pth", ["cannot read", "empty"], b"")
    add("truncated", "cut.pth", ["cannot read", "truncated or not a PyTorch file"], good.read_bytes()[:30000])
    add("text", "notes.pth", ["cannot read", "truncated or not a PyTorch file"], b"hello, not weights\n")
    os.mkdir(tmp_path / "folder.pth")
    add("folder", "folder.pth", ["is a folder, not a checkpoint file"])
    with open(tmp_path / "code.pth", "wb") as f:          # a plain pickle, as a hand-made attack would be
        pickle.dump({"model": RunsCode(tmp_path / "code_ran")}, f)
    add("code", "code.pth", ["holds code", "was not loaded"])
    torch.save({"model": RunsCode(tmp_path / "code_ran")}, tmp_path / "code_zip.pth")  # torch's own format
    add("code_zip", "code_zip.pth", ["holds code", "posix.system", "was not loaded"])
    return files


def check(e: pytest.ExceptionInfo, key: str, path, words) -> None:
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: "), msg
    assert str(path) in msg and "weights_only" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.fixture
def model(tiny_cfg):
    return build_model(tiny_cfg())


def test_one_reader_for_every_key(bad_files, model, tiny_cfg, tmp_path):
    loaders = {
        "train.resume": lambda p: resolve_resume(str(p), str(tmp_path)),
        "model.weights": lambda p: load_model_weights(model, str(p), key="model.weights"),
        "model.pretrained": lambda p: load_pretrained(model, str(p)),
        "test.checkpoint": lambda p: load_for_test(tiny_cfg(f"test.checkpoint={p}"), torch.device("cpu")),
    }
    for kind, (path, words) in bad_files.items():
        for key, load in loaders.items():
            if key == "test.checkpoint" and kind in ("missing", "folder"):
                continue  # checked by the evaluator before reading; a folder there means each .pth in it
            with pytest.raises(SetupError) as e:
                load(path)
            check(e, key, path, words)
    with pytest.raises(SetupError, match=r"^checkpoint not found: .*missing.pth \(set test.checkpoint or train first\)$"):
        loaders["test.checkpoint"](bad_files["missing"][0])
    assert not (tmp_path / "code_ran").exists()  # the pickled call never ran


def test_wrong_content(tmp_path, model):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(SetupError) as e:
        load_model_weights(model, str(tmp_path / "list.pth"), key="model.weights")
    check(e, "model.weights", tmp_path / "list.pth", ["holds a list, not a state dict"])
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(SetupError) as e:       # weights, but not a training checkpoint
        load_checkpoint(str(tmp_path / "weights.pth"), "train.resume")
    check(e, "train.resume", tmp_path / "weights.pth", ["not a training checkpoint", "missing model, optimizer"])
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(SetupError) as e:       # a state dict of another model
        load_model_weights(model, str(tmp_path / "other.pth"), key="model.weights")
    check(e, "model.weights", tmp_path / "other.pth", ["does not match the model", "unexpected keys: other.weight"])
    # the same weights load, through the same reader
    assert load_model_weights(model, str(tmp_path / "weights.pth"), key="model.weights") == "ours"
    assert torch.equal(read_checkpoint(str(tmp_path / "weights.pth"))["cls.4.bias"], model.state_dict()["cls.4.bias"])
