"""Defer running modules that a process imports but may never use (the standard library's ``LazyLoader``).

Great Expectations imports ``altair`` and ``scipy.stats`` when it is imported (for one expectation's chart and
two distribution tests the extract checks never run): ~1 s of its ~2.4 s import on a slow machine, spent
before a 1,000-contact preview can check its first row. ``defer("altair", "scipy.stats")`` makes the next
import of each name return a module whose code runs at its first attribute access instead, so a process that
never touches them never pays for them, and one that does gets the real module, only later.

Used only in single-threaded worker processes: on Python 3.11 two threads touching a deferred module for the
first time at once can see it half-run (CPython gh-114763).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

__all__ = ["defer", "deferred"]


class _Deferring(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)  # once: a deferred module that ran is imported as usual again (reload)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        # only plain source modules: an extension module's create_module does the work LazyLoader would defer
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


_FINDER = _Deferring()


def defer(*names: str) -> list[str]:
    """Defer the given absolute module names not imported yet; returns those deferred."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    todo = [n for n in names if n not in sys.modules]
    _FINDER.names.update(todo)
    return todo


def deferred(name: str) -> bool:
    """Whether ``name`` is imported but its code has not run yet."""
    module = sys.modules.get(name)
    # type(), not isinstance: reading any attribute of a deferred module (__class__ too) runs it
    return module is not None and type(module).__name__ == "_LazyModule"
