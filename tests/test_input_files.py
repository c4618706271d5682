"""Hostile input files, checked in-process (each also reaches an entry point in
tests/test_bad_input.py): images with EXIF orientation, corrupt JPEG data and decompression-bomb
headers; checkpoints with non-finite tensors or resume fields that do not fit; YAML with duplicate
keys or alias bombs, text that is not UTF-8; robustness.json values outside [0, 1]."""
from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import data_fixtures as fx
from datasets.list_dataset import SegDataset, check_items, decode_image, header_size, read_label
from engine.trainer import check_optimizer_state, check_progress, load_phase_states
from utils.checkpoint import first_nonfinite, load_weights_file
from utils.config import MAX_YAML_NODES, _expanded_size, _StrictLoader, load_config, parse_yaml
from utils.errors import SetupError
from utils.textfile import read_utf8


ORIENTATION = 0x0112  # EXIF tag; 6 = "rotate 90 degrees clockwise to display"


def halves(h: int, w: int):
    """(image, label): class 1 (white) on the left half, class 0 (black) on the right: a rotation by 90
    degrees turns the halves into top and bottom, so it shows on square images too."""
    lbl = np.zeros((h, w), np.uint8)
    lbl[:, : w // 2] = 1
    return np.repeat(lbl[..., None] * 255, 3, axis=2), lbl


@pytest.mark.parametrize("h,w", [(24, 40), (32, 32)], ids=["landscape", "square"])
def test_exif_rotated_jpeg_is_read_as_stored_and_aligned_with_its_label(tmp_path, h, w):
    img, lbl = halves(h, w)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    rotated, plain = tmp_path / "rot.jpg", tmp_path / "plain.jpg"
    Image.fromarray(img).save(rotated, quality=95, exif=exif)
    Image.fromarray(img).save(plain, quality=95)
    Image.fromarray(lbl).save(tmp_path / "rot.png")
    # the fixture is what it should be: a reader that applies the orientation turns it
    shown = cv2.imread(str(rotated))
    assert shown.shape[:2] == (w, h)
    if h == w:
        assert ((shown[..., 0] > 127) != (lbl == 1)).mean() > 0.4
    # read as stored: the same pixels as the file without EXIF
    assert np.array_equal(decode_image(str(rotated)), cv2.imread(str(plain)))
    items = check_items([(str(rotated), str(tmp_path / "rot.png"))], "fixture")
    image, label = SegDataset(items, classes=2).load(0)
    assert image.shape[:2] == label.shape == (h, w)
    assert ((image.mean(axis=2) > 0.5) == (label == 1)).all()


def test_corrupt_jpeg_data_is_refused_naming_the_file(tmp_path, capfd):
    rng = np.random.default_rng(0)
    img = (rng.random((41, 41, 3)) * 255).astype(np.uint8)
    good = cv2.imencode(".jpg", img)[1].tobytes()
    bad = fx.corrupt_jpeg_body(good)
    assert len(bad) == len(good) and bad[-2:] == b"\xff\xd9" and bad != good
    # libjpeg alone decodes it, to garbage, with a warning on stderr only
    garbage = cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR)
    assert garbage is not None and np.abs(garbage.astype(int) - img).mean() > 10
    capfd.readouterr()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "bad.jpg").write_bytes(bad)
    assert np.array_equal(decode_image(str(tmp_path / "good.jpg")), cv2.imdecode(np.frombuffer(good, np.uint8), 1))
    with pytest.raises(SetupError) as e:
        decode_image(str(tmp_path / "bad.jpg"))
    assert str(e.value).startswith(f"cannot read image {tmp_path / 'bad.jpg'}: Corrupt JPEG data")
    assert "\n" not in str(e.value)
    os.write(2, b"after\n")  # stderr is ours again, and the decoder's warning did not leak
    assert capfd.readouterr().err == "after\n"


def test_decompression_bomb_headers_are_refused(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(fx.png_claiming(60000, 60000))
    for read in (decode_image, header_size, read_label):
        with pytest.raises(SetupError, match=r"bomb.png: its header claims 3600000000 pixels, more than the limit"):
            read(str(p))
    p.write_bytes(fx.png_claiming(300, 200))  # a real size is only as good as its data
    assert header_size(str(p)) == (300, 200)


# ---------------------------------------------------------------- checkpoints
def test_first_nonfinite_names_the_first_bad_tensor(tmp_path):
    state = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])},
             "rng": {"torch": torch.zeros(5, dtype=torch.uint8)}, "steps": [torch.ones(2)]}
    assert first_nonfinite(state) == ("model.b", "inf")
    state["model"]["b"][1] = float("nan")
    assert first_nonfinite(state) == ("model.b", "nan")
    state["model"]["b"][1] = 0.0
    assert first_nonfinite(state) == ("model.c", "nan")
    state["model"]["c"][0] = 1e38
    assert first_nonfinite(state) is None
    state["steps"].append(torch.tensor([-float("inf")]))
    assert first_nonfinite(state) == ("steps.1", "inf")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(SetupError) as e:
        load_weights_file(str(tmp_path / "w.pth"), "model.weights")
    assert str(e.value) == f"model.weights: {tmp_path / 'w.pth'}: tensor 'steps.1' holds non-finite values (inf); refused"


