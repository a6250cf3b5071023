"""smsflow/keyflags.py: the compact CRM id -> flag map the extract keeps for millions of contacts."""
from __future__ import annotations

import random

import numpy as np

import smsflow.keyflags as keyflags
from smsflow.keyflags import KeyFlags


def test_matches_a_dict_through_many_batches_updates_and_merges():
    rng = random.Random(7)
    kf, ref = KeyFlags(), {}
    for batch in range(80):
        keys = [f"C{rng.randint(0, 20_000):06d}" for _ in range(rng.randint(0, 800))]  # repeats inside a batch too
        flags = [rng.random() < 0.5 for _ in keys]
        asked = keys[::2] + [f"other-{rng.randint(0, 10**6)}" for _ in range(50)]
        known, got = kf.get(asked)
        assert known.tolist() == [k in ref for k in asked], batch
        assert got.tolist() == [ref.get(k, False) for k in asked], batch
        if batch % 2:
            k2, f2 = kf.exchange(keys, flags)
            expect = {}
            for k in keys:  # before the batch, whatever the batch sets
                expect.setdefault(k, (k in ref, ref.get(k, False)))
            assert list(zip(k2.tolist(), f2.tolist())) == [expect[k] for k in keys]
        else:
            kf.set(keys, flags)
        ref.update(zip(keys, flags))  # the batch's last row of a key wins
    assert len(kf._runs) < 12  # runs of similar size were merged
    assert kf.get([])[0].tolist() == [] and kf.exchange([], [])[0].tolist() == []


def test_keys_sharing_the_first_hash_are_told_apart_and_the_latest_flag_wins(monkeypatch):
    real = keyflags._hashes
    monkeypatch.setattr(keyflags, "_hashes", lambda keys: (np.zeros(len(keys), dtype=np.uint64), real(keys)[1]))
    kf = KeyFlags()
    kf.set(["a", "b", "a"], [True, False, False])
    kf.set(["c"], [True])
    kf.set(["b"], [True])
    known, flags = kf.get(["a", "b", "c", "d"])
    assert known.tolist() == [True, True, True, False]
    assert flags.tolist() == [False, True, True, False]


def test_a_key_set_again_is_stored_once_after_its_runs_merge():
    kf = KeyFlags()
    keys = [f"C{i}" for i in range(1000)]
    for round_ in range(6):  # a daily re-import of the same export
        kf.set(keys, [round_ % 2 == 0] * len(keys))
    assert len(kf) <= 2 * len(keys)
    kf.set(["x"], [True])
    kf.set(keys, [True] * len(keys))
    assert kf.get(keys)[1].all() and kf.get(["x"])[0].all()
    assert len(kf._runs) == 1 and len(kf) == len(keys) + 1
