"""YAML experiment configs: `_base_` inheritance, dotted command-line overrides, strict validation.

Every key an experiment may set is declared, with its default and a comment, in
``config/_base_/default.yaml``. That file is the schema: a key missing from it is an error
naming the closest valid key, and a value whose type differs from the default's is an error too.
A default of ``null`` accepts any type; a default of ``{}`` is an open mapping whose contents are
checked by whoever reads it (e.g. attack options are checked against the attack's signature).
Beyond types, ``RULES`` and ``CROSS_RULES`` below say which values make sense (ranges, list
lengths, choices); `load_config` applies them to file and command-line values alike, so every
entry point refuses the same configs before it writes anything.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from .errors import SetupError
from .textfile import read_utf8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(ROOT, "config", "_base_", "default.yaml")
BASE_KEY = "_base_"
# A document whose aliases expand to more nodes than this is refused: every consumer of the parsed
# config (merge, validation, dumps) walks the expanded tree, so a few hundred bytes of nested aliases
# ("billion laughs") would otherwise take minutes and gigabytes.
MAX_YAML_NODES = 100_000
SEED_MAX = 2 ** 63 - 1  # torch.manual_seed takes a 64-bit seed


class Config(dict):
    """A nested dict with attribute access (``cfg.train.lr``). ``cfg.path`` is the source file."""

    path: str = ""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "path":
            object.__setattr__(self, key, value)
        else:
            self[key] = value

    def __deepcopy__(self, memo):
        new = Config({k: copy.deepcopy(v, memo) for k, v in self.items()})
        new.path = self.path
        return new

    def to_dict(self) -> dict:
        """Plain dicts and lists all the way down (for YAML / checkpoints)."""
        return _plain(self)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the last one
    silently); merge keys (``<<``) still override as usual."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: Dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})", key_node.start_mark)
                    seen[key] = line
                except TypeError:  # unhashable: SafeLoader's own error follows
                    continue
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: Dict[int, int], active: set) -> int:
    """Nodes of the document once every alias is expanded (shared nodes counted at each use)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in active:
        raise SetupError("recursive alias")
    active.add(id(node))
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(c, memo, active) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(id(node))
    memo[id(node)] = min(n, MAX_YAML_NODES + 1)  # capped: the sum stays small however deep the nesting
    return memo[id(node)]


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` of `text`, stricter: a duplicate key in a mapping, a document of more than
    `MAX_YAML_NODES` nodes after alias expansion, or invalid YAML is a one-line SetupError naming `source`."""
    try:
        loader = _StrictLoader(text)
    except yaml.reader.ReaderError as e:  # e.g. a binary file that happens to be valid UTF-8
        raise SetupError(f"{source} is not a text file (character #x{e.character:04x} at character "
                         f"{e.position})") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except SetupError as e:
            raise SetupError(f"{source}: {e}: refused") from None
        if size > MAX_YAML_NODES:
            raise SetupError(f"{source}: its aliases expand to more than {MAX_YAML_NODES} nodes: refused")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = "" if mark is None or "duplicate key" in str(e.problem) else \
            f" (line {mark.line + 1}, column {mark.column + 1})"
        raise SetupError(f"{source} is not valid YAML: {e.problem}{where}") from None
    except yaml.YAMLError as e:
        raise SetupError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise SetupError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise SetupError(f"config file not found: {path}")
    data = parse_yaml(read_utf8(path, "config file"), f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SetupError(f"config file {path} must hold a mapping at top level")
    return data


def merge(base: dict, update: Mapping) -> dict:
    """Deep merge `update` into a copy of `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_bases(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise SetupError(f"config {path}: `_base_` inheritance loops back on itself")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise SetupError(f"config file {path}: `{BASE_KEY}` must be a file name or a list of file names, "
                         f"got {bases!r}")
    merged: dict = {}
    for b in bases:
        merged = merge(merged, _resolve_bases(os.path.join(os.path.dirname(path), b), seen + (path,)))
    return merge(merged, data)


def _flat_keys(d: Mapping, prefix: str = "") -> List[str]:
    keys = []
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, Mapping) and v:
            keys += _flat_keys(v, full + ".")
    return keys


