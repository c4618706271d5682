"""Name -> builder registries, one per kind (models, datasets, attacks, defenses)."""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Iterable

from .errors import SetupError


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint for a misspelled name, or ''."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry:
    """A dict of named builders filled by a decorator: ``@MODELS.register("pspnet")``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn
        return deco

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise SetupError(f"unknown {self.kind} '{name}'{closest(name, self._items)}; "
                             f"valid: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
