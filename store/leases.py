"""Named leases in the store: a lock that expires unless its holder keeps renewing it.

Used where one process at a time must do something (one sender per gateway, so campaigns that
share a provider share its rate limit). A holder that dies (kill -9, a lost machine) stops
renewing, and the next taker gets the lease ``ttl_s`` seconds after the last renewal at most;
nothing has to notice the death. Works the same on SQLite and PostgreSQL, in one process or
across machines (``INSERT .. ON CONFLICT DO UPDATE .. WHERE expired``: one atomic statement).

Why not a Prefect global concurrency limit: its slots are leases of at least 60 s, reclaimed by
the server's repossessor loop (15 s), and the temporary API the CLI starts keeps its leases in
memory: a process killed there left ``active_slots = 1`` in the database for ever (measured on
Prefect 3.9.1: the next run waited more than 300 s).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import text

from store.db import utcnow

log = logging.getLogger("smsflow.lease")

_TAKE = text(
    "INSERT INTO leases (name, holder, acquired_at, expires_at) VALUES (:n, :h, :now, :exp) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, acquired_at = excluded.acquired_at, "
    "expires_at = excluded.expires_at WHERE leases.expires_at < :now OR leases.holder = :h RETURNING holder")


def process_holder(tag: str = "") -> str:
    """A holder id naming this host and process (and ``tag``, e.g. the task run)."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{tag}" if tag else "")


class LeaseTimeout(TimeoutError):
    pass


class StoreLease:
    """``with StoreLease(engine, name, holder):`` waits for the lease, renews it every ``ttl_s/3``
    from a daemon thread while the block runs, and releases it at the end."""

    def __init__(self, engine, name: str, holder: str, *, ttl_s: float = 30.0, poll_s: float = 0.5,
                 timeout_s: float | None = None, clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], None] = time.sleep):
        self.engine, self.name, self.holder = engine, name, holder
        self.ttl_s, self.poll_s, self.timeout_s = ttl_s, poll_s, timeout_s
        self._clock, self._sleep = clock, sleep
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False  # set when a renewal found the lease taken over (we were presumed dead)

    def try_acquire(self) -> bool:
        now = self._clock()
        with self.engine.begin() as conn:
            row = conn.execute(_TAKE, {"n": self.name, "h": self.holder, "now": now,
                                       "exp": now + timedelta(seconds=self.ttl_s)}).first()
        return row is not None

    def current(self) -> tuple[str, datetime] | None:
        with self.engine.begin() as conn:
            row = conn.execute(text("SELECT holder, expires_at FROM leases WHERE name = :n"), {"n": self.name}).first()
        return (row[0], row[1]) if row else None

    def acquire(self) -> None:
        started = time.monotonic()
        told = False
        while not self.try_acquire():
            if not told:
                held = self.current()
                log.info("%s is held by %s until %s (UTC); waiting", self.name, *(held or ("?", "?")))
                told = True
            if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
                raise LeaseTimeout(f"{self.name}: still held after {self.timeout_s:.0f}s")
            self._sleep(self.poll_s)

    def renew(self) -> bool:
        now = self._clock()
        with self.engine.begin() as conn:
            n = conn.execute(text("UPDATE leases SET expires_at = :exp WHERE name = :n AND holder = :h"),
                             {"exp": now + timedelta(seconds=self.ttl_s), "n": self.name, "h": self.holder}).rowcount
        if not n:
            self.lost = True
            log.warning("%s was taken over by another holder", self.name)
        return bool(n)

    def release(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM leases WHERE name = :n AND holder = :h"), {"n": self.name, "h": self.holder})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # noqa: BLE001 - a store hiccup: try again at the next beat
                log.warning("%s: renewal failed: %s", self.name, type(exc).__name__)

    def __enter__(self) -> "StoreLease":
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(5)
        try:
            self.release()
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("%s: release failed (%s); it expires in %.0fs", self.name, type(e).__name__, self.ttl_s)


class SlotLease(StoreLease):
    """One of ``slots`` leases (``name``, ``name#1``, ``name#2``, ...): at most ``slots`` holders at once,
    e.g. one sender per gateway bind a provider allows. Each slot is a :class:`StoreLease` of its own."""

    def __init__(self, engine, name: str, holder: str, *, slots: int = 1, **kw):
        super().__init__(engine, name, holder, **kw)
        self.names = [name] + [f"{name}#{i}" for i in range(1, max(1, int(slots)))]

    def try_acquire(self) -> bool:
        for n in self.names:
            self.name = n
            if super().try_acquire():
                return True
        self.name = self.names[0]
        return False
