"""Attack ensembles (sea, rse, sea+) and the expansion of ``test.attacks`` entries into attack groups.

A group is one reported result: a single attack, or an ensemble whose members are all run on every
image and combined by the worst case per image (``utils.metrics.worst_case``). With
``skip_solved: true`` on an ensemble entry, the members (in their order) skip every image that an
earlier member brought to 0 pixel accuracy; the evaluator fills that member's row of the image with
the solving member's counts (engine/evaluator.py) and metrics.json reports the passes not spent.

``test.attacks`` entries:
  "sea"                                        a named ensemble (``ENSEMBLES``)
  {name: sea, steps: 100}                      the same, with options overriding every member's
  {name: sea+, skip_solved: true}              the same, members skipping images already at 0 accuracy
  {name: apgd, loss: js, steps: 50, label: x}  a single registered attack with options (label optional)
  {name: ensemble, label: mine, members: [...]}  a user ensemble; members are entries of the two
                                               previous kinds (names or mappings of single attacks)
Options are in config units (eps, alpha in 1/255); eps comes from ``test.eps`` and is added by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

from utils.errors import SetupError
from utils.registry import closest

from .registry import ATTACKS

Member = Tuple[str, str, dict]  # (label, attack name, options)

_SEA_COMMON = {"steps": 300, "prr": True, "random_start": True, "early_stop": True}

# SEA (sea.md §1.1): this order; mask-ce-bal first is also SEA's greedy start (ours starts at the best).
SEA: List[Member] = [
    ("apgd-mask-ce-bal", "apgd", dict(_SEA_COMMON, loss="mask-ce-bal")),
    ("apgd-mask-ce", "apgd", dict(_SEA_COMMON, loss="mask-ce")),
    ("apgd-js", "apgd", dict(_SEA_COMMON, loss="js")),
]
# rse: Halmosi et al.'s set with their settings and names (rse/__init__.py; field.md §1.5): APGD at a
# constant radius, 300 iterations, random start, four losses; PAdam-Cos and PAdam-CE, 200 steps of lr
# 2/255; DAG with gamma 0.003 and 0.001, 200 iterations, in the eps ball (attacks/dag.py). PDPGD and
# ALMA-prox are not built. Order = expected strength (what the budget skip relies on): the SEA losses
# first (the strongest on robust models in both papers), then PAdam (the strongest on normal models,
# Halmosi et al.), then DAG (a minimum-norm attack held to the eps ball). Early stop on where it
# exists: it never changes a result (apgd.py's FREEZE, dag.py), only the passes spent. Difference:
# their APGD with mask-norm-corrlog also tracks that loss for its step control; ours tracks the CE.
_RSE_APGD = {"steps": 300, "prr": False, "random_start": True, "early_stop": True}
_PADAM = {"steps": 200, "alpha": 2.0}
_DAG = {"steps": 200}
RSE: List[Member] = [
    ("mask-ce-avg-apgd", "apgd", dict(_RSE_APGD, loss="mask-ce")),
    ("js-avg-apgd", "apgd", dict(_RSE_APGD, loss="js")),
    ("segpgd-loss-apgd", "apgd", dict(_RSE_APGD, loss="segpgd")),
    ("mask-norm-corrlog-avg-apgd", "apgd", dict(_RSE_APGD, loss="mask-norm-corrlog")),
    ("cos-padam", "padam", dict(_PADAM, loss="cos")),
    ("ce-padam", "padam", dict(_PADAM, loss="ce")),
    ("dag-003", "dag", dict(_DAG, gamma=0.003)),
    ("dag-001", "dag", dict(_DAG, gamma=0.001)),
]
# sea+: the union of both, SEA's members first; each member draws the random starts of the ensemble
# that defines it (SEED_ORIGIN), so on the same images sea+ gives sea's and rse's results run for run.
SEA_PLUS: List[Member] = SEA + RSE
ENSEMBLES: Dict[str, List[Member]] = {"sea": SEA, "rse": RSE, "sea+": SEA_PLUS}
# The ensemble whose random draws a member of a named ensemble uses (default: its own).
SEED_ORIGIN: Dict[str, Dict[str, str]] = {
    "sea+": {**{m[0]: "sea" for m in SEA}, **{m[0]: "rse" for m in RSE}},
}
# The ensemble option that skips, per image, the members after one that brought it to 0 pixel accuracy
SKIP_SOLVED = "skip_solved"
USER_ENSEMBLE = "ensemble"


@dataclass
class AttackGroup:
    """One reported result: ``members`` run on every image, worst case over them when more than one."""
    label: str
    members: List[Member] = field(default_factory=list)
    skip_solved: bool = False  # members skip the images an earlier member brought to 0 pixel accuracy
    seed_groups: Dict[str, str] = field(default_factory=dict)  # member label -> ensemble of its draws

    def seed_label(self, member: str, eps: str) -> str:
        """The label seeding a member's random draws at `eps` ("<ensemble>/<member>@<eps>"): a named
        ensemble's member draws as in the ensemble that defines it (``SEED_ORIGIN``), whatever the
        entry's label; other members as their metrics.json key."""
        if not self.is_ensemble:
            return f"{member}@{eps}"
        return f"{self.seed_groups.get(member, self.label)}/{member}@{eps}"

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1


