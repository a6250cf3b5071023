"""Delivery reconciliation: receipts (as received) -> final outbox states.

Receipts arrive out of order, twice, and sometimes before the submit is recorded. A rank
on states makes applying them idempotent and monotonic: a late 'accepted' never
overwrites 'delivered'. A receipt whose message is not known yet stays unapplied and is
tried again on the next run; one that still names no message ORPHAN_AFTER after it arrived never
will and is parked (applied, without a message), so later runs do not join it again. Messages with
no final receipt after a TTL expire; a real final receipt arriving later still wins over that TTL
expiry.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import text

from blocks.gateway import Receipt
from store.db import bulk_insert, is_postgres, utcnow
from store.db import get_engine

RECEIPT_RANK = {"accepted": 2, "enroute": 2, "unknown": 2, "delivered": 3, "undelivered": 3, "expired": 3, "rejected": 3}
STATE_RANK = {"planned": 0, "queued": 1, "submitted": 2, "delivered": 3, "undelivered": 3, "expired": 3, "rejected": 3, "failed": 3}
TTL_CODE = "TTL"
# A reference is the key of a message planned before it was sent, and a gateway id is recorded seconds after
# the submit: a receipt that names neither an hour after it arrived is for a message we do not have (another
# sender on the same gateway, a message sent by hand, an erased one). Unparked, every apply pass joined it again.
ORPHAN_AFTER = timedelta(hours=1)


@dataclass
class ReconcileStats:
    received: int = 0
    applied: int = 0
    ignored: int = 0
    pending: int = 0
    orphaned: int = 0  # parked this run: no message ORPHAN_AFTER after arriving
    expired: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


def store_receipts(engine, gateway_name: str, receipts: list[Receipt]) -> int:
    """Write receipts exactly as received, before anything is applied."""
    if not receipts:
        return 0
    now = utcnow()
    with engine.begin() as conn:
        return bulk_insert(
            conn,
            "delivery_receipts",
            ("gateway", "gateway_message_id", "reference", "status", "error_code", "raw", "event_at", "received_at"),
            ((gateway_name, r.gateway_message_id, r.reference, r.status, r.error_code, r.raw, r.event_at, now) for r in receipts),
        )


def decide(current_state: str, current_code: str | None, receipt_status: str) -> str | None:
    """The new outbox state for a receipt, or None to leave the message as it is: the rule ``_NEW_STATE``
    applies in the store (the apply no longer calls this; the tests check the SQL against it)."""
    r_rank = RECEIPT_RANK.get(receipt_status, 2)
    c_rank = STATE_RANK.get(current_state, 0)
    if r_rank == 3:
        if c_rank < 3:
            return receipt_status
        if current_state == "expired" and current_code == TTL_CODE:
            return receipt_status  # a real receipt beats our own TTL guess
        return None
    # intermediate receipt: proves the gateway has the message
    if c_rank < 2:
        return "submitted"
    return None


def _rank_sql(column: str, ranks: dict[str, int], default: int) -> str:
    """A rank table as a SQL CASE (the constants above are the one source of both the SQL and ``decide``)."""
    return f"(CASE {column} " + " ".join(f"WHEN '{k}' THEN {v}" for k, v in ranks.items()) + f" ELSE {default} END)"


# ``decide`` in SQL, for the best receipt ``b`` of the outbox row ``o`` (NULL: leave the message as it is)
_NEW_STATE = (f"(CASE WHEN b.rank = 3 AND ({_rank_sql('o.state', STATE_RANK, 0)} < 3 "
              f"OR (o.state = 'expired' AND o.error_code = '{TTL_CODE}')) THEN b.status "
              f"WHEN b.rank < 3 AND {_rank_sql('o.state', STATE_RANK, 0)} < 2 THEN 'submitted' END)")
_CANDIDATES = (
    "INSERT INTO _receipts_apply (rid, oid, status, rcode, event_at, gmid, rank) "
    "SELECT r.id, o.id, r.status, r.error_code, r.event_at, r.gateway_message_id, "
    + _rank_sql("r.status", RECEIPT_RANK, 2) +
    " FROM delivery_receipts r JOIN outbox o ON {join} WHERE r.applied_at IS NULL AND r.reference IS {null} LIMIT :n"
)
_APPLY = (
    f"UPDATE outbox AS o SET state = {_NEW_STATE}, "
    "error_code = CASE WHEN b.status = 'delivered' THEN NULL WHEN b.rank = 3 THEN b.rcode ELSE o.error_code END, "
    "final_at = CASE WHEN b.rank = 3 THEN COALESCE(b.event_at, :now) END, "
    "gateway_message_id = COALESCE(NULLIF(o.gateway_message_id, ''), b.gmid), updated_at = :now "
    # the best receipt per message: a final one beats an intermediate one; the earliest final wins
    "FROM (SELECT * FROM (SELECT c.*, ROW_NUMBER() OVER (PARTITION BY c.oid "
    "ORDER BY c.rank DESC, c.event_at IS NULL, c.event_at, c.rid) AS nth FROM _receipts_apply c) AS ranked "
    "WHERE nth = 1) AS b "
    f"WHERE o.id = b.oid AND {_NEW_STATE} IS NOT NULL RETURNING state"  # unqualified: SQLite
)


def apply_receipts(engine, limit: int = 500_000) -> ReconcileStats:
    """Apply unapplied receipts in one pass, set-based in the store (nothing is read into this process but
    the new states): up to ``limit`` receipts matched by reference and as many by gateway id are staged, the
    best of each message's receipts moves it (``decide``, as SQL), and every staged receipt is marked applied."""
    stats = ReconcileStats()
    now = utcnow()
    with engine.begin() as conn:
        stats.orphaned = int(conn.execute(text(
            "UPDATE delivery_receipts SET applied_at = :now WHERE applied_at IS NULL AND received_at < :cut "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.idempotency_key = delivery_receipts.reference) "
            "AND (reference IS NOT NULL OR NOT EXISTS "
            "(SELECT 1 FROM outbox o WHERE o.gateway_message_id = delivery_receipts.gateway_message_id))"),
            {"now": now, "cut": now - ORPHAN_AFTER}).rowcount or 0)
        conn.execute(text("CREATE TEMP TABLE IF NOT EXISTS _receipts_apply (rid BIGINT, oid BIGINT, status VARCHAR, "
                          "rcode VARCHAR, event_at TIMESTAMP, gmid VARCHAR, rank INTEGER)"))
        conn.execute(text("DELETE FROM _receipts_apply"))
        staged = 0
        for join, null in (("o.idempotency_key = r.reference", "NOT NULL"),
                           ("o.gateway_message_id = r.gateway_message_id", "NULL")):
            staged += int(conn.execute(text(_CANDIDATES.format(join=join, null=null)), {"n": limit}).rowcount or 0)
        stats.pending = int(
            conn.execute(text("SELECT COUNT(*) FROM delivery_receipts WHERE applied_at IS NULL")).scalar() or 0
        ) - staged
        if not staged:
            return stats
        if is_postgres(conn):
            conn.execute(text("ANALYZE _receipts_apply"))  # a temp table has no statistics of its own
        new_states = Counter(s for (s,) in conn.execute(text(_APPLY), {"now": now}))
        conn.execute(text("UPDATE delivery_receipts SET applied_at = :now, outbox_id = c.oid "
                          "FROM _receipts_apply c WHERE delivery_receipts.id = c.rid"), {"now": now})
        conn.execute(text("DELETE FROM _receipts_apply"))
        stats.by_status = dict(new_states)
        stats.applied = sum(new_states.values())
        stats.ignored = staged - stats.applied
    return stats


