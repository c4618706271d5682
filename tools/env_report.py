"""Print the environment for a bug report: Python, platform, torch and its build (CPU/CUDA, cuDNN), the
CPU capability torch uses, GPU names, every locked dependency's installed version (and those that differ
from requirements.lock), the git commit and whether the checkout has changes.

``python3 tools/env_report.py [--json]``

The same record is stored as ``env`` in every checkpoint and metrics.json (``utils/env.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.env import env_record  # noqa: E402


def format_record(env: dict) -> str:
    """The record as aligned text, one fact a line."""
    t, git = env["torch"], env["git"]
    if "error" in t:
        torch_lines = [("torch", t["error"])]
    else:
        torch_lines = [("torch", f"{t['version']} ({t['build']}"
                        + (f", cuDNN {t['cudnn']}" if t["cudnn"] else "") + ")"),
                       ("cpu capability", str(t["cpu_capability"]))]
    if git["commit"] is None:
        commit = "unknown (not a git checkout, or no git)"
    else:
        commit = git["commit"] + (" (with uncommitted changes)" if git["dirty"] else "" if git["dirty"] is False
                                  else " (state unknown)")
    lines = [("python", f"{env['python']} ({env['implementation']})"), ("platform", env["platform"]),
             *torch_lines, ("gpus", ", ".join(env["gpus"]) or "none visible"), ("git commit", commit)]
    width = max(len(k) for k, _ in lines)
    out = [f"{k:<{width}}  {v}" for k, v in lines]
    differs = env["differs_from_lock"]
    out.append(f"packages (requirements.lock; {len(differs)} differ from it):" if env["packages"]
               else "packages: requirements.lock not found")
    width = max((len(n) for n in env["packages"]), default=0)
    for name, version in env["packages"].items():
        note = f"   (locked: {differs[name]['locked']})" if name in differs else ""
        out.append(f"  {name:<{width}}  {version or 'not installed'}{note}")
    return "\n".join(out)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the record as JSON (as checkpoints store it)")
    args = ap.parse_args(argv)
    env = env_record()
    print(json.dumps(env, indent=1) if args.json else format_record(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