def test_resume_fields_checked():
    assert check_progress({"epoch": 2, "iteration": 8}, "r.pth") == (2, 8, 0)
    for field, value in (("epoch", "x"), ("epoch", -4), ("iteration", -1), ("iteration", 2.0), ("epoch", True),
                         ("skipped", -1)):
        ckpt = {"epoch": 2, "iteration": 8, field: value}
        with pytest.raises(SetupError, match=rf"^train.resume: r.pth: '{field}' must be an integer >= 0, got"):
            check_progress(ckpt, "r.pth")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    saved = opt.state_dict()  # as after a step (stepping would be slow: its first call loads torch._dynamo)
    saved["state"] = {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(model.parameters())}
    load_phase_states({None: opt}, saved, "r.pth")  # its own state fits
    with pytest.raises(SetupError, match=r"^train.resume: r.pth: the LambdaLR state does not fit this run"):
        load_phase_states({None: sched}, {}, "r.pth")
    with pytest.raises(SetupError, match=r"^train.resume: r.pth: the SGD state does not fit this run"):
        load_phase_states({None: opt}, {"state": {}}, "r.pth")
    saved["state"][0]["momentum_buffer"] = torch.zeros(3)  # parameter 0 is the [2, 3] weight
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(SetupError, match=r"'momentum_buffer' of parameter 0 of group 0 has shape \[3\], "
                                         r"the parameter \[2, 3\]"):
        load_phase_states({None: fresh}, saved, "r.pth")
    load_phase_states({None: opt}, opt.state_dict(), "r.pth")
    assert set(opt.state[model.weight]) == {"momentum_buffer"}
    check_optimizer_state(opt, "r.pth")  # buffers of the parameters' shapes fit


# ---------------------------------------------------------------- YAML and text files
def laughs(levels: int) -> str:
    names = "abcdefghij"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{c}: &{c} [" + ",".join([f"*{names[i]}"] * 9) + "]" for i, c in enumerate(names[1:levels])]
    return "\n".join(lines) + "\n"


def brute_size(obj) -> int:
    """Nodes of a parsed document counted on the expanded Python objects (keys count as nodes)."""
    if isinstance(obj, list):
        return 1 + sum(brute_size(x) for x in obj)
    if isinstance(obj, dict):
        return 1 + sum(1 + brute_size(v) for v in obj.values())
    return 1


@pytest.mark.parametrize("text", [laughs(3), laughs(4), "a: &x {b: [1, 2, &y {c: 3}]}\nd: [*x, *y, *x]\n",
                                  "top: &t [1, 2]\nm: {k: *t, l: [*t, *t]}\n"])
def test_alias_expansion_counted_as_brute_force(text):
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    assert _expanded_size(node, {}, set()) == brute_size(yaml.safe_load(text))


def test_alias_bombs_refused_fast_and_documents_below_the_bound_read():
    doc = laughs(9)  # 9^9 leaves
    assert len(doc) < 700
    start = time.process_time()
    with pytest.raises(SetupError, match=r"^x: its aliases expand to more than 100000 nodes: refused$"):
        parse_yaml(doc, "x")
    assert time.process_time() - start < 1.0
    below = laughs(5)  # 9^5 leaves
    assert brute_size(yaml.safe_load(below)) <= MAX_YAML_NODES
    assert parse_yaml(below, "x") == yaml.safe_load(below)
    with pytest.raises(SetupError, match=r"^x: recursive alias: refused$"):
        parse_yaml("a: &a [1, *a]\n", "x")


def test_duplicate_keys():
    with pytest.raises(SetupError, match=r"^f is not valid YAML: duplicate key 'lr' \(lines 3 and 5\)$"):
        parse_yaml("train:\n  epochs: 2\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "f")
    with pytest.raises(SetupError, match=r"duplicate key 1 \(lines 1 and 1\)"):
        parse_yaml("{1: a, 1: b}", "f")
    # the same key in two mappings, and merge keys overriding, stay as yaml.safe_load reads them
    for text in ("a: {x: 1}\nb: {x: 2}\n", "base: &b {lr: 1, wd: 2}\ntrain:\n  <<: *b\n  lr: 3\n"):
        assert parse_yaml(text, "f") == yaml.safe_load(text)


def test_seed_bounds(tiny_config):
    path = tiny_config()
    assert load_config(path, [f"seed={2 ** 63 - 1}"]).seed == 2 ** 63 - 1
    for bad in (2 ** 63, -1):
        with pytest.raises(SetupError, match=r"'seed' must be an integer in \[0, 2\^63-1\]"):
            load_config(path, [f"seed={bad}"])


def test_read_utf8_names_the_byte_offset(tmp_path):
    p = tmp_path / "f.txt"
    p.write_bytes("h\u00e9llo ".encode() + b"\xc3\x28")
    with pytest.raises(SetupError, match=rf"^list file {p} is not UTF-8 text \(byte 0xc3 at byte offset 7\)$"):
        read_utf8(str(p), "list file")
    p.write_bytes("h\u00e9llo\n".encode())
    assert read_utf8(str(p), "list file") == "h\u00e9llo\n"


# ---------------------------------------------------------------- robustness.json
@pytest.mark.parametrize("value,ok", [("0", True), ("1", True), ("null", True), ("0.25", True), ("-0.001", False),
                                      ("1.0001", False), ("true", False), ("NaN", False), ("-Infinity", False)])
def test_robustness_json_values_are_fractions_or_null(tmp_path, value, ok):
    from engine.plots import read_curves
    p = tmp_path / "robustness.json"
    p.write_text('{"attacks": {"pgd": [{"eps": 0.0, "mIoU": 0.5, "aAcc": 0.9}, {"eps": 8, "mIoU": 0.1, "aAcc": %s}]},'
                 ' "worst_case": [{"eps": 0.0, "mIoU": 0.5, "aAcc": 0.9}]}' % value)
    if ok:
        assert read_curves(str(p))["attacks"]["pgd"][1]["aAcc"] == yaml.safe_load(value)
    else:
        with pytest.raises(SetupError, match=rf"^{p}: not a robustness.json \(attack 'pgd': point 1"
                                             r"(: 'aAcc' is .*, not a fraction in \[0, 1\] or null|.*is not)"):
            read_curves(str(p))