def _type_ok(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):  # null allowed: e.g. model.mean null = no normalisation
        return value is None or isinstance(value, (list, tuple))
    if isinstance(default, Mapping):
        return isinstance(value, Mapping)
    return True


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(v), type(v).__name__)


def validate(cfg: Mapping, schema: Mapping, source: str, prefix: str = "") -> None:
    """Raise SetupError for the first key of `cfg` not in `schema` or of the wrong type."""
    valid = _flat_keys(schema, prefix)
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        if k not in schema:
            hint = difflib.get_close_matches(full, valid, n=1, cutoff=0.0)
            raise SetupError(f"{source}: unknown config key '{full}'"
                             + (f"; closest valid key: '{hint[0]}'" if hint else ""))
        d = schema[k]
        if isinstance(d, Mapping) and d and isinstance(v, Mapping):
            validate(v, d, source, full + ".")
        elif not _type_ok(d, v):
            raise SetupError(f"{source}: config key '{full}' must be {_type_name(d)} "
                             f"(like the default {d!r}), got {_type_name(v)} {v!r}")


@dataclass(frozen=True)
class Rule:
    """What a config value must be: `ok(value)` and the words for the error message."""
    ok: Callable[[Any], bool]
    text: str
    numeric: bool = False  # holds numbers (exponent strings are read as floats)


def is_number(v: Any) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Rule:
    """A finite number (an int when `integer`) in the interval from lo to hi (ends open or closed)."""
    def ok(v: Any) -> bool:
        if not (_integer(v) if integer else is_number(v)):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    kind = "an integer" if integer else "a number"
    if lo > -math.inf and hi < math.inf:
        text = f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo > -math.inf:
        text = f"{kind} {'>' if lo_open else '>='} {lo:g}"
    elif hi < math.inf:
        text = f"{kind} {'<' if hi_open else '<='} {hi:g}"
    else:
        text = kind
    return Rule(ok, text, numeric=not integer)


def positive(integer: bool = False) -> Rule:
    """A number > 0 (an integer >= 1 when `integer`)."""
    return number(1, integer=True) if integer else number(0, lo_open=True)


