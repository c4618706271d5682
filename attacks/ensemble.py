"""Attack ensembles (SEA, sea+) and the expansion of ``test.attacks`` entries into attack groups.

A group is one reported result: a single attack, or an ensemble whose members are all run on every
image and combined by the worst case per image (``utils.metrics.worst_case``).

``test.attacks`` entries:
  "sea"                                        a named ensemble (``ENSEMBLES``)
  {name: sea, steps: 100}                      the same, with options overriding every member's
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
# sea+: SEA plus the two APGD losses of Halmosi et al. (field.md §1.5), run with SEA's settings (PRR
# on; Halmosi's own runs use a constant radius).
SEA_PLUS: List[Member] = SEA + [
    ("apgd-segpgd", "apgd", dict(_SEA_COMMON, loss="segpgd")),
    ("apgd-mask-norm-corrlog", "apgd", dict(_SEA_COMMON, loss="mask-norm-corrlog")),
]
ENSEMBLES: Dict[str, List[Member]] = {"sea": SEA, "sea+": SEA_PLUS}
USER_ENSEMBLE = "ensemble"


@dataclass
class AttackGroup:
    """One reported result: ``members`` run on every image, worst case over them when more than one."""
    label: str
    members: List[Member] = field(default_factory=list)

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


def expand_attacks(entries: Sequence[Union[str, dict]], where: str = "test.attacks") -> List[AttackGroup]:
    """Turn ``test.attacks`` entries into attack groups (module docstring); labels must be unique."""
    groups: List[AttackGroup] = []
    for i, entry in enumerate(entries or []):
        at = f"{where}[{i}]"
        name = entry if isinstance(entry, str) else (entry.get("name") if isinstance(entry, dict) else None)
        if name in ENSEMBLES:
            over = {k: v for k, v in entry.items() if k not in ("name", "label")} if isinstance(entry, dict) else {}
            label = entry.get("label", name) if isinstance(entry, dict) else name
            members = [(lab, att, dict(opts, **over)) for lab, att, opts in ensemble_members(name)]
            groups.append(AttackGroup(str(label), members))
        elif name == USER_ENSEMBLE:
            if "members" not in entry or not entry["members"]:
                raise SetupError(f"{at}: a user ensemble needs a non-empty 'members' list")
            extra = set(entry) - {"name", "label", "members"}
            if extra:
                raise SetupError(f"{at}: unknown key(s) {', '.join(sorted(extra))}; valid: name, label, members")
            members = [_single(m, f"{at}.members[{j}]") for j, m in enumerate(entry["members"])]
            groups.append(AttackGroup(str(entry.get("label", USER_ENSEMBLE)), members))
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
