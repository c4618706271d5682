"""The env record (utils/env.py): plain data, printed by tools/env_report.py and stored in checkpoints and
metrics.json."""
import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from utils.checkpoint import load_checkpoint
from utils.env import env_record, git_state, read_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = (str, int, float, bool, type(None))


def check_plain(value, where: str = "env") -> None:
    """Only the types torch.load(weights_only=True) and JSON both read back as they were."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), where
            check_plain(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    else:
        assert type(value) in PLAIN, (where, type(value))      # exact types: a str subclass is refused too


def test_env_record_is_plain_data_with_what_a_bug_report_needs(tmp_path):
    env = env_record()
    assert set(env) == {"python", "implementation", "platform", "torch", "gpus", "packages", "differs_from_lock", "git"}
    check_plain(env)
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    t = env["torch"]
    assert t["version"] == torch.__version__ and t["cuda"] == torch.version.cuda
    assert t["build"] == (f"cuda {torch.version.cuda}" if torch.version.cuda else t["build"])
    assert t["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["gpus"] == []                                   # conftest hides the GPUs
    assert set(env["packages"]) == set(read_lock())
    assert all(v == importlib.metadata.version(name) for name, v in env["packages"].items())
    assert env["differs_from_lock"] == {}                     # as test_installed_packages_are_the_locked_versions
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git"]["commit"] == head.stdout.strip() and isinstance(env["git"]["dirty"], bool)
    # stored as checkpoints and metrics.json store it
    assert json.loads(json.dumps(env)) == env
    torch.save({"env": env}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["env"] == env
    env["torch"]["version"] = "changed"                       # a copy: the cached record is untouched
    assert env_record()["torch"]["version"] == torch.__version__


def test_git_state_without_a_checkout_or_without_git(tmp_path, monkeypatch):
    import utils.env
    monkeypatch.setattr(utils.env, "ROOT", str(tmp_path))      # not a git checkout
    assert git_state() == {"commit": None, "dirty": None}
    monkeypatch.setattr(utils.env, "ROOT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))                  # no git program
    assert git_state() == {"commit": None, "dirty": None}


def test_env_report_prints_the_record():
    script = os.path.join(ROOT, "tools", "env_report.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = env_record()
    for text in (torch.__version__, str(env["torch"]["cpu_capability"]), "gpus",
                 env["git"]["commit"] or "not a git checkout"):
        assert text in r.stdout, text
    for name, version in env["packages"].items():             # one line each
        assert f" {name} " in r.stdout and f" {version}" in r.stdout, name
    r = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == env


def test_checkpoint_and_metrics_json_carry_the_env_record(trained_model):
    """The session's fixture model: its training checkpoint and its evaluation's metrics.json."""
    env = env_record()
    ckpt = load_checkpoint(trained_model.checkpoint)         # weights_only=True
    assert ckpt["env"] == env
    metrics_json = os.path.join(os.path.dirname(os.path.dirname(trained_model.checkpoint)), "result", "metrics.json")
    with open(metrics_json) as f:
        assert json.load(f)["env"] == env
    assert trained_model.metrics["env"] == env