def fraction(lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A number in [0, 1], either end open."""
    return number(0, 1, lo_open, hi_open)


def one_of(*choices: Any) -> Rule:
    """One of `choices`, of the same type (so 1 is not True)."""
    return Rule(lambda v: any(v == c and type(v) is type(c) for c in choices),
                "one of " + ", ".join("null" if c is None else str(c) for c in choices))


def text(nonempty: bool = True) -> Rule:
    """A string (not blank, unless `nonempty` is false)."""
    return Rule(lambda v: isinstance(v, str) and (bool(v.strip()) or not nonempty),
                "a non-empty string" if nonempty else "a string")


def optional(rule: Rule) -> Rule:
    """null, or what `rule` accepts."""
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.text}", rule.numeric)


def list_of(item: Rule, n: Optional[int] = None, ordered: bool = False, nonempty: bool = True) -> Rule:
    """A list of `n` items (any number, at least one when `nonempty`), each as `item`;
    non-decreasing when `ordered` (a [lo, hi] range)."""
    def ok(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or (nonempty and not v):
            return False
        return all(item.ok(x) for x in v) and (not ordered or all(a <= b for a, b in zip(v, v[1:])))
    count = f"{n} " if n is not None else ("one or more " if nonempty else "")
    what = f"a list of {count}{'items' if n != 1 else 'item'}, each {item.text}"
    return Rule(ok, what + (", lo <= hi" if ordered else ""), item.numeric)


def mapping_of(value: Rule) -> Rule:
    """A mapping of string keys to values as `value`."""
    return Rule(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) and value.ok(x) for k, x in v.items()),
                f"a mapping of names to {value.text}", value.numeric)


INT_GE0, INT_GE1 = number(0, integer=True), positive(integer=True)
PAIR = list_of(INT_GE1, n=2)  # [h, w]
PATH = optional(text())

# Semantic rules by dotted key, on top of the type check against default.yaml (see its comments
# for meanings). Names resolved by a registry (data.name, model.name, train.method, attacks) are
# checked by that registry; attack options by attacks.base.Attack.
RULES: Dict[str, Rule] = {
    "exp_dir": text(),
    "seed": Rule(lambda v: _integer(v) and 0 <= v <= SEED_MAX, "an integer in [0, 2^63-1]"),
    "device": one_of("auto", "cpu", "cuda"),
    "dist.timeout_min": positive(),
    "data.name": text(),
    "data.root": text(),
    "data.classes": INT_GE1,
    "data.ignore_label": INT_GE0,
    "data.train_list": text(nonempty=False),
    "data.val_list": text(nonempty=False),
    "data.test_list": text(nonempty=False),
    "data.workers": INT_GE0,
    "data.tasks": list_of(text(), nonempty=False),
    "data.transform": one_of("semseg", "pirat", "crop_flip", "none"),
    "data.crop_size": PAIR,
    "data.scale_range": list_of(positive(), n=2, ordered=True),
    "data.rotate_range": list_of(number(-180, 180), n=2, ordered=True),
    "data.base_size": INT_GE1,
    "data.eval_transform": one_of("none", "semseg", "sea"),
    "data.eval_crop": PAIR,
    "data.taskonomy.size": INT_GE1,
    "data.taskonomy.split_point": INT_GE0,
    "data.synthetic.num_train": INT_GE1,
    "data.synthetic.num_val": INT_GE1,
    "data.synthetic.size": number(8, 129, integer=True),
    "data.synthetic.seed": INT_GE0,
    "data.class_names": optional(list_of(text())),
    "data.label_map": Rule(lambda v: isinstance(v, Mapping) and all(_integer(k) and k >= 0 and _integer(x) and x >= 0
                                                                    for k, x in v.items()),
                           "a mapping of raw label values to train ids (integers >= 0)"),
    "model.name": text(),
    "model.layers": one_of(18, 34, 50, 101, 152),
    "model.width": positive(),
    "model.output_stride": one_of(8, 16, 32),
    "model.bins": list_of(INT_GE1),
    "model.atrous_rates": list_of(INT_GE1),
    "model.backbone": text(),
    "model.drop_path": optional(fraction(hi_open=True)),
    "model.dropout": fraction(hi_open=True),
    "model.mean": optional(list_of(number(), n=3)),
    "model.std": optional(list_of(positive(), n=3)),
    "model.pretrained": PATH,
    "model.arch": text(),
    "model.tasks": list_of(text()),
    "model.task_channels": mapping_of(INT_GE1),
    "model.shared_until": one_of("layer8", "layer5"),
    "model.fpd.fpn_width": INT_GE1,
    "model.fpd.dropout": fraction(hi_open=True),
    "model.fpd.logit_scale": positive(),
    "model.weights": PATH,
    "model.vit.img_size": INT_GE1,
    "model.vit.patch_size": INT_GE1,
    "model.vit.embed_dim": INT_GE1,
    "model.vit.depth": INT_GE1,
    "model.vit.heads": INT_GE1,
    "model.vit.mlp_ratio": positive(),
    "model.vit.decoder": one_of("mask_transformer", "linear"),
    "model.vit.decoder_layers": INT_GE1,
    "model.entry": PATH,
    "model.kwargs": Rule(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                         "a mapping of keyword names to values"),
    "model.hf_path": PATH,
    "train.method": text(),
    "train.attack": mapping_of(Rule(lambda v: True, "any value")),
    "train.attack_warmup_epochs": INT_GE0,
    "train.sat.adv_fraction": fraction(),
    "train.ddcat.adv_fraction": fraction(),
    "train.ddcat.mask_ignore": one_of(True, False),
    "train.epochs": INT_GE1,
    "train.batch_size": INT_GE1,
    "train.optimizer": one_of("sgd", "adamw"),
    "train.lr": positive(),
    "train.head_lr_mult": positive(),
    "train.momentum": fraction(hi_open=True),
    "train.weight_decay": number(0),
    "train.weight_decay_on": one_of("all", "matrices"),
    "train.scheduler": one_of("poly", "step"),
    "train.power": number(0),
    "train.lr_milestones": Rule(lambda v: list_of(INT_GE1, nonempty=False).ok(v) and all(a < b for a, b in zip(v, v[1:])),
                                "a list of increasing integers >= 1 (epochs)"),
    "train.lr_gamma": number(0, 1, lo_open=True),
    "train.warmup_iters": INT_GE0,
    "train.warmup_epochs": number(0),
    "train.warmup_ratio": fraction(),
    "train.aux_weight": number(0),
    "train.clip_grad_norm": number(0),
    "train.save_freq": INT_GE1,
    "train.eval_freq": INT_GE0,
    "train.print_freq": INT_GE1,
    "train.resume": PATH,
    "train.val_batch_size": INT_GE1,
    "train.save_iter_freq": INT_GE0,
    # YAML reads a bare `off` as false
    "train.amp": one_of(None, False, "off", "none", "fp32", "bf16", "fp16"),
    "train.mtl.main_tasks": list_of(text(), nonempty=False),
    "train.mtl.mt_lambda": number(0),
    "train.mtl.task_lambdas": mapping_of(number(0)),
    "train.mtl.equally": one_of(True, False),
    "train.mtl.adversarial": one_of(True, False),
    "train.mtl.attack_tasks": list_of(text(), nonempty=False),
    "train.mtl.mix_clean": fraction(hi_open=True),
    "train.fpd.noise_eps": number(0),
    "train.fpd.threshold": number(0),
    "train.fpd.ce_weight": number(0),
    "train.fpd.l2_weight": number(0),
    "train.fpd.cycle_l2_weight": number(0),
    "train.fpd.phase1_params": one_of("all_but_head", "restoration_only"),
    "test.split": one_of("val", "train", "test"),
    "test.checkpoint": PATH,
    "test.result_dir": PATH,
    "test.protocol": one_of("whole", "semseg", "sea"),
    "test.crop_size": optional(PAIR),
    "test.stride_rate": optional(fraction(lo_open=True)),
    "test.batch_size": INT_GE1,
    "test.num_images": optional(INT_GE1),
    "test.shard": optional(list_of(INT_GE0, n=2)),
    "test.eps": list_of(positive()),
    "test.attacks": list_of(Rule(lambda v: isinstance(v, (str, Mapping)), "an attack name or mapping"),
                            nonempty=False),
    "test.class_weights": optional(list_of(number(0))),
    "test.attack_tasks": list_of(text()),
    "test.examples": INT_GE0,
    "test.amp": one_of(None, False, "off", "none", "fp32", "bf16", "fp16"),
    "test.channels_last": one_of(True, False),
}


def _cross_rules(cfg: Mapping) -> List[Tuple[str, str]]:
    """(key, problem) for values that only make sense together with another key."""
    d, m, t = cfg["data"], cfg["model"], cfg["test"]
    out = []
    if 0 <= d["ignore_label"] < d["classes"]:
        out.append(("data.ignore_label", f"is the class id {d['ignore_label']} of 0..{d['classes'] - 1}; "
                                         f"use a value >= data.classes (e.g. 255)"))
    if (m["mean"] is None) != (m["std"] is None):
        unset, other = ("model.std", "model.mean") if m["std"] is None else ("model.mean", "model.std")
        out.append((unset, f"is null but {other} is set: give both (normalisation inside the model) or neither"))
    if cfg["train"]["warmup_iters"] and cfg["train"]["warmup_epochs"]:
        out.append(("train.warmup_epochs", f"and train.warmup_iters are both set ({cfg['train']['warmup_epochs']:g} "
                                           f"epochs, {cfg['train']['warmup_iters']} iterations): set one of them"))
    if d["class_names"] is not None and len(d["class_names"]) != d["classes"]:
        out.append(("data.class_names", f"needs one name per class (data.classes = {d['classes']}), "
                                        f"got {len(d['class_names'])}"))
    bad = sorted({v for v in d["label_map"].values() if v >= d["classes"] and v != d["ignore_label"]})
    if bad:
        out.append(("data.label_map", f"maps to {bad}, neither a class of 0..{d['classes'] - 1} nor "
                                      f"data.ignore_label {d['ignore_label']}"))
    if t["shard"] is not None and not t["shard"][0] < t["shard"][1]:
        out.append(("test.shard", f"must be [i, n] with 0 <= i < n (shard i of n), got {t['shard']}"))
    if t["class_weights"] is not None and len(t["class_weights"]) != d["classes"]:
        out.append(("test.class_weights", f"needs one weight per class (data.classes = {d['classes']}), "
                                          f"got {len(t['class_weights'])}"))
    return out


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _has(tree: Mapping, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


# YAML 1.1 (PyYAML) reads 1e12 or -1e-3 as strings: it wants a dot and a signed exponent.
_EXP_FLOAT = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+$")


def yaml_float(value: Any) -> Any:
    """'1e12' -> 1e12 (floats YAML 1.1 leaves as strings); any other value unchanged."""
    if isinstance(value, str) and _EXP_FLOAT.match(value.strip()):
        return float(value)
    return value


def _is_float_default(default: Any) -> bool:
    return isinstance(default, float) or (isinstance(default, (list, tuple)) and bool(default)
                                           and all(isinstance(d, float) for d in default))


def _coerce_floats(cfg: dict, schema: Mapping, rules: Mapping[str, Rule], prefix: str = "") -> None:
    """In place: exponent-only float strings become floats where the key holds floats (schema default
    or a numeric rule), so `train.lr=1e-4` means what it says."""
    for k, v in cfg.items():
        full, d = f"{prefix}{k}", schema.get(k)
        if isinstance(v, dict) and isinstance(d, Mapping) and d:
            _coerce_floats(v, d, rules, full + ".")
        elif _is_float_default(d) or (full in rules and rules[full].numeric):
            cfg[k] = [yaml_float(x) for x in v] if isinstance(v, list) else \
                {kk: yaml_float(x) for kk, x in v.items()} if isinstance(v, dict) else yaml_float(v)


def check_values(cfg: Mapping, source: Callable[[str], str]) -> None:
    """Raise SetupError for the first value that breaks `RULES` or a cross-key rule;
    `source(key)` names where the key was set (the file or the command line)."""
    for key, rule in RULES.items():
        value = _get(cfg, key)
        if not rule.ok(value):
            raise SetupError(f"{source(key)}: config key '{key}' must be {rule.text}, got {value!r}")
    for key, problem in _cross_rules(cfg):
        raise SetupError(f"{source(key)}: config key '{key}' {problem}")


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['train.lr=0.1', 'test.eps=[4,8]'] -> nested dict; values parse as YAML scalars/flow lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise SetupError(f"command-line override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw, f"command-line override '{item}'") if raw.strip() else None
        except SetupError as e:  # not YAML: the text itself (a duplicate key or an alias bomb is an error)
            if "is not valid YAML" not in str(e) or "duplicate key" in str(e):
                raise
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SetupError(f"command-line override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


# Keys earlier versions wrote into every saved config.yaml, with the value they wrote: a saved config
# still loads (the key is dropped); any other value is an error saying the key is gone.
RETIRED = {"train.debug_nan_at_iter": None}  # a test-only hook; the tests inject NaN losses themselves


def drop_retired(tree: dict, source: str) -> None:
    """Remove the `RETIRED` keys that hold their saved value from `tree`; SetupError for another value."""
    for key, saved in RETIRED.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        if node[leaf] != saved:
            raise SetupError(f"{source}: config key '{key}' was removed (only {saved!r}, as earlier runs "
                             f"saved it, is still accepted and ignored), got {node[leaf]!r}")
        del node[leaf]


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Load an experiment config: defaults <- `_base_` chain <- file <- `key=value` overrides."""
    schema = _read_yaml(DEFAULT_PATH)
    data = _resolve_bases(path)
    drop_retired(data, path)
    cli = parse_overrides(overrides)
    for tree, source in ((data, path), (cli, "command line")):
        _coerce_floats(tree, schema, RULES)
        validate(tree, schema, source)
    cfg = _wrap(merge(merge(schema, data), cli))
    check_values(cfg, lambda key: "command line" if _has(cli, key) else path)
    cfg.path = path
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    from .atomic import atomic_write
    with atomic_write(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)


def _main(argv: Sequence[str] = ()) -> int:
    """`python -m utils.config CONFIG [--get dotted.key] [overrides]`: print the resolved config or a value."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m utils.config")
    p.add_argument("config")
    p.add_argument("--get", help="print only this dotted key")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.get:
            node: Any = cfg
            parts = args.get.split(".")
            for i, part in enumerate(parts):
                if not isinstance(node, Mapping):
                    where = ".".join(parts[:i])
                    raise SetupError(f"--get {args.get}: '{where}' is a {_type_name(node)} ({node!r}), "
                                     f"not a section, so it has no key '{part}'")
                node = node[part]
            print(node)
        else:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: no config key {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys
    sys.exit(_main(sys.argv[1:]))
