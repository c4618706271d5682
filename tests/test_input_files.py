"""Hostile input files, checked in-process (each also reaches an entry point in
tests/test_bad_input.py): YAML with duplicate keys or alias bombs, text that is not UTF-8."""
from __future__ import annotations

import time

import pytest
import yaml

from utils.config import MAX_YAML_NODES, _expanded_size, _StrictLoader, load_config, parse_yaml
from utils.errors import SetupError
from utils.textfile import read_utf8


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
