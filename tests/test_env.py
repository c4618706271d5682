"""The pinned environment: the installed packages are requirements.lock's, the lock is the closure of the
requirements and satisfies their bounds, every import of the project is a named requirement; the env
record (utils/env.py) is plain data, printed by tools/env_report.py and stored in checkpoints and metrics.json."""
import ast
import glob
import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from utils.checkpoint import load_checkpoint
from utils.env import LOCK, canonical_name, env_record, git_state, public_version, read_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import lock  # noqa: E402  (tools/lock.py)

REQUIREMENTS = os.path.join(ROOT, "requirements-test.txt")
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


# ---------------------------------------------------------------- the lock and the requirements
def freeze() -> dict:
    """{canonical name: version} from ``pip freeze`` (what CI installed); a package installed from a URL
    or in editable mode has no version to compare and maps to its line."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if "==" in line:
            name, version = line.split("==", 1)
            found[canonical_name(name)] = version.strip()
        else:  # 'name @ file:///...' or '-e ...'
            found[canonical_name(line.split(" @ ", 1)[0].removeprefix("-e ").strip())] = line
    return found


def test_installed_packages_are_the_locked_versions():
    """README commands (a) and (b) install exactly the lock: every locked package is installed at its
    locked version (torch compared by public version: its +cpu / +cuXXX build is the machine's).
    Other installed packages are allowed; pip, setuptools and wheel are not locked."""
    pins, installed = read_lock(), freeze()
    assert len(pins) > 20                                  # the closure, not only the direct requirements
    wrong = {name: (locked, installed.get(name)) for name, locked in pins.items()
             if public_version(installed.get(name) or "") != locked}
    assert not wrong, f"(locked, installed) differ: {wrong}; install with README command (b)"


def test_lock_is_the_closure_of_the_requirements_and_satisfies_them():
    reqs, pins = lock.read_requirements(REQUIREMENTS), read_lock()
    # every package the requirements pull in is locked, and nothing else (tools/lock.py rewrites it)
    assert set(lock.closure(reqs)) == set(pins)
    assert not [n for n in pins if not lock.locked(n)]   # no pip/setuptools/wheel, no nvidia-*/triton
    for req in reqs:
        version = pins[canonical_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (str(req), version)
        assert req.specifier, f"{req.name}: unbounded requirement (use ~= on the tested version)"
    assert pins["torch"] == "2.13.0" and "+" not in pins["torch"]  # version only, no build
    with open(os.path.join(ROOT, "requirements.txt")) as f:  # the lock is what pip installs from
        assert "-c requirements.lock" in [line.strip() for line in f]


def test_lock_header_says_what_it_is_and_how_to_refresh_it():
    with open(LOCK) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert "Python 3.11" in header and "python3 tools/lock.py" in header
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lock.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def project_files() -> list:
    """Every .py file of the project (not data/, exp/, hidden folders or a virtual environment in it)."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "data", "exp")
                   and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))]
        files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return files


def imported_modules(path: str) -> set:
    """Top-level names of absolute imports, and of string literals given to importlib.import_module,
    importlib.util.find_spec or __import__ (the lazy and optional imports)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "find_spec", "__import__"):
                names.add(node.args[0].value)
    return {n.split(".")[0] for n in names}


def test_every_import_is_a_named_requirement():
    """Each third-party module the project imports belongs to a distribution named in requirements*.txt."""
    files = project_files()
    # the project's own modules: its top-level packages and modules, and every script's siblings
    # (tools/ and tests/ import each other through sys.path)
    own = {os.path.splitext(os.path.basename(p))[0] for p in files}
    own |= {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and glob.glob(os.path.join(ROOT, d, "*.py"))}
    named = {canonical_name(r.name) for p in glob.glob(os.path.join(ROOT, "requirements*.txt"))
             for r in lock.read_requirements(p)}
    dists = importlib.metadata.packages_distributions()
    # modules the user brings, not the project: examples/mmseg_model.py wraps an mmsegmentation model for
    # those who have it installed (docs/your_own_model.md); nothing else imports it
    brought = {"mmseg": {"examples/mmseg_model.py"}}
    missing = {}
    for path in files:
        for module in imported_modules(path) - own - set(sys.stdlib_module_names):
            if os.path.relpath(path, ROOT) in brought.get(module, ()):
                continue
            if not {canonical_name(d) for d in dists.get(module, [])} & named:
                missing.setdefault(module, []).append(os.path.relpath(path, ROOT))
    assert not missing, f"imported but not named in requirements*.txt (module: files): {missing}"
    assert {"torch", "numpy", "cv2", "PIL", "yaml", "pytest"} <= {m for p in files for m in imported_modules(p)}
