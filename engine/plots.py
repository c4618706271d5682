"""Robustness curves and per-class charts of an evaluation, drawn from metrics.json data.

Nothing here imports torch, and matplotlib is imported only when a figure is drawn, so
``tools/compare_curves.py`` starts fast and an evaluation still writes robustness.json (and its
tensorboard scalars) on a machine without matplotlib.

robustness.json (``robustness_curves``)::

    {"eps_unit": "1/255",
     "attacks": {"<label>": [{"eps": 0.0, "mIoU": f, "aAcc": f}, {"eps": 4.0, ...}, ...], ...},
     "worst_case": [{"eps": 0.0, "mIoU": f, "aAcc": f}, ...]}

One curve per attack label of metrics.json ("pgd@8" -> "pgd"; ensembles "sea" and their members
"sea/apgd-ce" too) and the worst case over every attack; points sorted by eps, the first at eps 0
being the clean result (the same for every curve). Values are copied from metrics.json; a value
that is not a finite number there (NaN: no class present) is null.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from utils.atomic import atomic_write

POINT_KEYS = ("mIoU", "aAcc")
Point = Dict[str, Optional[float]]  # {"eps": f, "mIoU": f|None, "aAcc": f|None}


def _value(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _point(eps: float, m: dict) -> Point:
    return {"eps": float(eps), **{k: _value(m.get(k)) for k in POINT_KEYS}}


def robustness_curves(metrics: dict) -> Optional[dict]:
    """The robustness.json dict of a metrics.json dict (module docstring); None without attacks."""
    if not metrics.get("attacks") and not metrics.get("worst_case"):
        return None
    clean = _point(0.0, metrics["clean"])
    attacks: Dict[str, List[Point]] = {}
    for key, m in metrics.get("attacks", {}).items():
        label, eps = key.rsplit("@", 1)
        attacks.setdefault(label, []).append(_point(float(eps), m))
    worst = [_point(float(e), m) for e, m in metrics.get("worst_case", {}).items()]
    # numeric order: the keys are strings ("16" sorts before "4")
    return {"eps_unit": "1/255",
            "attacks": {k: [clean] + sorted(v, key=lambda p: p["eps"]) for k, v in attacks.items()},
            "worst_case": [clean] + sorted(worst, key=lambda p: p["eps"])}


def curve_series(curves: dict) -> Dict[str, List[Point]]:
    """Every curve of a robustness.json dict by its name: the attack labels, then "worst_case"."""
    return {**curves["attacks"], "worst_case": curves["worst_case"]}


def _figure(width: float, height: float, ncols: int = 1):
    """A matplotlib Figure on the Agg canvas (no display needed) and its axes."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _nan(v: Optional[float]) -> float:
    return float("nan") if v is None else float(v)  # None -> a gap in the line / no bar


def draw_series(series: Dict[str, List[Point]], title: str, highlight: Optional[str] = None):
    """Two panels (mIoU, aAcc vs eps), one line per entry of `series` (labelled with its key; line
    data = the points' values, None as NaN); `highlight` is drawn thick and black. Returns the Figure."""
    fig, axes = _figure(11, 4.2, 2)
    for ax, key in zip(axes, POINT_KEYS):
        for name, points in series.items():
            style = dict(color="black", linewidth=2.5, linestyle="--") if name == highlight else dict(linewidth=1.5)
            ax.plot([p["eps"] for p in points], [_nan(p[key]) for p in points], marker="o", markersize=4,
                    label=name, **style)
        ax.set_xlabel("eps (1/255)")
        ax.set_ylabel(key)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    return fig


