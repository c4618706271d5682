"""YAML experiment configs: `_base_` inheritance, dotted command-line overrides, strict validation.

Every key an experiment may set is declared, with its default and a comment, in
``config/_base_/default.yaml``. That file is the schema: a key missing from it is an error
naming the closest valid key, and a value whose type differs from the default's is an error too.
A default of ``null`` accepts any type; a default of ``{}`` is an open mapping whose contents are
checked by whoever reads it (e.g. attack options are checked against the attack's signature).
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable, List, Mapping, Sequence

import yaml

from .errors import SetupError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(ROOT, "config", "_base_", "default.yaml")
BASE_KEY = "_base_"


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


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise SetupError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SetupError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
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


def parse_overrides(overrides: Iterable[str]) -> dict:
    """['train.lr=0.1', 'test.eps=[4,8]'] -> nested dict; values parse as YAML scalars/flow lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise SetupError(f"command-line override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SetupError(f"command-line override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Load an experiment config: defaults <- `_base_` chain <- file <- `key=value` overrides."""
    schema = _read_yaml(DEFAULT_PATH)
    data = _resolve_bases(path)
    validate(data, schema, path)
    cli = parse_overrides(overrides)
    validate(cli, schema, "command line")
    cfg = _wrap(merge(merge(schema, data), cli))
    cfg.path = path
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the fully resolved config as YAML (atomically)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)


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
            for part in args.get.split("."):
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
