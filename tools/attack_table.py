"""docs/attacks.md's table: every member of sea+ (= sea and rse) and the three ensembles on the demo's
clean and PIR-AT-style models, and how often each member was the per-image minimum.

``python3 tools/attack_table.py [--images 8] [--steps 20] [--methods none pirat] [--out DIR]``

Needs the demo's trained models (``python3 tools/demo.py``, or its training launchers
tool_train/synthetic/demo_{none,pirat}.sh). Each is evaluated by test.py's code on the first
``--images`` val images at the demo's test.eps (4 and 8/255) with ``test.attacks: [sea, rse, sea+]``,
every member run for ``--steps`` iterations instead of its published 300 (APGD) or 200 (PAdam, DAG),
into ``<out>/<method>/result/metrics.json`` (default out: exp/synthetic/attack_table); the markdown
table goes to the console and to ``<out>/table.md``. Errors: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.config import load_config  # noqa: E402
from utils.errors import SetupError  # noqa: E402

NAMES = {"none": "clean", "pirat": "PIR-AT-style"}
ENSEMBLES = ("sea", "rse", "sea+")


def config_path(method: str) -> str:
    return os.path.join(ROOT, "config", "synthetic", f"synthetic_demo_{method}.yaml")


def overrides(method: str, out: str, images: int, steps: int) -> List[str]:
    """test.py overrides of one model's evaluation (its checkpoint checked to exist)."""
    cfg = load_config(config_path(method))
    ckpt = os.path.join(ROOT, cfg.exp_dir, "model", "last.pth")
    if not os.path.isfile(ckpt):
        raise SetupError(f"{ckpt}: no trained demo model; train it first (python3 tools/demo.py)")
    attacks = ", ".join(f"{{name: {e}, steps: {steps}}}" for e in ENSEMBLES)
    return [f"exp_dir={os.path.join(out, method)}", f"test.checkpoint={ckpt}", f"test.num_images={images}",
            f"test.attacks=[{attacks}]", "test.save_images=false", "test.examples=0", "test.plots=false"]


def rows_of(metrics: Dict[str, dict]) -> List[str]:
    """Run keys without eps in table order: sea+'s members (sea's and rse's runs are the same runs),
    then the ensembles."""
    keys = list(metrics["attacks"])
    eps = keys[0].rsplit("@", 1)[1]
    return [k.rsplit("@", 1)[0] for k in keys if k.startswith("sea+/") and k.endswith("@" + eps)] + list(ENSEMBLES)


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(results: Dict[str, dict], images: int, steps: int) -> str:
    """The markdown: mIoU per run, the per-image minimum counts, the passes per image."""
    methods = list(results)
    eps_list = list(results[methods[0]]["worst_case"])
    cols = [(m, e) for m in methods for e in eps_list]
    head = "| run | " + " | ".join(f"{NAMES.get(m, m)} {e}/255" for m, e in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    lines = [f"mIoU (%) on the first {images} val images of the demo's synthetic dataset, every member at "
             f"{steps} iterations (published: APGD 300, PAdam and DAG 200); clean mIoU: "
             + ", ".join(f"{NAMES.get(m, m)} {pct(results[m]['clean']['mIoU'])}" for m in methods) + ".", "",
             head, sep]
    for r in rows_of(results[methods[0]]):
        name = f"**{r}**" if r in ENSEMBLES else r
        lines.append(f"| {name} | " + " | ".join(pct(results[m]["attacks"].get(f"{r}@{e}", {}).get("mIoU"))
                                                 for m, e in cols) + " |")
    lines += ["", "Images on which each member gave the per-image minimum (the worst-case assignment of the "
              "pooled mIoU; ties go to the member found first):", "", head, sep]
    for ens in ENSEMBLES:
        first = results[methods[0]]["attacks"][f"{ens}@{eps_list[0]}"]
        for j, label in enumerate(first["attacks"]):
            member = label.rsplit("@", 1)[0]
            lines.append(f"| {member} | " + " | ".join(
                str(results[m]["attacks"][f"{ens}@{e}"]["images_per_attack"][j]) for m, e in cols) + " |")
    lines += ["", "Passes per image (forward / backward, at these iterations; early stops included):", "",
              head, sep]
    for ens in ENSEMBLES:
        lines.append(f"| {ens} | " + " | ".join(
            "{} / {}".format(*(round(results[m]["attacks"][f"{ens}@{e}"][p] / results[m]["num_images"])
                               for p in ("forward_passes", "backward_passes"))) for m, e in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="first N val images (default 8)")
    p.add_argument("--steps", type=int, default=20, help="iterations of every member (default 20)")
    p.add_argument("--methods", nargs="+", default=["none", "pirat"], help="demo methods (default none pirat)")
    p.add_argument("--out", default=os.path.join("exp", "synthetic", "attack_table"), help="output folder")
    p.add_argument("--table-only", action="store_true",
                   help="evaluate nothing: the table from the metrics.json files already in --out")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.chdir(ROOT)  # the demo configs' paths (data root, exp_dir) are relative to the repository
    from engine.cli import main as run_main
    from engine.evaluator import run_test
    try:
        if args.images < 1 or args.steps < 1:
            raise SetupError("--images and --steps must be >= 1")
        plan = {m: overrides(m, out, args.images, args.steps) for m in args.methods}  # all checked first
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {}
    for m, over in plan.items():
        path = os.path.join(out, m, "result", "metrics.json")
        if args.table_only and not os.path.isfile(path):
            print(f"error: {path}: not evaluated yet (run without --table-only)", file=sys.stderr)
            return 2
        code = 0 if args.table_only else run_main("test", run_test, ["--config", config_path(m), *over])
        if code:
            return code
        with open(path) as f:
            results[m] = json.load(f)
    text = table(results, args.images, args.steps)
    print(text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
