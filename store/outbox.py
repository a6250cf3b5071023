"""The outbox's guarded transitions (the most safety-critical SQL): claims renewed and released only
by their holder, results recorded only while a message is still 'queued' (states move forward, a
receipt that arrived first is never overwritten). ``tasks/send.py`` claims and sends with them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from store.db import is_postgres, utcnow


def unsent_count(engine, campaign_id: int) -> int:
    """Messages of a campaign not yet handed to the gateway (planned, or claimed and in flight)."""
    with engine.begin() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c AND state IN ('planned', 'queued')"),
                                {"c": campaign_id}).scalar() or 0)


def renew_lease(engine, ids: list[int], claimer: str, lease_s: float) -> set[int]:
    """Extend our claims; returns the ids still ours (queued and claimed by us)."""
    if not ids:
        return set()
    exp = utcnow() + timedelta(seconds=lease_s)
    marks = ",".join(str(int(i)) for i in ids)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE outbox SET claim_expires_at = :e WHERE id IN ({marks}) AND state = 'queued' "
                          "AND claimed_by = :w"), {"e": exp, "w": claimer})
        return {int(r[0]) for r in conn.execute(text(
            f"SELECT id FROM outbox WHERE id IN ({marks}) AND state = 'queued' AND claimed_by = :w"), {"w": claimer})}


def release_unsent(engine, ids: list[int], claimer: str) -> None:
    """Claimed messages that provably never reached the gateway go back to 'planned' (attempt not counted)."""
    if not ids:
        return
    marks = ",".join(str(int(i)) for i in ids)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE outbox SET state = 'planned', claimed_by = NULL, claim_expires_at = NULL, "
                          f"attempts = attempts - 1, updated_at = :now WHERE id IN ({marks}) AND state = 'queued' "
                          "AND claimed_by = :w"), {"now": utcnow(), "w": claimer})


_PG_ARRAY = {"submitted_at": "timestamp[]", "final_at": "timestamp[]", "updated_at": "timestamp[]",
             "claim_expires_at": "timestamp[]", "queued_at": "timestamp[]"}  # the rest: text


def update_if_queued(conn, rows: list[tuple], set_clause: str) -> None:
    """Apply ``SET set_clause`` (qmark style) to each row's id, only while it is still 'queued':
    states only move forward, and a receipt that arrived first is never overwritten.

    On SQLite the rows go in as ONE ``UPDATE ... FROM (VALUES ...)`` statement per chunk instead of
    one statement per row: the driver releases the GIL around every statement step, and each
    re-acquisition can wait a whole switch interval behind a busy thread (the callback service,
    the gateway's workers), so per-row statements cost milliseconds each under load. A column
    with the same value in every row (state, timestamps) is bound once, not per row."""
    if not rows:
        return
    cols = [c.split("=")[0].strip() for c in set_clause.split(",")]
    first = rows[0]
    same = [all(r[j] == first[j] for r in rows) for j in range(len(cols))]
    if is_postgres(conn):
        # one statement: the varying columns as arrays, unnested side by side (per-row UPDATEs cost the
        # server a statement each, competing for the CPU with the send they record)
        varying = [j for j in range(len(cols)) if not same[j]]
        sets = ", ".join(f"{c} = %s" if same[j] else f"{c} = v.c{j}" for j, c in enumerate(cols))
        src = ", ".join([f"unnest(%s::{_PG_ARRAY.get(cols[j], 'text[]')}) AS c{j}" for j in varying]
                        + ["unnest(%s::bigint[]) AS id"])
        params = ([first[j] for j in range(len(cols)) if same[j]] + [_pg_array([r[j] for r in rows]) for j in varying]
                  + ["{" + ",".join([str(int(r[-1])) for r in rows]) + "}"])
        # The statistics never see many messages 'queued' (a message is queued only while it is in flight): with
        # ``outbox.state = 'queued'`` the planner estimated one queued row and, for lists of a few hundred, took it
        # as the outer side of a nested loop reading the whole list once per queued message: quadratic (357
        # results with 10,000 queued: 708 ms at 30,000 outbox rows; 2,500 at 250,000 rows: 5.3 s, EXPLAIN
        # ANALYZE). The state to match comes with the list (a join condition, not an estimate) and only nested
        # loops are allowed, so the one plan left reads the list once and finds each id through the primary
        # key (4.4 and 32 ms for the same, whatever the statistics say).
        src += ", unnest(array_fill('queued'::text, ARRAY[%s::int])) AS want"
        params.append(len(rows))
        with conn.connection.driver_connection.cursor() as cur:
            cur.execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
            cur.execute(f"UPDATE outbox SET {sets} FROM (SELECT {src}) AS v WHERE outbox.id = v.id "
                        "AND outbox.state = v.want", params)
            cur.execute("RESET enable_hashjoin; RESET enable_mergejoin")
        return
    varying = [j for j in range(len(cols)) if not same[j]] + [len(cols)]  # the id comes last
    sets = ", ".join(f"{c} = ?" if same[j] else f"{c} = v.column{varying.index(j) + 1}" for j, c in enumerate(cols))
    consts = [_store_text(first[j]) for j in range(len(cols)) if same[j]]
    width = len(varying)
    cur = conn.connection.driver_connection.cursor()
    try:
        step = _SQLITE_MAX_PARAMS // width
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            values = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
            cur.execute(f"UPDATE outbox SET {sets} FROM (VALUES {values}) AS v "
                        f"WHERE outbox.id = v.column{width} AND outbox.state = 'queued'",
                        consts + [_store_text(row[j]) for row in chunk for j in varying])
    finally:
        cur.close()


def _pg_array(values: list) -> str:
    """A list as a PostgreSQL array literal, cast by the statement: psycopg's list dumper runs Python code
    per element (10,000 gateway ids and ids: 23 ms against 8 ms for this, in the sender's store thread).
    Every value double-quoted with backslash escapes, None as NULL, datetimes as naive UTC (the store's)."""
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
            continue
        if isinstance(v, datetime):
            v = _store_text(v)  # naive UTC, ISO format
        parts.append('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


def _store_text(value):
    """Datetimes as the store keeps them in text (naive UTC, ISO format, as ``store.db`` binds them); the rest as is."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value.isoformat(" ", "microseconds")
    return value


_SQLITE_MAX_PARAMS = 32_000  # SQLite >= 3.32 allows 32,766 bound parameters per statement
