"""Store leases (one sender per gateway): exclusive while renewed, free once the holder stops
renewing (a dead process), on SQLite and PostgreSQL."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from store.leases import LeaseTimeout, SlotLease, StoreLease


class Clock:
    def __init__(self):
        self.t = datetime(2030, 1, 1)

    def __call__(self) -> datetime:
        return self.t


def test_exclusive_until_expired_or_released(engine):
    clock = Clock()
    a = StoreLease(engine, "gateway-x", "a", ttl_s=30, clock=clock)
    b = StoreLease(engine, "gateway-x", "b", ttl_s=30, clock=clock)
    assert a.try_acquire() and not b.try_acquire()
    assert a.try_acquire()  # its own holder takes it again (a retry of the same task run)
    clock.t += timedelta(seconds=20)
    assert a.renew() and not b.try_acquire()
    clock.t += timedelta(seconds=29)
    assert not b.try_acquire()  # renewed 29 s ago: still a's
    clock.t += timedelta(seconds=2)
    assert b.try_acquire()  # a stopped renewing: b takes over
    assert not a.renew() and a.lost  # a learns it lost the lease
    b.release()
    assert a.try_acquire()
    assert StoreLease(engine, "gateway-y", "b", clock=clock).try_acquire()  # names are independent


def test_slot_leases_admit_as_many_holders_as_slots_and_free_a_dead_ones_slot(engine):
    clock = Clock()
    a, b, c = (SlotLease(engine, "gateway-z", h, slots=2, ttl_s=30, clock=clock) for h in "abc")
    assert a.try_acquire() and b.try_acquire() and not c.try_acquire()
    assert {a.name, b.name} == {"gateway-z", "gateway-z#1"}
    clock.t += timedelta(seconds=20)
    assert a.renew()  # b stops renewing (killed)
    clock.t += timedelta(seconds=11)
    assert c.try_acquire() and c.name == b.name and not b.renew()
    assert not SlotLease(engine, "gateway-z", "d", slots=2, clock=clock).try_acquire()
    # a single-slot lease is the plain gateway lease: a sender of an old version waits for it too
    assert not StoreLease(engine, "gateway-z", "e", clock=clock).try_acquire()


def test_waiting_times_out_with_a_clear_error(engine):
    StoreLease(engine, "gateway-x", "a", ttl_s=30).try_acquire()
    with pytest.raises(LeaseTimeout, match="gateway-x"):
        StoreLease(engine, "gateway-x", "b", poll_s=0.05, timeout_s=0.3).acquire()


def test_heartbeat_keeps_the_lease_while_the_block_runs(engine):
    with StoreLease(engine, "gateway-x", "a", ttl_s=0.6) as held:
        time.sleep(1.5)  # longer than the ttl: only the heartbeat keeps it
        assert not StoreLease(engine, "gateway-x", "b", ttl_s=0.6).try_acquire()
        assert not held.lost
    assert StoreLease(engine, "gateway-x", "b").try_acquire()  # released on exit


_HOLDER = """
import sys, time
from store.db import get_engine
from store.leases import StoreLease
with StoreLease(get_engine(sys.argv[1]), "gateway-x", "doomed", ttl_s=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_holder_killed_with_sigkill_loses_the_lease_by_itself(any_store):
    from store.db import get_engine

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, any_store, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert not StoreLease(get_engine(any_store), "gateway-x", "next").try_acquire()
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        t0 = time.monotonic()
        StoreLease(get_engine(any_store), "gateway-x", "next", poll_s=0.1, timeout_s=10).acquire()
        assert time.monotonic() - t0 <= 5.0  # one ttl (3 s) after the last renewal, plus polling and a loaded machine
    finally:
        p.kill()


_PG_ADVISORY = """
import sys, time
from sqlalchemy import text
from store.db import get_engine
from tasks.journey import _LOCK_KEY
with get_engine(sys.argv[1]).begin() as c:
    c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    print("held", flush=True)
    time.sleep(600)
"""

_SQLITE_WRITER = """
import sys, time
from sqlalchemy import text
from store.db import get_engine
with get_engine(sys.argv[1]).begin() as c:  # BEGIN IMMEDIATE: the write lock
    c.execute(text("UPDATE leases SET holder = holder"))
    print("held", flush=True)
    time.sleep(600)
"""


def test_locks_of_a_process_killed_with_sigkill_are_free_at_once(any_store):
    """The journey processor's PostgreSQL advisory lock and SQLite's write lock (every claim takes
    it) belong to the connection: a killed holder's connection closes and the lock is free."""
    from sqlalchemy import text

    from store.db import get_engine, is_postgres
    from tasks.journey import _LOCK_KEY

    engine = get_engine(any_store)
    with engine.connect() as c:
        pg = is_postgres(c)
    p = subprocess.Popen([sys.executable, "-c", _PG_ADVISORY if pg else _SQLITE_WRITER, any_store],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        if pg:
            with engine.begin() as c:
                assert c.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _LOCK_KEY}).scalar() is False
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        t0 = time.monotonic()
        with engine.begin() as c:
            if pg:
                c.execute(text("SET LOCAL lock_timeout = '5s'"))
                c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
            else:
                c.execute(text("UPDATE leases SET holder = holder"))
        assert time.monotonic() - t0 < 5
    finally:
        p.kill()
