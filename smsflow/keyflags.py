"""A compact map from text keys (CRM ids) to one flag each, for millions of keys.

A ``dict[str, bool]`` of 10M CRM ids holds ~1 GB of Python objects for the whole extract. This keeps each
key as two independent 64-bit hashes (pandas' SipHash-based ``hash_array`` with two different keys) and its
flag in sorted numpy arrays: 17 bytes a key. Two different keys are taken for one only when both hashes
collide (about 1e-25 for 10M keys), so the map is exact for every practical purpose.

Updates come in batches; each batch becomes a sorted run, and runs of similar size are merged (a
log-structured merge), so that adding N keys costs O(N log N) in all and a lookup searches a few runs.
The newest run wins for a key updated more than once.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

_KEY1 = "smsflow-keyflag1"  # pandas' hash key: 16 characters
_KEY2 = "smsflow-keyflag2"


def _hashes(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(keys, dtype=object)
    return (pd.util.hash_array(arr, hash_key=_KEY1, categorize=False),
            pd.util.hash_array(arr, hash_key=_KEY2, categorize=False))


class _Run:
    """Keys sorted by their first hash, with their flags; a key set twice is kept once (the later flag),
    except inside the rare group of keys sharing a first hash, where :meth:`find` takes the later."""

    __slots__ = ("h1", "h2", "flag")

    def __init__(self, h1: np.ndarray, h2: np.ndarray, flag: np.ndarray):
        order = np.argsort(h1, kind="stable")  # of equal keys the later one stays later
        h1, h2, flag = h1[order], h2[order], flag[order]
        last = np.ones(len(h1), dtype=bool)
        if len(h1) > 1:
            last[:-1] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
        self.h1, self.h2, self.flag = h1[last], h2[last], flag[last]

    def __len__(self) -> int:
        return len(self.h1)

    @classmethod
    def merged(cls, old: "_Run", new: "_Run") -> "_Run":
        """The two runs as one, the newer flag kept for a key in both: a merge of two sorted runs, so the
        only memory it needs besides the result is an index over the new run (no sort of the whole)."""
        again = old.find(new.h1, new.h2)
        if (again >= 0).any():  # keys set again (a re-import): their old entries go
            keep = np.ones(len(old), dtype=bool)
            keep[again[again >= 0]] = False
            old = cls.__new__(cls)._of(old.h1[keep], old.h2[keep], old.flag[keep])
        n = len(old) + len(new)
        at = np.searchsorted(old.h1, new.h1, side="right") + np.arange(len(new))
        is_new = np.zeros(n, dtype=bool)
        is_new[at] = True
        out = cls.__new__(cls)._of(np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.uint64), np.empty(n, dtype=bool))
        for mine, theirs, dst in ((old.h1, new.h1, out.h1), (old.h2, new.h2, out.h2), (old.flag, new.flag, out.flag)):
            dst[at] = theirs
            dst[~is_new] = mine
        return out

    def _of(self, h1: np.ndarray, h2: np.ndarray, flag: np.ndarray) -> "_Run":
        self.h1, self.h2, self.flag = h1, h2, flag
        return self

    def find(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Position of each key in the run, -1 where it is not there."""
        lo = np.searchsorted(self.h1, h1, side="left")
        hi = np.searchsorted(self.h1, h1, side="right")
        pos = np.full(len(h1), -1, dtype=np.int64)
        one = (hi - lo) == 1
        hit = one.copy()
        hit[one] = self.h2[lo[one]] == h2[one]
        pos[hit] = lo[hit]
        for i in np.flatnonzero((hi - lo) > 1):  # the same first hash for several keys: rare
            match = np.flatnonzero(self.h2[lo[i]:hi[i]] == h2[i])
            if len(match):
                pos[i] = lo[i] + match[-1]
        return pos


class KeyFlags:
    """``known, flags = kf.get(keys)``: whether each key was set and its flag; ``kf.set(keys, flags)``."""

    def __init__(self) -> None:
        self._runs: list[_Run] = []

    def __len__(self) -> int:
        """Stored entries (a key updated in two unmerged runs counts twice)."""
        return sum(len(r) for r in self._runs)

    def set(self, keys: Sequence[str], flags) -> None:
        if len(keys):
            self._add(*_hashes(keys), flags)

    def exchange(self, keys: Sequence[str], flags) -> tuple[np.ndarray, np.ndarray]:
        """``get(keys)`` and then ``set(keys, flags)``, hashing the keys once."""
        if not len(keys):
            return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
        h1, h2 = _hashes(keys)
        out = self._get(h1, h2)
        self._add(h1, h2, flags)
        return out

    def _add(self, h1: np.ndarray, h2: np.ndarray, flags) -> None:
        self._runs.append(_Run(h1, h2, np.asarray(flags, dtype=bool)))
        while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
            new, old = self._runs.pop(), self._runs.pop()
            self._runs.append(_Run.merged(old, new))

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not len(keys) or not self._runs:
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=bool)
        return self._get(*_hashes(keys))

    def _get(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(h1)
        known = np.zeros(n, dtype=bool)
        flags = np.zeros(n, dtype=bool)
        if not self._runs:
            return known, flags
        order = np.argsort(h1, kind="stable")  # sorted needles: numpy's binary search reuses its last bounds
        h1, h2 = h1[order], h2[order]
        for run in reversed(self._runs):  # newest first
            todo = np.flatnonzero(~known)
            if not len(todo):
                break
            pos = run.find(h1[todo], h2[todo])
            hit = pos >= 0
            known[todo[hit]] = True
            flags[todo[hit]] = run.flag[pos[hit]]
        out_known, out_flags = np.empty(n, dtype=bool), np.empty(n, dtype=bool)
        out_known[order], out_flags[order] = known, flags
        return out_known, out_flags