def expire_stale(engine, ttl: timedelta, now: datetime | None = None, campaign_id: int | None = None) -> int:
    """Submitted messages with no final receipt after ``ttl`` become 'expired' (code TTL); planned
    messages of a campaign past its end expire too (CAMPAIGN_ENDED): no longer useful."""
    now = now or utcnow()
    q = ("UPDATE outbox SET state = 'expired', error_code = :code, last_error = :why, final_at = :now, updated_at = :now "
         "WHERE state = 'submitted' AND submitted_at < :cut")
    params = {"code": TTL_CODE, "why": f"no final receipt within {ttl}", "now": now, "cut": now - ttl}
    if campaign_id is not None:
        q += " AND campaign_id = :c"
        params["c"] = campaign_id
    ended = ("UPDATE outbox SET state = 'expired', error_code = 'CAMPAIGN_ENDED', hold_rule = 'campaign_ended', "
             "last_error = 'the campaign ended before it was sent', final_at = :now, updated_at = :now "
             "WHERE state = 'planned' AND campaign_id IN (SELECT id FROM campaigns WHERE ends_at IS NOT NULL AND ends_at < :now"
             + (" AND id = :c)" if campaign_id is not None else ")"))
    with engine.begin() as conn:
        n = int(conn.execute(text(q), params).rowcount or 0)
        return n + int(conn.execute(text(ended), params).rowcount or 0)


def outstanding(engine, campaign_id: int | None = None) -> int:
    """Messages still waiting for a final state (queued or submitted)."""
    q = "SELECT COUNT(*) FROM outbox WHERE state IN ('queued', 'submitted')"
    params = {}
    if campaign_id is not None:
        q += " AND campaign_id = :c"
        params["c"] = campaign_id
    with engine.begin() as conn:
        return int(conn.execute(text(q), params).scalar() or 0)


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.retrying import retry_if_transient  # noqa: E402


@task(name="reconcile-receipts", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def reconcile_task(gateway, ttl_seconds: float, wait_seconds: float, campaign_id: int | None,
                   database_url: str | None) -> ReconcileStats:
    """Pull receipts from the gateway, apply them, expire the stale; optionally wait for the
    campaign's outstanding messages (polling inside one task run)."""
    import time


    engine = get_engine(database_url)
    total = ReconcileStats()
    deadline = time.monotonic() + wait_seconds
    while True:
        if gateway is not None:
            total.received += store_receipts(engine, gateway.gateway_name, gateway.fetch_receipts())
        s = apply_receipts(engine)
        total.applied += s.applied
        total.ignored += s.ignored
        total.pending = s.pending
        for k, v in s.by_status.items():
            total.by_status[k] = total.by_status.get(k, 0) + v
        total.expired += expire_stale(engine, timedelta(seconds=ttl_seconds))
        if time.monotonic() >= deadline or outstanding(engine, campaign_id) == 0:
            return total
        time.sleep(0.5)
