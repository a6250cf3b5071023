"""Benchmark: apply N delivery receipts to N submitted messages (SQLite by default).

    python bench/reconcile.py [--n 1000000] [--database-url URL] [--explain]

Prints seconds to store the receipts (as received) and to apply them, and receipts/s. ``--explain``
(PostgreSQL) also prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the apply's staging, its outbox update and its
receipts update (each explained in a rolled-back savepoint, then run: the times then count them twice).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stores import fresh_store  # noqa: E402 - after the path
from blocks.gateway import Receipt  # noqa: E402
from store.db import bulk_insert, get_engine, refresh_statistics, utcnow  # noqa: E402
from tasks.reconcile import apply_receipts, store_receipts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--database-url", default=None,
                    help="PostgreSQL server (a new database for the run, dropped after); default: SQLite")
    ap.add_argument("--explain", action="store_true", help="PostgreSQL: print the apply's plans as they run")
    a = ap.parse_args()
    if a.explain:
        explain_apply_statements()
    with fresh_store(a.database_url, Path(tempfile.mkdtemp())) as url:
        run(a, get_engine(url))


def explain_apply_statements() -> None:
    """Wrap psycopg's cursor: each statement of the apply that stages, applies or marks receipts is first run
    by ``EXPLAIN (ANALYZE, BUFFERS)`` inside a savepoint that is rolled back, its plan printed, then run for
    real (so the apply's results stand; the run's times include the doubled statements)."""
    import psycopg

    execute = psycopg.Cursor.execute
    marks = ("INSERT INTO _receipts_apply", "UPDATE outbox AS o", "UPDATE delivery_receipts SET applied_at")

    def explaining(self, query, params=None, **kw):
        q = str(query)
        if q.startswith(marks):
            execute(self, "SAVEPOINT explain_apply")
            t0 = time.perf_counter()
            plan = execute(self, "EXPLAIN (ANALYZE, BUFFERS) " + q, params).fetchall()
            print(f"\n-- {time.perf_counter() - t0:.2f} s: {q[:110]}...")
            print("\n".join("    " + r[0] for r in plan))
            execute(self, "ROLLBACK TO SAVEPOINT explain_apply")
        return execute(self, query, params, **kw)

    psycopg.Cursor.execute = explaining


def run(a, engine) -> None:
    now = utcnow()
    with engine.begin() as c:
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('bench', 's', 'all', 't', 'marketing', 0, 'running')"))
        cid = c.execute(text("SELECT id FROM campaigns WHERE name='bench'")).scalar()
    t0 = time.perf_counter()
    with engine.begin() as c:
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "step", "phone_e164", "encoding", "segments", "cost",
                                  "state", "attempts", "gateway_message_id", "planned_at", "submitted_at", "updated_at"),
                    ((f"k{i}", cid, "main", None, "GSM-7", 1, 0.0, "submitted", 1, f"m{i}", now, now, now) for i in range(a.n)))
    refresh_statistics(engine, "outbox")  # as the render step does after filling the outbox
    t_seed = time.perf_counter() - t0
    statuses = ["delivered"] * 92 + ["undelivered"] * 5 + ["expired"] * 3
    ev = now + timedelta(seconds=5)
    receipts = [Receipt(f"m{i}", None, statuses[i % 100], "000", ev, {}) for i in range(a.n)]
    # out of order and twice: 5% intermediate receipts after the final, 3% duplicates
    receipts += [Receipt(f"m{i}", None, "enroute", "000", ev, {}) for i in range(0, a.n, 20)]
    receipts += [Receipt(f"m{i}", None, statuses[i % 100], "000", ev, {}) for i in range(0, a.n, 33)]
    t0 = time.perf_counter()
    store_receipts(engine, "bench", receipts)
    t_store = time.perf_counter() - t0
    t0 = time.perf_counter()
    applied = 0
    while True:
        s = apply_receipts(engine)
        applied += s.applied
        if s.applied == 0 and s.ignored == 0:
            break
    t_apply = time.perf_counter() - t0
    with engine.begin() as c:
        left = c.execute(text("SELECT COUNT(*) FROM outbox WHERE state = 'submitted'")).scalar()
    print(f"receipts: {len(receipts):,} for {a.n:,} messages on {engine.dialect.name}")
    print(f"seed outbox: {t_seed:.1f} s | store receipts: {t_store:.1f} s | apply: {t_apply:.1f} s "
          f"({len(receipts) / t_apply:,.0f} receipts/s) | store+apply: {t_store + t_apply:.1f} s | applied {applied:,}, "
          f"left submitted: {left}")


if __name__ == "__main__":
    main()
