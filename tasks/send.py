"""Throttled sending from the outbox.

claim (planned -> queued, with a lease) -> policy check at send time (consent, opt-out)
-> token bucket -> gateway.submit -> record (queued -> submitted | rejected | planned again).

At most one submit per idempotency key: a message is only ever submitted from 'queued',
which only one claimer holds; a message left 'queued' by a crash (lease expired, or an
earlier attempt of the same run) is resolved by asking the gateway whether it already
has our reference (``lookup``) before it can go back to 'planned'.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pandas as pd
from sqlalchemy import text

from blocks.gateway import GatewayUnavailable, OutgoingMessage, SmsGateway, SubmitResult
from store.db import bulk_update, executemany, is_postgres, read_frame, utcnow


class TokenBucket:
    """Token bucket: ``rate`` tokens per second, at most ``capacity`` banked."""

    def __init__(self, rate: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(1.0, rate / 10))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self, n: int = 1) -> float:
        """Block until ``n`` tokens are available; returns seconds waited."""
        waited = 0.0
        need = float(n)
        with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                take = min(need, self._tokens)
                self._tokens -= take
                need -= take
                if need <= 1e-9:
                    return waited
                delay = min(need, self.capacity) / self.rate
                self._sleep(delay)
                waited += delay


class CircuitBreaker:
    """Open on gateway outages: wait base*2^n seconds (capped) between tries; give up (raise)
    once the gateway has been down longer than ``max_open_s``."""

    def __init__(self, base_s: float = 1.0, cap_s: float = 30.0, max_open_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.base_s, self.cap_s, self.max_open_s = base_s, cap_s, max_open_s
        self._clock, self._sleep = clock, sleep
        self.opened_at: float | None = None
        self.failures = 0
        self.total_open_s = 0.0

    def failure(self, exc: BaseException) -> None:
        now = self._clock()
        if self.opened_at is None:
            self.opened_at = now
        if now - self.opened_at > self.max_open_s:
            raise GatewayUnavailable(f"gateway down for {now - self.opened_at:.0f}s, giving up: {exc}") from exc
        delay = min(self.cap_s, self.base_s * 2 ** self.failures)
        self.failures += 1
        self._sleep(delay)

    def success(self) -> None:
        if self.opened_at is not None:
            self.total_open_s += self._clock() - self.opened_at
        self.opened_at = None
        self.failures = 0


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


@dataclass
class SendStats:
    claimed: int = 0
    submitted: int = 0
    rejected: int = 0
    policy_blocked: int = 0
    retry_later: int = 0
    failed: int = 0
    recovered_submitted: int = 0
    recovered_replanned: int = 0
    in_doubt: int = 0
    outages: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)  # by policy rule: deferred, held back or expired


def recover_in_flight(engine, campaign_id: int, gateway: SmsGateway, run_id: str | None) -> tuple[int, int]:
    """Resolve messages left 'queued' by a crashed or retried sender, before anything is sent again.

    1. Receipts already stored that name our reference settle them (reconcile's rules).
    2. The gateway is asked which references it has (``lookup``).
    3. What is still unexplained goes back to 'planned' only when that is provably safe: at once
       for a gateway whose lookup is authoritative (it would know), otherwise only after
       ``evidence_grace_s`` since the claim, by when its receipts would have arrived.
    Returns (settled as submitted or final, planned again)."""
    from tasks.reconcile import apply_receipts

    now = utcnow()
    query = ("SELECT id, idempotency_key, queued_at FROM outbox WHERE campaign_id = :c AND state = 'queued' "
             "AND (claim_expires_at < :now OR claimed_by = :run)")
    params = {"c": campaign_id, "now": now, "run": run_id or ""}
    with engine.begin() as conn:
        df = read_frame(conn, query, params, parse_dates=["queued_at"])
    if df.empty:
        return 0, 0
    apply_receipts(engine)
    with engine.begin() as conn:
        still = read_frame(conn, query, params, parse_dates=["queued_at"])
    known = gateway.lookup(still["idempotency_key"].tolist()) if len(still) else {}
    sub = still[still["idempotency_key"].isin(known.keys())]
    rest = still[~still["idempotency_key"].isin(known.keys())]
    if not gateway.lookup_is_authoritative:
        cutoff = pd.Timestamp(now - timedelta(seconds=gateway.evidence_grace_s))
        rest = rest[rest["queued_at"].isna() | (rest["queued_at"] < cutoff)]
    with engine.begin() as conn:
        update_if_queued(
            conn,
            [("submitted", known[k], now, None, now, int(i)) for i, k in zip(sub["id"], sub["idempotency_key"])],
            "state = ?, gateway_message_id = ?, submitted_at = ?, claimed_by = ?, updated_at = ?",
        )
        update_if_queued(
            conn,
            [("planned", None, None, now, int(i)) for i in rest["id"]],
            "state = ?, claimed_by = ?, claim_expires_at = ?, updated_at = ?",
        )
    return len(df) - len(still) + len(sub), len(rest)


def claim(engine, campaign_id: int, limit: int, claimer: str, lease_s: float = 300,
          now: datetime | None = None) -> pd.DataFrame:
    """Atomically take up to ``limit`` due planned messages (FOR UPDATE SKIP LOCKED on PostgreSQL;
    SQLite's single writer with BEGIN IMMEDIATE), then apply the contact policy as it is now
    (``tasks.policy.enforce_at_claim``): only messages allowed this moment are returned;
    ``attrs['policy_blocked']`` counts the others, ``attrs['policy']`` by rule."""
    from tasks.policy import enforce_at_claim

    clock = now or datetime.now(timezone.utc)
    naive = clock.astimezone(timezone.utc).replace(tzinfo=None)
    expires = naive + timedelta(seconds=lease_s)
    with engine.begin() as conn:
        lock = " FOR UPDATE SKIP LOCKED" if is_postgres(conn) else ""
        claimed = read_frame(
            conn,
            "UPDATE outbox SET state = 'queued', queued_at = :now, claimed_by = :who, claim_expires_at = :exp, "
            "attempts = attempts + 1, updated_at = :now "
            "WHERE id IN (SELECT id FROM outbox WHERE campaign_id = :c AND state = 'planned' "
            f"AND (send_after IS NULL OR send_after <= :now) ORDER BY id LIMIT :n{lock}) "
            "RETURNING id, idempotency_key, contact_id, phone_e164, text, encoding, segments, attempts",
            {"now": naive, "who": claimer, "exp": expires, "c": campaign_id, "n": int(limit)},
        )
        if claimed.empty:
            return claimed
        send_ids, counts = enforce_at_claim(conn, campaign_id, claimed, clock)
    out = claimed[claimed["id"].astype(int).isin(set(send_ids))].reset_index(drop=True)
    out.attrs["policy_blocked"] = len(claimed) - len(out)
    out.attrs["policy"] = counts
    return out


def record_results(engine, ids_by_ref: dict[str, int], results: list[SubmitResult], max_attempts: int,
                   attempts_by_ref: dict[str, int], stats: SendStats, now: datetime | None = None) -> None:
    now = now.astimezone(timezone.utc).replace(tzinfo=None) if now is not None else utcnow()
    sub, rej, again, failed, doubt = [], [], [], [], []
    for r in results:
        oid = ids_by_ref[r.reference]
        if r.in_doubt:
            # it may have gone out: never send again blindly; recovery settles it from receipts
            doubt.append((r.error_code, r.error, now, now, oid))
            stats.in_doubt += 1
        elif r.accepted:
            sub.append(("submitted", r.gateway_message_id, now, None, now, oid))
        elif r.transient:
            if attempts_by_ref.get(r.reference, 0) >= max_attempts:
                failed.append(("failed", r.error_code, r.error, now, None, now, oid))
            else:
                again.append(("planned", r.error_code, r.error, None, now, oid))
            stats.errors[r.error_code or "transient"] = stats.errors.get(r.error_code or "transient", 0) + 1
        else:
            rej.append(("rejected", r.error_code, r.error, now, None, now, oid))
            stats.errors[r.error_code or "rejected"] = stats.errors.get(r.error_code or "rejected", 0) + 1
    with engine.begin() as conn:
        # every transition is guarded on the current state: a receipt that arrived first wins
        update_if_queued(conn, sub, "state = ?, gateway_message_id = ?, submitted_at = ?, claimed_by = ?, updated_at = ?")
        update_if_queued(conn, rej, "state = ?, error_code = ?, last_error = ?, final_at = ?, claimed_by = ?, updated_at = ?")
        update_if_queued(conn, failed, "state = ?, error_code = ?, last_error = ?, final_at = ?, claimed_by = ?, updated_at = ?")
        update_if_queued(conn, again, "state = ?, error_code = ?, last_error = ?, claimed_by = ?, updated_at = ?")
        update_if_queued(conn, doubt, "error_code = ?, last_error = ?, claim_expires_at = ?, updated_at = ?")
    stats.submitted += len(sub)
    stats.rejected += len(rej)
    stats.failed += len(failed)
    stats.retry_later += len(again)


def update_if_queued(conn, rows: list[tuple], set_clause: str) -> None:
    """Apply ``SET set_clause`` (qmark style) to each row's id, only while it is still 'queued':
    states only move forward, and a receipt that arrived first is never overwritten."""
    if rows:
        executemany(conn, f"UPDATE outbox SET {set_clause} WHERE id = ? AND state = 'queued'", rows)


def send_messages(
    engine,
    *,
    campaign_id: int,
    gateway: SmsGateway,
    bucket: TokenBucket,
    claimer: str,
    max_messages: int,
    max_attempts: int = 5,
    lease_s: float = 300,
    stats: SendStats | None = None,
    now: datetime | None = None,
    breaker: "CircuitBreaker | None" = None,
) -> SendStats:
    """Send up to ``max_messages`` planned messages of a campaign. Returns counts.

    A gateway outage opens the circuit breaker: exponential backoff (1 s doubling to 30 s) while
    our claims are kept alive; after ``breaker.max_open_s`` the unsent messages go back to
    'planned' (never 'failed': they were never tried) and GatewayUnavailable propagates."""
    stats = stats or SendStats()
    breaker = breaker or CircuitBreaker()
    sent = 0
    while sent < max_messages:
        batch = claim(engine, campaign_id, min(gateway.batch_size, max_messages - sent), claimer, lease_s, now=now)
        stats.policy_blocked += batch.attrs.get("policy_blocked", 0)
        for rule, n in batch.attrs.get("policy", {}).items():
            stats.held[rule] = stats.held.get(rule, 0) + n
        if batch.empty and not batch.attrs.get("policy_blocked"):
            break
        stats.claimed += len(batch) + batch.attrs.get("policy_blocked", 0)
        sent += len(batch) + batch.attrs.get("policy_blocked", 0)
        if batch.empty:
            continue
        msgs = [
            OutgoingMessage(k, p, t, e, int(s))
            for k, p, t, e, s in zip(batch["idempotency_key"], batch["phone_e164"], batch["text"], batch["encoding"], batch["segments"])
        ]
        ids_by_ref = dict(zip(batch["idempotency_key"], batch["id"].astype(int)))
        attempts = dict(zip(batch["idempotency_key"], batch["attempts"].astype(int)))
        step = max(1, int(bucket.rate // 10) or 1)
        i = 0
        while i < len(msgs):
            part = msgs[i : i + step]
            bucket.acquire(len(part))
            try:
                results = gateway.submit(part)
            except GatewayUnavailable as exc:
                # nothing of this part reached the gateway (implementations raise before sending).
                # Back off with the breaker, keep our claims alive, then retry the same part.
                stats.outages += 1
                rest = [m.reference for m in msgs[i:]]
                try:
                    breaker.failure(exc)
                except GatewayUnavailable:
                    release_unsent(engine, [ids_by_ref[r] for r in rest], claimer)
                    raise
                mine = renew_lease(engine, [ids_by_ref[r] for r in rest], claimer, lease_s)
                msgs = msgs[:i] + [m for m in msgs[i:] if ids_by_ref[m.reference] in mine]
                continue
            breaker.success()
            record_results(engine, ids_by_ref, results, max_attempts, attempts, stats, now=now)
            i += step
    return stats


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="send-batch", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def send_task(campaign_id: int, gateway: SmsGateway, rate: float, max_messages: int, database_url: str | None,
              now: datetime | None = None) -> SendStats:
    """Send up to ``max_messages``; a retry first resolves what the failed attempt left in flight."""
    from prefect.concurrency.sync import concurrency
    from prefect.context import get_run_context

    from store.db import get_engine

    engine = get_engine(database_url)
    ctx = get_run_context()
    claimer = str(ctx.task_run.id)
    stats = SendStats()
    stats.recovered_submitted, stats.recovered_replanned = recover_in_flight(engine, campaign_id, gateway, claimer)
    # one global concurrency limit per gateway, if the operator created it (`prefect gcl create gateway-NAME`)
    with concurrency(f"gateway-{gateway.gateway_name}", occupy=1, strict=False):
        return send_messages(engine, campaign_id=campaign_id, gateway=gateway, bucket=TokenBucket(rate), claimer=claimer,
                             max_messages=max_messages, stats=stats, now=now)
