"""SMS gateways as Prefect Blocks.

One abstract interface, ``SmsGateway``; every gateway submits batches of messages that
carry our own reference (the outbox idempotency key), can tell which references it has
already accepted (``lookup``, used to resolve messages left in flight by a crash), and
hands over delivery receipts (``fetch_receipts``; push-based gateways deliver them to
the callback service instead and return nothing here).

``SandboxGateway`` is the embedded default: a simulated provider with its own durable
state (a SQLite file), realistic receipt delays, configurable failure rates and
real-world error codes. It never sends anything anywhere.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar
from datetime import datetime, timezone
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field
from smsflow.settings import DEFAULT_CURRENCY, DEFAULT_SENDER_ID, SANDBOX_PRICE_PER_SEGMENT, get_settings


@dataclass(frozen=True)
class OutgoingMessage:
    reference: str  # our idempotency key: travels with the message
    phone_e164: str
    text: str
    encoding: str = "GSM-7"
    segments: int = 1


@dataclass(frozen=True)
class SubmitResult:
    reference: str
    accepted: bool
    gateway_message_id: str | None = None
    error_code: str | None = None
    error: str | None = None
    transient: bool = False  # worth retrying later (throttled, gateway down): provably NOT sent
    in_doubt: bool = False  # the request left us but no answer came: it may have been sent


@dataclass(frozen=True)
class Receipt:
    gateway_message_id: str | None
    reference: str | None
    status: str  # accepted|enroute|delivered|undelivered|expired|rejected|unknown
    error_code: str | None
    event_at: datetime | None
    raw: dict = field(default_factory=dict)


class GatewayUnavailable(RuntimeError):
    """The gateway cannot be reached at all; nothing in the batch was submitted."""


class SmsGateway(Block, ABC):
    _block_type_name = "SMS Gateway"

    rate_per_second: float = Field(default=50.0, gt=0, description="Provider rate limit, messages per second.")
    batch_size: int = Field(default=500, ge=1, description="Messages per submit call.")
    price_per_segment: float = Field(default=0.0, ge=0, description="Price of one SMS part (segment), for costs.")
    currency: str = Field(default=DEFAULT_CURRENCY, pattern=r"^[A-Z]{3}$", description="ISO 4217 currency of the price (RUB, USD, EUR).")
    sender_id: str = Field(default=DEFAULT_SENDER_ID, description="Alphanumeric sender name or number.")
    senders: int = Field(
        default=1, ge=1, le=32,
        description="Senders that may use this gateway at once (one per bind or connection the provider allows; "
        "in distributed mode one send deployment run each); they share rate_per_second.",
    )
    evidence_grace_s: float = Field(
        default=120.0, ge=0,
        description="After a crash, how long a message with no trace at the gateway waits for a late receipt "
        "before it may be sent again (gateways whose lookup is authoritative do not wait).",
    )
    lookup_is_authoritative: ClassVar[bool] = False  # True when lookup() knows every accepted reference
    # True when submit(messages, on_results=fn) hands over results in chunks as they come (fn is
    # called from the gateway's threads, each result once, before submit returns them all)
    streams_results: ClassVar[bool] = False
    # True when submit(messages, on_results=fn, more=next_part) also takes more messages while it runs:
    # when the messages it has are all handed out, one of its threads calls next_part() for the next
    # ones (an empty list: no more), so a stream of batches goes out without waiting at each batch's end
    takes_more: ClassVar[bool] = False

    @property
    def gateway_name(self) -> str:
        name = getattr(self, "_block_document_name", None)
        return name or type(self).__name__.lower()

    @abstractmethod
    def submit(self, messages: list[OutgoingMessage]) -> list[SubmitResult]:
        """Submit a batch; one result per message, in order."""

    @abstractmethod
    def lookup(self, references: list[str]) -> dict[str, str]:
        """reference -> gateway message id, for references this gateway has already accepted."""

    def warm_up(self) -> None:
        """Optional, best effort: get ready to submit (e.g. open connections). The send loop calls it
        while its first claim runs. It must not send any message; errors are ignored by the caller
        (``submit`` reports an unreachable gateway itself)."""

    def fetch_receipts(self, limit: int = 100_000) -> list[Receipt]:
        return []


# Real-world error codes: SMPP command_status at submit, MAP / SMSC errors in receipts.
SUBMIT_ERRORS = {
    "rejected": ("0x0000000B", "ESME_RINVDSTADR: invalid destination address"),
    "throttled": ("0x00000058", "ESME_RTHROTTLED: throttling error"),
}
RECEIPT_ERRORS = {
    "undelivered": [
        ("001", "unknown subscriber"),
        ("027", "absent subscriber"),
        ("013", "call barred"),
        ("031", "subscriber busy for MT SMS"),
        ("034", "system failure"),
    ],
    "expired": [("000", "validity period expired")],
}
_STAT = {"delivered": "DELIVRD", "undelivered": "UNDELIV", "expired": "EXPIRED", "enroute": "ENROUTE", "accepted": "ACCEPTD"}


def _unit(seed: int, ref: str, salt: str) -> float:
    h = hashlib.blake2b(f"{seed}:{salt}:{ref}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


class SandboxGateway(SmsGateway):
    """A simulated provider: accepts messages, assigns ids, produces receipts later."""

    _block_type_name = "Sandbox SMS Gateway"
    lookup_is_authoritative: ClassVar[bool] = True  # its submit and its record are one transaction

    state_path: str | None = Field(default=None, description="SQLite file of the simulated provider (default: data dir).")
    rejected_rate: float = Field(default=0.01, ge=0, le=1, description="Share rejected at submit (invalid destination).")
    undelivered_rate: float = Field(default=0.04, ge=0, le=1)
    expired_rate: float = Field(default=0.01, ge=0, le=1)
    throttle_rate: float = Field(default=0.0, ge=0, le=1, description="Share of submits answered 'throttled' (transient).")
    duplicate_receipt_rate: float = Field(default=0.03, ge=0, le=1, description="Receipts sent twice.")
    late_intermediate_rate: float = Field(default=0.05, ge=0, le=1, description="An 'enroute' receipt arriving after the final one.")
    min_delay_s: float = Field(default=0.2, ge=0)
    max_delay_s: float = Field(default=3.0, ge=0)
    seed: int = 7
    rate_per_second: float = 2000.0
    batch_size: int = 1000
    price_per_segment: float = SANDBOX_PRICE_PER_SEGMENT

    # ------------------------------------------------------------------ state
    def _path(self) -> Path:
        if self.state_path:
            return Path(self.state_path)

        return get_settings().data_dir / "sandbox_gateway.sqlite"

    def _db(self) -> sqlite3.Connection:
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS messages (reference TEXT PRIMARY KEY, msg_id TEXT UNIQUE, phone TEXT,"
            " text TEXT, segments INTEGER, submitted_at REAL, outcome TEXT, err TEXT, due_at REAL,"
            " duplicate INTEGER, late_intermediate INTEGER, emitted INTEGER DEFAULT 0)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS ix_due ON messages (emitted, due_at)")
        db.execute("CREATE TABLE IF NOT EXISTS submit_calls (reference TEXT, at REAL, outcome TEXT)")
        return db

    def _decide(self, ref: str) -> tuple[str, str, float]:
        u = _unit(self.seed, ref, "outcome")
        if u < self.undelivered_rate:
            codes = RECEIPT_ERRORS["undelivered"]
            code = codes[int(_unit(self.seed, ref, "code") * len(codes))][0]
            outcome = "undelivered"
        elif u < self.undelivered_rate + self.expired_rate:
            outcome, code = "expired", "000"
        else:
            outcome, code = "delivered", "000"
        d = _unit(self.seed, ref, "delay")
        delay = self.min_delay_s + (self.max_delay_s - self.min_delay_s) * d * d  # most receipts come fast
        return outcome, code, delay

    # ------------------------------------------------------------------ interface
    def submit(self, messages: list[OutgoingMessage]) -> list[SubmitResult]:
        if not messages:
            return []
        now = time.time()
        db = self._db()
        results: list[SubmitResult] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            calls = []
            for m in messages:
                row = db.execute("SELECT msg_id FROM messages WHERE reference = ?", (m.reference,)).fetchone()
                if row is not None:  # the provider's idempotency: same reference, same message, no second send
                    results.append(SubmitResult(m.reference, True, row[0]))
                    calls.append((m.reference, now, "duplicate"))
                    continue
                if _unit(self.seed, m.reference + str(now), "throttle") < self.throttle_rate:
                    code, err = SUBMIT_ERRORS["throttled"]
                    results.append(SubmitResult(m.reference, False, None, code, err, transient=True))
                    calls.append((m.reference, now, "throttled"))
                    continue
                if _unit(self.seed, m.reference, "reject") < self.rejected_rate:
                    code, err = SUBMIT_ERRORS["rejected"]
                    results.append(SubmitResult(m.reference, False, None, code, err))
                    calls.append((m.reference, now, "rejected"))
                    continue
                outcome, code, delay = self._decide(m.reference)
                msg_id = uuid.uuid4().hex[:16]
                db.execute(
                    "INSERT INTO messages (reference, msg_id, phone, text, segments, submitted_at, outcome, err,"
                    " due_at, duplicate, late_intermediate) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        m.reference,
                        msg_id,
                        m.phone_e164,
                        m.text,
                        m.segments,
                        now,
                        outcome,
                        code,
                        now + delay,
                        int(_unit(self.seed, m.reference, "dup") < self.duplicate_receipt_rate),
                        int(_unit(self.seed, m.reference, "late") < self.late_intermediate_rate),
                    ),
                )
                calls.append((m.reference, now, "sent"))
                results.append(SubmitResult(m.reference, True, msg_id))
            db.executemany("INSERT INTO submit_calls VALUES (?,?,?)", calls)
            db.execute("COMMIT")
        finally:
            db.close()
        return results

    def lookup(self, references: list[str]) -> dict[str, str]:
        if not references:
            return {}
        db = self._db()
        try:
            out: dict[str, str] = {}
            for i in range(0, len(references), 900):
                chunk = references[i : i + 900]
                q = f"SELECT reference, msg_id FROM messages WHERE reference IN ({','.join('?' * len(chunk))})"
                out.update(dict(db.execute(q, chunk).fetchall()))
            return out
        finally:
            db.close()

    def fetch_receipts(self, limit: int = 100_000) -> list[Receipt]:
        now = time.time()
        db = self._db()
        receipts: list[Receipt] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT reference, msg_id, submitted_at, outcome, err, due_at, duplicate, late_intermediate"
                " FROM messages WHERE emitted = 0 AND due_at <= ? ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
            for ref, msg_id, sub_at, outcome, err, due_at, dup, late in rows:
                final = self._receipt(msg_id, ref, outcome, err, sub_at, due_at)
                receipts.append(final)
                if dup:
                    receipts.append(final)
                if late:  # an intermediate state arriving after the final one: must not win
                    receipts.append(self._receipt(msg_id, ref, "enroute", "000", sub_at, due_at))
            db.executemany("UPDATE messages SET emitted = 1 WHERE reference = ?", [(r[0],) for r in rows])
            db.execute("COMMIT")
        finally:
            db.close()
        return receipts

    @staticmethod
    def _receipt(msg_id, ref, status, err, sub_at, done_at) -> Receipt:
        sub = datetime.fromtimestamp(sub_at, timezone.utc)
        done = datetime.fromtimestamp(done_at, timezone.utc)
        text = (
            f"id:{msg_id} sub:001 dlvrd:{'001' if status == 'delivered' else '000'} "
            f"submit date:{sub:%y%m%d%H%M} done date:{done:%y%m%d%H%M} stat:{_STAT[status]} err:{err} text:"
        )
        return Receipt(msg_id, ref, status, err, done.replace(tzinfo=None), {"smpp_receipt": text})

    # ------------------------------------------------------------------ test/bench helpers
    def sent_count_by_reference(self) -> dict[str, int]:
        """How many times each reference was really sent (must be 1)."""
        db = self._db()
        try:
            return dict(
                db.execute("SELECT reference, COUNT(*) FROM submit_calls WHERE outcome = 'sent' GROUP BY reference").fetchall()
            )
        finally:
            db.close()

    def drain_all_due(self) -> None:
        """Make every pending receipt due now (demo/test helper: no waiting for delays)."""
        db = self._db()
        try:
            db.execute("UPDATE messages SET due_at = ? WHERE emitted = 0", (time.time() - 1,))
        finally:
            db.close()