def ensemble_members(name: str) -> List[Member]:
    """Members (label, attack name, options) of a named ensemble; copies, safe to modify."""
    if name not in ENSEMBLES:
        raise SetupError(f"unknown ensemble '{name}'{closest(name, ENSEMBLES)}; valid: {', '.join(sorted(ENSEMBLES))}")
    return [(label, attack, dict(opts)) for label, attack, opts in ENSEMBLES[name]]


def needs_class_weights(options: dict) -> bool:
    """True when a member uses the balanced loss and has no ``class_weights`` yet (the caller adds them)."""
    return options.get("loss") == "mask-ce-bal" and options.get("class_weights") is None


def _single(entry: Union[str, dict], where: str) -> Member:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry:
        raise SetupError(f"{where}: expected an attack name or a mapping with 'name', got {entry!r}")
    opts = dict(entry)
    name = opts.pop("name")
    label = str(opts.pop("label", name))
    if name in ENSEMBLES or name == USER_ENSEMBLE:
        raise SetupError(f"{where}: ensemble '{name}' cannot be a member of an ensemble")
    ATTACKS.get(name)  # unknown names list the valid ones
    return label, name, opts


def _skip_flag(entry: Union[str, dict], where: str) -> bool:
    """The entry's ``skip_solved`` (default false), checked to be true or false."""
    value = entry.get(SKIP_SOLVED, False) if isinstance(entry, dict) else False
    if not isinstance(value, bool):
        raise SetupError(f"{where}.{SKIP_SOLVED} must be true or false, got {value!r}")
    return value


def expand_attacks(entries: Sequence[Union[str, dict]], where: str = "test.attacks") -> List[AttackGroup]:
    """Turn ``test.attacks`` entries into attack groups (module docstring); labels must be unique."""
    groups: List[AttackGroup] = []
    for i, entry in enumerate(entries or []):
        at = f"{where}[{i}]"
        name = entry if isinstance(entry, str) else (entry.get("name") if isinstance(entry, dict) else None)
        if name in ENSEMBLES:
            over = {k: v for k, v in entry.items() if k not in ("name", "label", SKIP_SOLVED)} \
                if isinstance(entry, dict) else {}
            label = entry.get("label", name) if isinstance(entry, dict) else name
            members = [(lab, att, dict(opts, **over)) for lab, att, opts in ensemble_members(name)]
            origin = {lab: SEED_ORIGIN.get(name, {}).get(lab, name) for lab, _, _ in members}
            groups.append(AttackGroup(str(label), members, _skip_flag(entry, at), origin))
        elif name == USER_ENSEMBLE:
            if "members" not in entry or not entry["members"]:
                raise SetupError(f"{at}: a user ensemble needs a non-empty 'members' list")
            extra = set(entry) - {"name", "label", "members", SKIP_SOLVED}
            if extra:
                raise SetupError(f"{at}: unknown key(s) {', '.join(sorted(extra))}; "
                                 f"valid: name, label, members, {SKIP_SOLVED}")
            members = [_single(m, f"{at}.members[{j}]") for j, m in enumerate(entry["members"])]
            groups.append(AttackGroup(str(entry.get("label", USER_ENSEMBLE)), members, _skip_flag(entry, at)))
        else:
            member = _single(entry, at)
            groups.append(AttackGroup(member[0], [member]))
    labels = [g.label for g in groups]
    for g in groups:
        inner = [m[0] for m in g.members]
        if len(set(inner)) != len(inner):
            raise SetupError(f"{where}: ensemble '{g.label}' has repeated member labels {inner}; set 'label'")
    if len(set(labels)) != len(labels):
        raise SetupError(f"{where}: repeated labels {labels}; give entries distinct 'label' values")
    return groups
