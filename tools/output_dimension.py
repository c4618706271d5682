"""Robustness vs output dimension (MTRobust, mtl_fpd.md §A3.4); the logic is in engine/output_dimension.py.

``python3 tools/output_dimension.py --config CFG [--checkpoint PTH] [--sizes 1,4,16,...] [--num-images N]
[--out DIR] [--analyses grad,acc,tasks] [--each-task] [key=value ...]``

Writes to --out (default <exp_dir>/output_dimension/): grad_norm.json/.png (input-gradient norm per
attacked output vs the number M of attacked pixels), robust_accuracy.json/.png (PGD 8/255, 5 steps,
on the M pixels only) and, for multitask models, task_attacks.json/.md (the multitask attack on the
segmentation output vs on every task, per-task metrics; run folders under tasks/). The checkpoint
defaults to test.checkpoint, else <exp_dir>/model/last.pth; the images are the first --num-images
(default test.num_images, else all) of test.split. Bad input: one line "error: ..." naming the key or
file, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import one_line  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import SetupError  # noqa: E402

ANALYSES = ("grad", "acc", "tasks")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="output_dimension.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--checkpoint", default=None, help="model weights (default: test.checkpoint or model/last.pth)")
    p.add_argument("--sizes", default=None, help="numbers of attacked pixels M, e.g. 1,4,16,64 "
                                                 "(default: powers of 4 up to the image's pixel count)")
    p.add_argument("--num-images", type=int, default=None, help="first N images of test.split")
    p.add_argument("--out", default=None, help="output folder (default <exp_dir>/output_dimension)")
    p.add_argument("--analyses", default=None, help="comma-separated subset of grad,acc,tasks "
                                                    "(default: grad,acc and tasks for multitask models)")
    p.add_argument("--each-task", action="store_true", help="task table: also attack each task alone")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. test.split=train")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Check every input, then compute and write; returns {analysis: result dict}."""
    cfg = load_config(args.config, args.overrides)
    if args.num_images is not None and args.num_images < 1:
        raise SetupError(f"--num-images must be >= 1, got {args.num_images}")
    from datasets import build_dataset
    from engine import output_dimension as od
    from engine.common import setup_runtime
    from engine.evaluator import checkpoint_path, target_tasks
    from engine.protocols import build_protocol
    from models import build_model
    from models.weights import load_model_weights

    sizes = od.parse_sizes(args.sizes) if args.sizes is not None else None
    analyses = None
    if args.analyses is not None:
        analyses = [a.strip() for a in args.analyses.split(",") if a.strip()]
        bad = [a for a in analyses if a not in ANALYSES]
        if bad or not analyses:
            raise SetupError(f"--analyses {args.analyses!r}: choose from {', '.join(ANALYSES)}")
    ckpt = args.checkpoint or checkpoint_path(cfg)
    key = "--checkpoint" if args.checkpoint else "test.checkpoint"
    if not os.path.isfile(ckpt):
        raise SetupError(f"{key}: checkpoint not found: {ckpt}")
    out = args.out or os.path.join(cfg.exp_dir, "output_dimension")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SetupError(f"--out {out}: is a file; give a folder")
    model = build_model(cfg)
    load_model_weights(model, ckpt, key=key)
    multitask = bool(getattr(model, "multitask", False))
    if analyses is None:
        analyses = ["grad", "acc"] + (["tasks"] if multitask else [])
    if "tasks" in analyses and not multitask:
        raise SetupError(f"--analyses tasks needs a multitask model (model.name {cfg.model.name} is not)")
    device = setup_runtime(cfg)
    model = model.to(device).eval()
    dataset = build_dataset(cfg, cfg.test.split)
    if len(dataset) == 0:
        raise SetupError(f"test.split {cfg.test.split}: no images")
    num_images = args.num_images if args.num_images is not None else cfg.test.num_images
    h, w = dataset[0]["label"].shape[-2:]
    if sizes is None:
        sizes = od.default_sizes(h * w)
    elif max(sizes) > h * w:
        raise SetupError(f"--sizes: {max(sizes)} exceeds the {h}x{w} = {h * w} pixels of the images")

    def groups():
        return od.iterate_groups(dataset, cfg.test.batch_size, num_images, cfg.data.workers, cfg.seed)
    common = {"config": args.config, "checkpoint": ckpt, "split": cfg.test.split, "model": cfg.model.name}
    results = {}
    ignore = cfg.data.ignore_label
    # the evaluated inference (sliding window with test.crop_size) under the whole protocol; the model on
    # the whole image otherwise (semseg attacks windows separately: no single image to differentiate)
    inference = build_protocol(cfg, model, device).forward if cfg.test.protocol == "whole" else model
    if "grad" in analyses:
        results["grad"] = {**od.grad_norm_vs_m(model, groups(), sizes, cfg.seed, ignore, device, inference),
                           **common}
    if "acc" in analyses:
        results["acc"] = {**od.robust_accuracy_vs_m(model, groups(), sizes, cfg.seed, ignore, device=device,
                                                    inference=inference), **common}
    os.makedirs(out, exist_ok=True)  # first write: every check above has passed
    if "grad" in results:
        od.write_json(results["grad"], os.path.join(out, "grad_norm.json"))
        od.plot_grad_norm(results["grad"], os.path.join(out, "grad_norm.png"))
    if "acc" in results:
        od.write_json(results["acc"], os.path.join(out, "robust_accuracy.json"))
        od.plot_robust_accuracy(results["acc"], os.path.join(out, "robust_accuracy.png"))
    if "tasks" in analyses:
        sets = od.task_sets(model.tasks, target_tasks(dataset), model.main_output, args.each_task)
        table = {**od.task_attack_table(args.config, args.overrides, os.path.abspath(ckpt), os.path.abspath(out),
                                        sets, num_images), **common}
        od.write_json(table, os.path.join(out, "task_attacks.json"))
        text = od.table_markdown(table)
        with open(os.path.join(out, "task_attacks.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        results["tasks"] = table
    print(f"wrote {out}")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    """Exit code: 0 done, 2 bad input (one line on stderr)."""
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except SetupError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
