"""Throttled sending from the outbox.

claim (planned -> queued, with a lease) -> policy check at send time (consent, opt-out)
-> token bucket -> gateway.submit -> record (queued -> submitted | rejected | planned again).

At most one submit per idempotency key: a message is only ever submitted from 'queued',
which only one claimer holds; a message left 'queued' by a crash (lease expired, or an
earlier attempt of the same run) is resolved by asking the gateway whether it already
has our reference (``lookup``) before it can go back to 'planned'.

The loop is pipelined (``_SendLoop``): one store thread claims the next batch and records the
previous results while the gateway works on the current batch, so the gateway does not wait for
the bookkeeping; the docstring of ``_SendLoop`` says why that keeps every guarantee above.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pandas as pd
from sqlalchemy import text

from blocks.gateway import GatewayUnavailable, OutgoingMessage, SmsGateway, SubmitResult
from smsflow.ratelimit import TokenBucket
from store.outbox import release_unsent, renew_lease, update_if_queued
from store.db import is_postgres, read_columns, read_frame, utcnow
from store.db import get_engine
from store.leases import SlotLease, process_holder
from tasks.policy import enforce_at_claim
from tasks.reconcile import apply_receipts

log = logging.getLogger("smsflow.send")

# A claim lives this long unless its sender renews it (before each part, once older than half of it):
# after a crash, the next run takes over the dead sender's messages at most this long after its
# last renewal. A gateway is held by one sender at a time through a store lease (``store.leases``)
# that a dead holder loses after GATEWAY_LEASE_S.
CLAIM_LEASE_S = 60.0
CLAIM_SECONDS = 5.0
# The first claim is small, so the first message goes out soon (that claim cannot overlap anything);
# each later one up to RAMP times the one before: it is claimed while the previous batch is sent,
# which must take longer than claiming RAMP times as many: a claim costs ~30 us a message when quiet and
# up to ~130 us beside Kannel on 2 cores, sending ~200-250 us (bench/send.py: RAMP 4 left the sender
# waiting for the store 5-17 % of the time, RAMP 2 2-11 %)
FIRST_CLAIM = 1000
RAMP = 2
# streaming (a gateway that takes more parts while it runs): records of result chunks that may still be
# uncommitted when the next part is handed out (a chunk is an eighth of a part or the results so far at
# a part boundary); more and the gateway waits for the store
RECORDS_AHEAD = 8
GATEWAY_LEASE_S = 30.0
# a claim's sender is alive while it holds a store lease named after its claimer (send_task holds the
# gateway lease, holder "host:pid:<claimer>", for as long as it has claims); ``row``: the outbox alias
_LIVE_CLAIMER = ("EXISTS (SELECT 1 FROM leases l WHERE l.holder LIKE '%:' || {row}.claimed_by "
                 "AND l.expires_at >= :now)")


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


def campaigns_to_send(engine, campaign: str | None, now: datetime) -> list[tuple[int, str, str | None]]:
    """(id, name, gateway Block) of the campaign named, or of every campaign with messages due at
    ``now`` (naive UTC): planned ones whose window opened, and claims a crashed sender left behind."""
    with engine.begin() as conn:
        if campaign is not None:
            rows = conn.execute(text("SELECT id, name, gateway FROM campaigns WHERE name = :n"), {"n": campaign}).fetchall()
            if not rows:
                raise ValueError(f"no campaign named '{campaign}': render it first")
        else:
            # per campaign, two index probes (campaign_id, state): a join of every outbox row read the whole
            # outbox at each scheduled run (PostgreSQL, 1,000,000 rows in 201 campaigns: 85 ms -> 1-2 ms)
            rows = conn.execute(text(
                "SELECT c.id, c.name, c.gateway FROM campaigns c WHERE EXISTS (SELECT 1 FROM outbox o "
                "WHERE o.campaign_id = c.id AND o.state = 'planned' AND (o.send_after IS NULL OR o.send_after <= :now)) "
                # in doubt or left by a crashed sender: the send task's recovery settles or re-plans them
                "OR EXISTS (SELECT 1 FROM outbox o WHERE o.campaign_id = c.id AND o.state = 'queued' "
                "AND o.claim_expires_at < :now) ORDER BY c.id"),
                {"now": now}).fetchall()
    return [(int(r[0]), r[1], r[2]) for r in rows]


def next_takeover(engine, campaign_id: int, gateway: SmsGateway) -> tuple[datetime | None, int]:
    """When the earliest message of the campaign left 'queued' by another (or a dead) sender can be
    settled by ``recover_in_flight``: its claim has expired and, for a gateway whose lookup is not
    authoritative, its evidence grace has passed (None when nothing is queued), and how many are queued."""
    now = utcnow()
    with engine.begin() as conn:
        rows = conn.execute(text(
            f"SELECT claim_expires_at, queued_at, {_LIVE_CLAIMER.format(row='o')} FROM outbox o "
            "WHERE o.campaign_id = :c AND o.state = 'queued'"),
            {"c": campaign_id, "now": now}).fetchall()
    if not rows:
        return None, 0
    grace = timedelta(seconds=0 if gateway.lookup_is_authoritative else gateway.evidence_grace_s)

    def ready(expires, queued, live) -> datetime:
        expires, queued = (pd.Timestamp(v).to_pydatetime() if v is not None else None for v in (expires, queued))
        claim_ends = (expires or now) if live else now  # a claimer without a live lease is dead
        return max(claim_ends, (queued + grace) if queued else now)

    return min(ready(*r) for r in rows), len(rows)


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


def recover_in_flight(engine, campaign_id: int, gateway: SmsGateway, run_id: str | None,
                      claimers_hold_leases: bool = False) -> tuple[int, int]:
    """Resolve messages left 'queued' by a crashed or retried sender, before anything is sent again.

    1. Receipts already stored that name our reference settle them (reconcile's rules).
    2. The gateway is asked which references it has (``lookup``).
    3. What is still unexplained goes back to 'planned' only when that is provably safe: at once
       for a gateway whose lookup is authoritative (it would know), otherwise only after
       ``evidence_grace_s`` since the claim, by when its receipts would have arrived.
    Returns (settled as submitted or final, planned again)."""

    now = utcnow()
    # with ``claimers_hold_leases`` (senders run by send_task hold a store lease named after their claimer
    # while they have claims), a claim whose claimer holds no live lease is a dead sender's: at once
    dead = f"OR NOT {_LIVE_CLAIMER.format(row='outbox')}" if claimers_hold_leases else ""
    query = ("SELECT id, idempotency_key, queued_at FROM outbox WHERE campaign_id = :c AND state = 'queued' "
             f"AND (claim_expires_at < :now OR claimed_by = :run {dead})")
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


@dataclass
class Claimed:
    """What one claim took and may send now, as plain column lists (what the send loop walks; no DataFrame
    on its path), and ``attrs``: ``last_id``, ``policy_blocked``, ``policy`` (counts by rule), ``claimed_at``,
    ``skipped_contacts`` (see :func:`claim`). Indexing a column and ``in`` work as on a DataFrame."""

    columns: dict[str, list]
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["id"])

    def __getitem__(self, column: str) -> list:
        return self.columns[column]

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    @property
    def empty(self) -> bool:
        return len(self) == 0

    def keep(self, ids: Collection[int]) -> "Claimed":
        """Only the messages whose id is in ``ids`` (same attrs)."""
        rows = [k for k, i in enumerate(self.columns["id"]) if i in ids]
        return Claimed({c: [v[k] for k in rows] for c, v in self.columns.items()}, dict(self.attrs))

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.columns)
        df.attrs.update(self.attrs)
        return df


def claim(engine, campaign_id: int, limit: int, claimer: str, lease_s: float = CLAIM_LEASE_S,
          now: datetime | None = None, skip_contacts: Collection[int] = (), after: int = 0) -> pd.DataFrame:
    """Atomically take up to ``limit`` due planned messages (FOR UPDATE SKIP LOCKED on PostgreSQL;
    SQLite's single writer with BEGIN IMMEDIATE), then apply the contact policy as it is now
    (``tasks.policy.enforce_at_claim``): only messages allowed this moment are returned;
    ``attrs['policy_blocked']`` counts the others, ``attrs['policy']`` by rule.

    ``skip_contacts``: contacts whose messages are being submitted right now and not yet recorded
    (the send loop claims the next batch while submitting the current one). Their other messages
    stay 'planned' for a later claim, because frequency caps count what is recorded as submitted
    and would not see the message in flight yet.

    ``after``: only messages with a greater id (a sender's cursor: ``attrs['last_id']`` is the greatest
    id this claim took, policy-blocked ones included). It keeps every claim of a long campaign reading
    about ``limit`` rows whichever index PostgreSQL picks: with the statistics of a freshly planned
    campaign (every row 'planned') it walks the primary key in id order, and without a cursor each
    claim would step over every message claimed before it (quadratic in the campaign's size). What a
    cursor passes by (retries, contacts skipped, messages deferred) is claimed by a claim from 0, which
    the send loop makes before it concludes that nothing is due."""
    return claim_columns(engine, campaign_id, limit, claimer, lease_s, now, skip_contacts, after).frame()


def claim_columns(engine, campaign_id: int, limit: int, claimer: str, lease_s: float = CLAIM_LEASE_S,
                  now: datetime | None = None, skip_contacts: Collection[int] = (), after: int = 0) -> Claimed:
    """:func:`claim` as plain column lists: what the send loop's store thread uses (a DataFrame built and
    taken apart again cost ~10 us a message of the CPU that the gateway's threads compete for)."""
    started = time.monotonic()  # the lease runs from (at the latest) here
    clock = now or datetime.now(timezone.utc)  # the policy's clock (may be injected: dry runs, tests)
    naive = clock.astimezone(timezone.utc).replace(tzinfo=None)
    # the lease measures real time whatever the policy clock says: recovery compares it with the wall clock
    wall = utcnow()
    expires = wall + timedelta(seconds=lease_s)
    skip = ""
    if skip_contacts:
        skip = f"AND (contact_id IS NULL OR contact_id NOT IN ({','.join(str(int(c)) for c in sorted(skip_contacts))})) "
    pick = ("SELECT id FROM outbox WHERE campaign_id = :c AND state = 'planned' "
            f"AND (send_after IS NULL OR send_after <= :now) AND id > :after {skip}ORDER BY id LIMIT :n")
    with engine.begin() as conn:
        # PostgreSQL: the ids as an array, so each is found through the primary key; as ``id IN (subquery)``
        # the planner hashed them against a sequential scan of the whole outbox (EXPLAIN ANALYZE at 250,000
        # rows: 82 ms per claim of 2,500 instead of 30, growing with the outbox)
        which = f"id = ANY(ARRAY({pick} FOR UPDATE SKIP LOCKED))" if is_postgres(conn) else f"id IN ({pick})"
        claimed = Claimed(read_columns(
            conn,
            "UPDATE outbox SET state = 'queued', queued_at = :wall, claimed_by = :who, claim_expires_at = :exp, "
            f"attempts = attempts + 1, updated_at = :wall WHERE {which} "
            "RETURNING id, idempotency_key, contact_id, phone_e164, text, encoding, segments, attempts, variant",
            {"now": naive, "wall": wall, "who": claimer, "exp": expires, "c": campaign_id, "n": int(limit),
             "after": int(after)},
        ))
        claimed.attrs.update(skipped_contacts=bool(skip_contacts), last_id=int(after))
        if claimed.empty:
            return claimed
        last_id = int(max(claimed["id"]))
        send_ids, counts = enforce_at_claim(conn, campaign_id, claimed, clock)
    out = claimed.keep(set(send_ids)) if len(send_ids) < len(claimed) else claimed
    out.attrs.update(skipped_contacts=bool(skip_contacts), last_id=last_id)
    out.attrs["policy_blocked"] = len(claimed) - len(out)
    out.attrs["policy"] = counts
    out.attrs["claimed_at"] = started
    return out


def record_results(engine, ids_by_ref: dict[str, int], results: list[SubmitResult], max_attempts: int,
                   attempts_by_ref: dict[str, int], stats: SendStats, now: datetime | None = None) -> None:
    """Record one submit's results in one transaction: queued -> submitted | rejected | failed |
    planned again (transient, attempt counted); in doubt stays queued for recovery to settle."""
    now = now.astimezone(timezone.utc).replace(tzinfo=None) if now is not None else utcnow()
    sub, rej, again, failed, doubt = [], [], [], [], []
    for r in results:
        oid = ids_by_ref[r.reference]
        if r.in_doubt:
            # it may have gone out: never send again blindly; recovery settles it from receipts
            doubt.append((r.error_code, r.error, utcnow(), now, oid))  # its claim ends now (wall clock)
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


@dataclass
class _Batch:
    """Claimed messages we hold, ready to submit, and what recording their results needs."""

    msgs: list[OutgoingMessage]
    ids_by_ref: dict[str, int]
    attempts: dict[str, int]
    contacts: frozenset[int]
    claimed_at: float  # time.monotonic() of the claim (or of the last lease renewal)
    contact_by_ref: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def from_claimed(cls, claimed: Claimed) -> "_Batch":
        keys = claimed["idempotency_key"]
        msgs = [OutgoingMessage(k, p, t, e, int(s)) for k, p, t, e, s in zip(
            keys, claimed["phone_e164"], claimed["text"], claimed["encoding"], claimed["segments"])]
        contact_of = [int(c) if c is not None else None for c in claimed["contact_id"]]
        return cls(msgs, dict(zip(keys, map(int, claimed["id"]))), dict(zip(keys, map(int, claimed["attempts"]))),
                   frozenset(c for c in contact_of if c is not None),
                   claimed.attrs.get("claimed_at", time.monotonic()), dict(zip(keys, contact_of)))

    def ids(self, msgs: list[OutgoingMessage]) -> list[int]:
        return [self.ids_by_ref[m.reference] for m in msgs]


def _claim_batch(*args, **kw) -> tuple[Claimed, "_Batch | None"]:
    """:func:`claim_columns`, and the claimed messages made ready to submit, in the store thread: the
    sending thread only takes them."""
    claimed = claim_columns(*args, **kw)
    return claimed, (_Batch.from_claimed(claimed) if not claimed.empty else None)


def _resolved(value) -> Future:
    """A future that is already done (the claimed-ahead batch after an outage's lease renewal)."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


class _SendLoop:
    """The send loop, pipelined: the gateway waits for the store only for the first claim (and the
    last record), and the store work stays strictly ordered.

    Parts (``_next_part``: up to a tenth of a second of sending at the rate, tokens taken) come from the
    batch being sent, then from the next claimed batch. The main thread submits them; a gateway that
    ``takes_more`` (Kannel) is handed ONE part by the main thread and asks for the next ones itself
    (``more``) when it has handed out the last message, so the batches follow one another without
    waiting at each batch's end for its slowest answer. One store thread does the claims and records,
    in the order they were asked for (a single-worker executor is FIFO):

    * claim-ahead: while the last part of batch k is being submitted, batch k+1 is claimed
      (planned -> queued with our lease, policy checked) so it is ready when the gateway is free;
    * record-behind: results are recorded while the next ones are in flight; a gateway that streams
      its results (Kannel) has them recorded in chunks (and at every part boundary), the rest of the
      stream still in flight.

    Why this is still at most once per idempotency key, also under kill -9:

    * A message is submitted only from a batch this loop claimed ('queued', claimed_by us), exactly
      once: each part is handed to the gateway once, and a part is handed again only after
      ``GatewayUnavailable`` (the gateway raises it before sending anything) and only while our
      lease is renewed and still ours. Claims older than half the lease are renewed before a part
      is handed out, so a claimed-ahead batch never goes out on a lease another sender may take over.
    * Few results wait to be recorded: before a part is handed out, every record but the last
      ``RECORDS_AHEAD`` (streamed chunks) has committed (``_settle``); if one failed, nothing more is
      handed out. A crash leaves what was not recorded 'queued' under our claim, exactly like a
      crash between submit and record in a serial loop: ``recover_in_flight`` settles them
      (``lookup``, stored receipts) before any of them can be planned again.
    * What provably never reached the gateway (the claimed-ahead batch, the parts not handed out)
      goes back to 'planned' when the loop stops on an error; a crash leaves it 'queued' and recovery
      re-plans it (nothing was sent). Results already returned by the gateway are always recorded
      before the loop returns or raises.
    * Transitions stay guarded on 'queued' (``update_if_queued``): a receipt recorded first wins.
    * Policy is decided at claim time: a claim skips the contacts of the batch being sent and of every
      message handed out whose result is not yet handed to the store thread (frequency caps count
      what is recorded as submitted, and the store thread records, in order, everything handed to it
      before the claim).
    """

    def __init__(self, engine, *, campaign_id: int, gateway: SmsGateway, bucket: TokenBucket, claimer: str,
                 max_messages: int, max_attempts: int, lease_s: float, stats: SendStats, now: datetime | None,
                 breaker: CircuitBreaker):
        self.engine, self.campaign_id, self.gateway, self.bucket = engine, campaign_id, gateway, bucket
        self.claimer, self.max_messages, self.max_attempts, self.lease_s = claimer, max_messages, max_attempts, lease_s
        self.stats, self.now, self.breaker = stats, now, breaker
        self.taken = 0  # claimed incl. policy-blocked: counts toward max_messages
        self.store = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smsflow-send-store")
        self.ahead: Future | None = None  # the claim of the next batch, not yet taken
        self.unrecorded: deque[Future] = deque()  # record jobs not yet known to have committed
        self.unsent: tuple[_Batch, list[OutgoingMessage]] | None = None  # never handed to the gateway
        self.next_claim = FIRST_CLAIM  # grows by RAMP per claim up to the gateway's batch_size
        self.after = 0  # the claim cursor (``claim(after=...)``): the greatest id claimed so far
        self.step = max(1, int(self.bucket.rate // 10) or 1)  # messages per part
        # the part cursor: the batch being handed out, its messages still ours, the index of the next one
        self.batch: _Batch | None = None
        self.msgs: list[OutgoingMessage] = []
        self.i = 0
        self.streaming = bool(getattr(gateway, "streams_results", False))
        self.takes_more = self.streaming and bool(getattr(gateway, "takes_more", False))
        # streaming: reference -> (outbox id, attempts, contact) of each message handed out whose result
        # is not yet handed to the store thread; the lock makes "hand results over + queue their record"
        # and "see what is in flight + queue a claim" atomic with respect to each other
        self.live: dict[str, tuple[int, int, int | None]] = {}
        self.live_lock = threading.Lock()
        self.stopping = False

    # ------------------------------------------------------------------ the loop
    def run(self) -> SendStats:
        error: BaseException | None = None
        # The objects alive now (modules, Prefect, pandas: most of this process's heap) stay out of the cyclic
        # collector's full passes while we send: each pass walked all of them, ~4 us a message of the CPU the
        # gateway's threads need (bench/send.py's no-op gateway on PostgreSQL: this process 0.27-0.32 -> 0.18-0.27
        # CPU s per 10,000 messages). Unfrozen at the end, so nothing is kept from the collector for good; left
        # alone when something else froze objects already (a forking server, another send loop of this process).
        freeze = gc.isenabled() and gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            self.ahead = self._launch_claim()
            self._warm_up()  # overlaps the first claim, which nothing else can
            while (got := self._next_part()) is not None:
                self._send_part(*got)
        except BaseException as exc:  # noqa: BLE001 - also KeyboardInterrupt / task cancellation
            error = exc
            raise
        finally:
            try:
                self._stop(error)
            finally:
                if freeze:
                    gc.unfreeze()
        return self.stats

    def _next_part(self) -> tuple[_Batch, list[OutgoingMessage]] | None:
        """The next part to submit, its tokens taken: from the batch being sent, else from the next claimed
        one; None when nothing more is due. Called by the main thread, or by a gateway thread (``more``)."""
        while not self.stopping:
            if self.batch is None or self.i >= len(self.msgs):
                self.unsent, self.batch = None, None
                batch = self._take(self.ahead if self.ahead is not None else self._claim_next())
                if batch is None:
                    return None
                self.batch, self.msgs, self.i = batch, batch.msgs, 0
            batch, i = self.batch, self.i
            self.unsent = (batch, self.msgs[i:])
            self.msgs = self._keep_lease(batch, self.msgs, i)
            if i >= len(self.msgs):
                continue
            if i + self.step >= len(self.msgs) and self.ahead is None:
                self.ahead = self._claim_next(batch.contacts)  # overlaps the last part's submit
            part = self.msgs[i : i + self.step]
            self._settle(keep=RECORDS_AHEAD if self.streaming else 1)
            if self.streaming:
                with self.live_lock:
                    for m in part:
                        ref = m.reference
                        self.live[ref] = (batch.ids_by_ref[ref], batch.attempts[ref], batch.contact_by_ref.get(ref))
            self.bucket.acquire(len(part))
            self.i = i + len(part)
            self.unsent = (batch, self.msgs[self.i :])  # from here on, ``part`` may reach the gateway
            return batch, part
        return None

    def _more(self) -> list[OutgoingMessage]:
        """For a gateway that ``takes_more``: the next part, or [] (no more: the call ends)."""
        got = self._next_part()
        return got[1] if got is not None else []

    def _send_part(self, batch: _Batch, part: list[OutgoingMessage]) -> None:
        start = self.i - len(part)
        try:
            results = self._submit(batch, part)
        except GatewayUnavailable as exc:
            # raised by the probe, before anything was sent and before ``more`` was asked for anything
            assert self.batch is batch and self.msgs[start : self.i] == part, "outage after the part was handed on"
            with self.live_lock:
                for m in part:
                    self.live.pop(m.reference, None)
            self.i = start
            self.unsent = (batch, self.msgs[start:])
            self.msgs = self._outage(exc, batch, self.msgs, start)
            return
        self.breaker.success()
        self._record(batch, results)

    def _warm_up(self) -> None:
        warm_up = getattr(self.gateway, "warm_up", None)
        if callable(warm_up):
            try:
                warm_up()
            except Exception as exc:  # noqa: BLE001 - best effort: submit reports a dead gateway itself
                log.debug("gateway warm-up failed: %s: %s", type(exc).__name__, exc)

    # ------------------------------------------------------------------ store jobs
    def _launch_claim(self, skip_contacts: Collection[int] = ()) -> Future | None:
        """Claim the next batch in the store thread: up to ``gateway.batch_size`` (the first ones smaller:
        FIRST_CLAIM, then RAMP times the one before), and no more than
        CLAIM_SECONDS of sending at the bucket's rate, so a crash leaves few messages claimed (those
        wait for their lease and, without an authoritative lookup, for evidence before they go again)."""
        per_claim = max(1, int(self.bucket.rate * CLAIM_SECONDS))
        limit = min(self.gateway.batch_size, per_claim, self.max_messages - self.taken, self.next_claim)
        if limit <= 0:
            return None
        self.next_claim *= RAMP
        return self.store.submit(_claim_batch, self.engine, self.campaign_id, limit, self.claimer, self.lease_s,
                                 now=self.now, skip_contacts=skip_contacts, after=self.after)

    def _claim_next(self, contacts: frozenset[int] = frozenset()) -> Future | None:
        """``_launch_claim`` skipping ``contacts`` and the contacts of every message in flight."""
        with self.live_lock:
            flying = {c for _id, _attempts, c in self.live.values() if c is not None}
            return self._launch_claim(contacts | flying if flying else contacts)

    def _take(self, fut: Future | None) -> _Batch | None:
        """The next batch to send, None when nothing more is due (or ``max_messages`` is reached).
        A claim whose messages were all held back by the policy is followed by another claim; one that
        found nothing past the cursor by a claim from the start (what the cursor passed by)."""
        while fut is not None:
            if fut is self.ahead:
                self.ahead = None
            claimed, batch = fut.result()
            self.after = claimed.attrs.get("last_id", self.after)
            blocked = claimed.attrs.get("policy_blocked", 0)
            self.stats.policy_blocked += blocked
            for rule, n in claimed.attrs.get("policy", {}).items():
                self.stats.held[rule] = self.stats.held.get(rule, 0) + n
            if claimed.empty and not blocked and not claimed.attrs.get("lost"):
                if self.after > 0:  # nothing past the cursor (an empty claim's last_id is its cursor)
                    self.after = 0
                    fut = self._claim_next()  # look again from the first message
                    continue
                if not claimed.attrs.get("skipped_contacts") or self.live:
                    # nothing due; or (streaming) only messages of contacts still in flight: this stream
                    # ends, and the main thread claims them once their results are recorded
                    return None
                fut = self._claim_next()  # what is left may belong to the contacts skipped: claim it now
                continue
            self.stats.claimed += len(claimed) + blocked
            self.taken += len(claimed) + blocked
            if batch is not None:
                return batch
            fut = self._claim_next()
        return None

    def _submit(self, batch: _Batch, part: list[OutgoingMessage]) -> list[SubmitResult]:
        """``gateway.submit``. A gateway that streams its results (``streams_results``) has them
        recorded chunk by chunk while the rest is still in flight, and one that ``takes_more`` asks for
        the next parts itself; only the results not recorded that way are returned (each reference is
        recorded once)."""
        if not self.streaming:
            return self.gateway.submit(part)
        more = {"more": self._more} if self.takes_more else {}
        results = self.gateway.submit(part, on_results=self._hand_over, **more)
        with self.live_lock:
            return [r for r in results if r.reference in self.live]

    def _hand_over(self, chunk: list[SubmitResult]) -> None:
        """Streaming: record a chunk of results of messages handed out (from any batch); runs in the
        gateway's threads. Each reference is recorded once (a repeat is dropped)."""
        with self.live_lock:
            found = [(r, self.live.pop(r.reference, None)) for r in chunk]
            rs = [r for r, e in found if e is not None]
            if not rs:
                return
            ids = {r.reference: e[0] for r, e in found if e is not None}
            attempts = {r.reference: e[1] for r, e in found if e is not None}
            self.unrecorded.append(self.store.submit(record_results, self.engine, ids, rs, self.max_attempts,
                                                     attempts, self.stats, now=self.now))

    def _record_job(self, batch: _Batch, results: list[SubmitResult]) -> Future:
        return self.store.submit(record_results, self.engine, batch.ids_by_ref, results, self.max_attempts,
                                 batch.attempts, self.stats, now=self.now)

    def _record(self, batch: _Batch, results: list[SubmitResult]) -> None:
        """Hand the results to the store thread; then make sure every record before it committed."""
        if results:
            if self.streaming:
                self._hand_over(results)
            else:
                self.unrecorded.append(self._record_job(batch, results))
        self._settle(keep=1)

    def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` records are outstanding; a failed record stops the loop."""
        while self.unrecorded and (len(self.unrecorded) > keep or self.unrecorded[0].done()):
            self.unrecorded.popleft().result()

    # ------------------------------------------------------------------ leases and outages
    def _keep_lease(self, batch: _Batch, msgs: list[OutgoingMessage], i: int) -> list[OutgoingMessage]:
        """Before submitting from a claim older than half the lease, renew it and drop what is no
        longer ours (a claim that expired may have been taken over by a recovering sender)."""
        if time.monotonic() - batch.claimed_at <= self.lease_s / 2:
            return msgs
        mine = renew_lease(self.engine, batch.ids(msgs[i:]), self.claimer, self.lease_s)
        batch.claimed_at = time.monotonic()
        return msgs[:i] + [m for m in msgs[i:] if batch.ids_by_ref[m.reference] in mine]

    def _outage(self, exc: GatewayUnavailable, batch: _Batch, msgs: list[OutgoingMessage],
                i: int) -> list[OutgoingMessage]:
        """Nothing of the part reached the gateway. Back off with the breaker, keep our claims alive
        (this batch's rest and the claimed-ahead one), then the caller retries the same part. When
        the breaker gives up, the rest goes back to 'planned' (never 'failed': never tried)."""
        self.stats.outages += 1
        rest = batch.ids(msgs[i:])
        try:
            self.breaker.failure(exc)
        except GatewayUnavailable:
            self.unsent = None
            release_unsent(self.engine, rest, self.claimer)
            raise
        ahead = self.ahead.result()[0] if self.ahead is not None else None
        ahead_ids = [int(x) for x in ahead["id"]] if ahead is not None and not ahead.empty else []
        mine = renew_lease(self.engine, rest + ahead_ids, self.claimer, self.lease_s)
        batch.claimed_at = time.monotonic()
        if ahead_ids:
            kept = ahead.keep(set(mine))
            kept.attrs["lost"] = len(ahead) - len(kept)
            self.ahead = _resolved((kept, _Batch.from_claimed(kept) if not kept.empty else None))
        return msgs[:i] + [m for m in msgs[i:] if batch.ids_by_ref[m.reference] in mine]

    # ------------------------------------------------------------------ stopping
    def _stop(self, error: BaseException | None) -> None:
        """Record every result the gateway returned, give back what was claimed but never
        submitted, stop the store thread. The loop's own error wins over one found here."""
        self.stopping = True  # a gateway thread still asking for more gets nothing
        first: BaseException | None = None
        try:
            while self.unrecorded:
                try:
                    self.unrecorded.popleft().result()
                except BaseException as exc:  # noqa: BLE001
                    first = first or exc
            if error is not None or first is not None:
                self._release_unsubmitted()
        finally:
            self.store.shutdown(wait=True)
        if error is None and first is not None:
            raise first

    def _release_unsubmitted(self) -> None:
        ids: list[int] = []
        if self.unsent is not None:
            batch, never = self.unsent
            ids += batch.ids(never)
        if self.ahead is not None:
            try:
                df, _batch = self.ahead.result()
                ids += [int(x) for x in df["id"]]
            except Exception:  # noqa: BLE001 - the claim itself failed: nothing was claimed
                pass
        if ids:
            try:
                release_unsent(self.engine, ids, self.claimer)
            except Exception:  # noqa: BLE001 - still 'queued' under our claim: recovery re-plans them
                pass


def send_messages(
    engine,
    *,
    campaign_id: int,
    gateway: SmsGateway,
    bucket: TokenBucket,
    claimer: str,
    max_messages: int,
    max_attempts: int = 5,
    lease_s: float = CLAIM_LEASE_S,
    stats: SendStats | None = None,
    now: datetime | None = None,
    breaker: "CircuitBreaker | None" = None,
) -> SendStats:
    """Send up to ``max_messages`` planned messages of a campaign. Returns counts.

    Pipelined (``_SendLoop``): the next batch is claimed and the previous part recorded while the
    gateway works, in one store thread, so the gateway is not kept waiting by the bookkeeping.
    A gateway outage opens the circuit breaker: exponential backoff (1 s doubling to 30 s) while
    our claims are kept alive; after ``breaker.max_open_s`` the unsent messages go back to
    'planned' (never 'failed': they were never tried) and GatewayUnavailable propagates."""
    loop = _SendLoop(engine, campaign_id=campaign_id, gateway=gateway, bucket=bucket, claimer=claimer,
                     max_messages=max_messages, max_attempts=max_attempts, lease_s=lease_s,
                     stats=stats or SendStats(), now=now, breaker=breaker or CircuitBreaker())
    return loop.run()


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.retrying import retry_if_transient  # noqa: E402


@task(name="send-batch", retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def send_task(campaign_id: int, gateway: SmsGateway, rate: float, max_messages: int, database_url: str | None,
              now: datetime | None = None) -> SendStats:
    """Send up to ``max_messages``; a retry first resolves what the failed attempt left in flight.
    At most ``gateway.senders`` senders per gateway at a time (store leases ``gateway-<name>``,
    ``gateway-<name>#1``, ..., see ``store.leases``), each at its share of the rate, so campaigns sharing a
    provider share its rate limit; a dead sender's lease lapses by itself."""
    from prefect.context import get_run_context


    engine = get_engine(database_url)
    ctx = get_run_context()
    claimer = str(ctx.task_run.id)
    stats = SendStats()
    senders = max(1, int(getattr(gateway, "senders", 1) or 1))
    with SlotLease(engine, f"gateway-{gateway.gateway_name}", process_holder(claimer), slots=senders,
                   ttl_s=GATEWAY_LEASE_S):
        stats.recovered_submitted, stats.recovered_replanned = recover_in_flight(engine, campaign_id, gateway, claimer,
                                                                                 claimers_hold_leases=True)
        return send_messages(engine, campaign_id=campaign_id, gateway=gateway, bucket=TokenBucket(rate / senders),
                             claimer=claimer, max_messages=max_messages, stats=stats, now=now)
