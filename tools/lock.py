"""Write requirements.lock, the tested environment: every package that ``requirements-test.txt``
installs (its requirements and theirs, found in the installed packages' metadata) at its installed version.

Run it in the environment the test suite passed in (docs/environment.md)::

    python3 tools/lock.py            # writes requirements.lock
    python3 tools/lock.py --check    # exit code 1 when its pins are not the installed versions

Not locked: pip, setuptools and wheel (the installer's own tools), and the packages a CUDA build of torch
brings (nvidia-*, triton): torch is locked by its public version only, so its CPU or CUDA build stays the
machine's choice. A requirement that is not installed is an error naming it.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from typing import Dict, List, Tuple

from packaging.requirements import Requirement

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.env import LOCK, ROOT, canonical_name, public_version, read_lock  # noqa: E402

REQUIREMENTS = os.path.join(ROOT, "requirements-test.txt")
UNLOCKED = ("pip", "setuptools", "wheel")
UNLOCKED_PREFIXES = ("nvidia-", "triton")  # torch's CUDA packages: they follow its build


def read_requirements(path: str) -> List[Requirement]:
    """The requirements of a requirements file, following ``-r`` (relative to the file); constraint
    lines (``-c``), other options and comments are skipped."""
    reqs = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith(("-r ", "--requirement ")):
                reqs += read_requirements(os.path.join(os.path.dirname(path), line.split(None, 1)[1]))
            elif not line.startswith("-"):
                reqs.append(Requirement(line))
    return reqs


def locked(name: str) -> bool:
    """False for the packages the lock leaves out (module docstring)."""
    name = canonical_name(name)
    return name not in UNLOCKED and not name.startswith(UNLOCKED_PREFIXES)


def closure(reqs: List[Requirement]) -> Dict[str, str]:
    """{canonical name: installed public version} of `reqs` and everything they require (with the
    extras asked for, markers evaluated for this interpreter), less the unlocked packages."""
    found: Dict[str, str] = {}
    todo: List[Tuple[str, Tuple[str, ...]]] = [(r.name, tuple(sorted(r.extras))) for r in reqs
                                               if r.marker is None or r.marker.evaluate()]
    done = set()
    while todo:
        name, extras = todo.pop()
        if (canonical_name(name), extras) in done:
            continue
        done.add((canonical_name(name), extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise LookupError(f"{name} is required but not installed; install requirements-test.txt first") from None
        if locked(name):
            found[canonical_name(name)] = public_version(dist.version)
        for line in dist.requires or []:
            req = Requirement(line)
            # a requirement applies with no extra or with one of those asked for
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + extras):
                todo.append((req.name, tuple(sorted(req.extras))))
    return found


def lock_text(versions: Dict[str, str]) -> str:
    """The lock file: a header saying what it is and how it is refreshed, then one ``name==version`` a line."""
    py = ".".join(platform.python_version_tuple()[:2])
    header = f"""\
# The tested environment (Python {py}, {platform.system()} {platform.machine()}): every package that
# requirements-test.txt installs, at the version the test suite passed with. requirements.txt holds every
# install to it (-c), so README commands (a) and (b) install exactly these versions; the README's numbers
# were made with them. Written by tools/lock.py from the installed packages; to refresh it, in an
# environment where the tests pass: python3 tools/lock.py   (docs/environment.md)
# torch is locked by version only: its CPU or CUDA build, and the CUDA packages that come with it
# (nvidia-*, triton), stay the machine's choice. pip, setuptools and wheel are not locked.
"""
    return header + "".join(f"{name}=={versions[name]}\n" for name in sorted(versions))


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with requirements.lock instead of writing it")
    ap.add_argument("--out", default=LOCK, help="the file to write or check (default: requirements.lock)")
    args = ap.parse_args(argv)
    try:
        versions = closure(read_requirements(REQUIREMENTS))
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:  # the pins only: the header names the machine it was made on
        pins = read_lock(args.out)
        diff = {n: (pins.get(n), versions.get(n)) for n in sorted(set(pins) | set(versions))
                if pins.get(n) != versions.get(n)}
        if diff:
            print(f"{args.out} differs from the installed environment (name: locked, installed): "
                  + "; ".join(f"{n}: {a}, {b}" for n, (a, b) in diff.items())
                  + "; refresh it with python3 tools/lock.py", file=sys.stderr)
            return 1
        print(f"{args.out} matches the installed environment")
        return 0
    text = lock_text(versions)
    tmp = args.out + ".tmp"  # the old lock stays whole until the new one is on disk
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({text.count('==')} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