def save_figure(fig, path: str) -> None:
    """Write a Figure as PNG through a temporary file, so `path` is complete or untouched."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)


def plot_curves(curves: dict, path: Optional[str] = None):
    """robustness.png from the robustness.json dict `curves`: one line per attack plus the worst
    case (dashed, black); written to `path` when given. Returns the Figure."""
    fig = draw_series(curve_series(curves), "robustness: clean at eps 0, attacked above", highlight="worst_case")
    if path:
        save_figure(fig, path)
    return fig


def plot_per_class(metrics: dict, path: Optional[str] = None):
    """per_class.png from a metrics.json dict: per class, bars of the clean IoU and of the worst-case
    IoU at each eps (``iou_per_class``; null, a class absent from labels and predictions, leaves a
    gap). Bar containers are labelled "clean" and "worst case eps <e>". Returns the Figure; None
    without a worst case."""
    worst = metrics.get("worst_case", {})
    if not worst:
        return None
    names: Sequence[str] = metrics["class_names"]
    runs = [("clean", metrics["clean"]["iou_per_class"])] + [
        (f"worst case eps {e}", worst[e]["iou_per_class"]) for e in sorted(worst, key=float)]
    n, k = len(names), len(runs)
    width = 0.8 / k
    fig, (ax,) = _figure(min(60.0, max(8.0, 0.16 * n * k + 2)), 4.5)
    for j, (label, iou) in enumerate(runs):
        x = [c + (j - (k - 1) / 2) * width for c in range(n)]
        ax.bar(x, [_nan(v) for v in iou], width, label=label)
        for xc, v in zip(x, iou):
            if v is None:  # tells an absent class (no bar) from an IoU of 0 (no visible bar either)
                ax.text(xc, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small", color="grey")
    ax.set_xticks(range(n))
    ax.set_xticklabels(names, rotation=90 if n > 8 else 0, fontsize="small")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("per-class IoU, clean and worst case over the attacks\n(n/a: class in neither labels nor predictions)")
    if path:
        save_figure(fig, path)
    return fig


def eps_steps(curves: dict) -> int:
    """The factor that makes every eps of `curves` an integer tensorboard step: 1, 10, 100 or 1000
    (tensorboard steps are integers; 0.5/255 would otherwise land on step 0)."""
    eps = [p["eps"] for pts in curve_series(curves).values() for p in pts]
    for scale in (1, 10, 100):
        if all(abs(e * scale - round(e * scale)) < 1e-6 for e in eps):
            return scale
    return 1000


def write_curve_scalars(curves: dict, writer) -> str:
    """Tensorboard scalars ``robustness/<curve>/<mIoU|aAcc>`` at step = eps (in 1/255); with non-integer
    radii the step is eps x 10^k and the prefix ``robustness_eps_x<10^k>``. Returns the prefix."""
    scale = eps_steps(curves)
    prefix = "robustness" if scale == 1 else f"robustness_eps_x{scale}"
    for name, points in curve_series(curves).items():
        for p in points:
            for key in POINT_KEYS:
                if p[key] is not None:
                    writer.add_scalar(f"{prefix}/{name}/{key}", p[key], int(round(p["eps"] * scale)))
    return prefix


def _check_points(points, where: str) -> None:
    """Raise ValueError unless `points` is a list of {eps: number >= 0, mIoU: fraction|null, aAcc:
    fraction|null} (a fraction: a finite number in [0, 1]; NaN, Infinity and percentages are refused)."""
    if not isinstance(points, list) or not points:
        raise ValueError(f"{where} must be a non-empty list of points")
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not isinstance(p.get("eps"), (int, float)) or isinstance(p.get("eps"), bool) \
                or any(k not in p or not (p[k] is None or isinstance(p[k], (int, float))) for k in POINT_KEYS):
            raise ValueError(f"{where}: point {p!r} is not {{eps: number, mIoU: number|null, aAcc: number|null}}")
        if not math.isfinite(p["eps"]) or p["eps"] < 0:
            raise ValueError(f"{where}: point {i}: 'eps' is {p['eps']!r}, not a finite number >= 0")
        for k in POINT_KEYS:
            v = p[k]
            if v is not None and (isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1):
                raise ValueError(f"{where}: point {i}: '{k}' is {v!r}, not a fraction in [0, 1] or null")


def read_curves(path: str) -> dict:
    """A robustness.json written by an evaluation, checked; SetupError naming `path` if it is
    missing, not JSON or not of that shape."""
    import json

    from utils.errors import SetupError
    try:
        with open(path) as f:
            curves = json.load(f)
    except FileNotFoundError:
        raise SetupError(f"{path}: not found (run test.py with test.attacks set first)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SetupError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None
    try:
        if not isinstance(curves, dict) or not isinstance(curves.get("attacks"), dict):
            raise ValueError("no 'attacks' mapping")
        _check_points(curves.get("worst_case"), "'worst_case'")
        for name, points in curves["attacks"].items():
            _check_points(points, f"attack '{name}'")
    except ValueError as e:
        raise SetupError(f"{path}: not a robustness.json ({e})") from None
    return curves
