"""Overlay the robustness curves of several evaluations in one PNG.

``python3 tools/compare_curves.py EXP_OR_RESULT_DIR [...] --out FILE.png [--attack worst_case] [--labels a,b,...]``

Each argument is an experiment folder (its ``result/robustness.json`` is read), a result folder
holding ``robustness.json`` (e.g. ``result/<checkpoint>/`` of a folder of checkpoints) or the JSON
file itself. One line per evaluation of the curve ``--attack`` (default: the worst case over every
attack; else an attack label of robustness.json, e.g. ``pgd`` or ``sea``), mIoU and aAcc against
eps. Lines are named by ``--labels`` or by the experiment folder. A missing or broken file, an
unknown curve or a wrong number of labels: one-line error naming it, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.plots import Point, draw_series, read_curves, save_figure  # noqa: E402
from utils.errors import SetupError  # noqa: E402

WORST = "worst_case"


def curves_file(arg: str) -> str:
    """The robustness.json that a command-line argument names (see the module docstring)."""
    if os.path.isdir(arg):
        direct = os.path.join(arg, "robustness.json")
        return direct if os.path.exists(direct) else os.path.join(arg, "result", "robustness.json")
    return arg


def default_label(path: str) -> str:
    """The experiment folder's name: .../<exp>/result/robustness.json -> <exp>."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "result":
        folder = os.path.dirname(folder)
    return os.path.basename(folder)


def compare(args: Sequence[str], out: Optional[str], attack: str = WORST, labels: Optional[List[str]] = None):
    """Read every robustness.json, then draw (and write to `out` when given) one line per evaluation
    of curve `attack`; returns the Figure. Raises SetupError before writing anything."""
    files = [curves_file(a) for a in args]
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise SetupError(f"--out {out}: folder {os.path.dirname(os.path.abspath(out))} does not exist")
    if out and os.path.isdir(out):
        raise SetupError(f"--out {out}: is a folder; give a .png file name")
    if labels is not None and len(labels) != len(files):
        raise SetupError(f"--labels: {len(labels)} labels for {len(files)} experiments")
    series: Dict[str, List[Point]] = {}
    for i, path in enumerate(files):
        curves = read_curves(path)
        points = curves[WORST] if attack == WORST else curves["attacks"].get(attack)
        if points is None:
            raise SetupError(f"{path}: no curve '{attack}' (has: {', '.join([WORST, *curves['attacks']])})")
        name = labels[i] if labels is not None else default_label(path)
        if name in series:  # two experiment folders of the same name
            name = f"{name} ({i + 1})"
        series[name] = points
    fig = draw_series(series, f"{attack.replace('_', ' ')}: clean at eps 0, attacked above")
    if out:
        save_figure(fig, out)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (2 with a one-line message for bad input)."""
    p = argparse.ArgumentParser(prog="compare_curves.py", description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", help="experiment folders, result folders or robustness.json files")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--attack", default=WORST, help="curve to compare: worst_case (default) or an attack label")
    p.add_argument("--labels", default=None, help="comma-separated line names, one per experiment")
    a = p.parse_args(argv)
    try:
        compare(a.experiments, a.out, a.attack, a.labels.split(",") if a.labels is not None else None)
    except (SetupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
