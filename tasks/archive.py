"""Archive a finished campaign: its messages leave the live outbox in short transactions, its totals stay.

A long-lived outbox grows by a row per message. Deleting a million-message campaign in one
``DELETE`` holds a transaction (and, on PostgreSQL, a snapshot that stops vacuum everywhere) for
minutes. Instead the rows go in batches of ``batch`` ids, one short transaction each; the receipts
and render-quarantine rows of those messages go with them, and the campaign row keeps its funnel and
outcomes (``campaigns.params['archived']``) with status ``archived``.

Safety: the outbox is what makes a rerun send nothing twice and what frequency caps count, so
- a campaign with messages still planned, queued or submitted (no final state yet) is refused;
- so is one whose last message changed less than ``older_than_days`` ago (default: 30, the longest
  frequency-cap period), so caps never lose a send they must count;
- an archived campaign cannot be reopened by name (``ensure_campaign`` refuses it).
Receipts that reconcile parked (naming no message: another sender on the gateway, a message sent by hand) belong
to no campaign: each archive run also deletes those that arrived more than ``older_than_days`` ago, oldest first,
in transactions of ``batch`` rows (``purge_parked_receipts``).
An archive run that dies half-way (kill -9 between batches) is finished by running it again: the
campaign is marked archived, with its totals, before the first batch goes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text

from store.db import utcnow
from store.models import FINAL_STATES
from tasks.accounting import campaign_accounting, log_event
from tasks.outcomes import message_outcomes
from tasks.policy import PERIOD_DAYS

class ArchiveRefused(ValueError):
    """The campaign cannot be archived (yet): the message says why."""


@dataclass
class ArchiveResult:
    campaign: str
    messages: int = 0
    receipts: int = 0
    quarantine: int = 0
    parked_receipts: int = 0  # receipts naming no message, past the retention (any campaign's run removes them)
    batches: int = 0
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign, "messages": self.messages, "receipts": self.receipts,
                "quarantine": self.quarantine,
                "parked_receipts": self.parked_receipts, "batches": self.batches, "summary": self.summary}


def archive_campaign(engine, name: str, *, batch: int = 10_000, older_than_days: float = max(PERIOD_DAYS.values()),
                     now: datetime | None = None) -> ArchiveResult:
    now = now or utcnow()
    with engine.begin() as conn:
        row = conn.execute(text("SELECT id, status, params FROM campaigns WHERE name = :n"), {"n": name}).first()
        if row is None:
            raise ArchiveRefused(f"no campaign named {name!r}")
        cid, status = int(row[0]), row[1]
        params = (json.loads(row[2]) if isinstance(row[2], str) else row[2]) or {}
        left = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c"), {"c": cid}).scalar()
        live = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c AND state NOT IN :final").bindparams(
            bindparam("final", expanding=True)), {"c": cid, "final": sorted(s.value for s in FINAL_STATES)}).scalar()
        last = conn.execute(text("SELECT MAX(updated_at) FROM outbox WHERE campaign_id = :c"), {"c": cid}).scalar()
    result = ArchiveResult(name)
    if status == "archived":  # an archive run that died half-way is finished; its totals were kept first
        if not left:
            raise ArchiveRefused(f"campaign {name!r} is archived already")
        result.summary = {k: v for k, v in params.get("archived", {}).items() if k != "at"}
    else:
        if live:
            raise ArchiveRefused(f"campaign {name!r} still has {live} message(s) planned, queued or submitted; "
                                 "archive it once every message is final")
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        if last is not None and last > now - timedelta(days=older_than_days):
            raise ArchiveRefused(f"campaign {name!r} changed less than {older_than_days:g} days ago "
                                 f"({last:%Y-%m-%d %H:%M} UTC); frequency caps still count its messages")
        result.summary = {**campaign_accounting(engine, cid), **message_outcomes(engine, cid)}
        params["archived"] = {"at": now.isoformat(), **result.summary}
        with engine.begin() as conn:  # first: from now on the campaign cannot be reopened (and resent)
            conn.execute(text("UPDATE campaigns SET status = 'archived', params = :p WHERE id = :c"),
                         {"p": json.dumps(params, default=str), "c": cid})
    after = 0  # past the batches deleted: a batch does not step over the dead rows of the ones before
    while True:
        with engine.begin() as conn:
            ids = [int(r[0]) for r in conn.execute(text(
                "SELECT id FROM outbox WHERE campaign_id = :c AND id > :after ORDER BY id LIMIT :n"),
                {"c": cid, "after": after, "n": int(batch)})]
            if not ids:
                break
            lo, hi = ids[0], ids[-1]  # one id range per batch: index range scans, no long IN lists
            after = hi
            rng = {"c": cid, "lo": lo, "hi": hi}
            result.receipts += conn.execute(text(
                "DELETE FROM delivery_receipts WHERE outbox_id IN (SELECT id FROM outbox WHERE campaign_id = :c "
                "AND id BETWEEN :lo AND :hi)"), rng).rowcount or 0
            result.messages += conn.execute(text(
                "DELETE FROM outbox WHERE campaign_id = :c AND id BETWEEN :lo AND :hi"), rng).rowcount or 0
            result.batches += 1
    with engine.begin() as conn:
        result.quarantine = conn.execute(text("DELETE FROM quarantine WHERE step = 'render' AND campaign_id = :c"),
                                         {"c": cid}).rowcount or 0
    result.parked_receipts = purge_parked_receipts(engine, older_than_days, batch=batch, now=now)
    log_event(engine, "campaign.archived", campaign_id=cid, emit=False, payload=result.as_dict())
    return result


def purge_parked_receipts(engine, older_than_days: float, *, batch: int = 10_000, now: datetime | None = None) -> int:
    """Delete the receipts reconcile parked (applied, naming no message) that arrived more than
    ``older_than_days`` ago, oldest first, ``batch`` at a time (one short transaction each, through
    ``ix_receipts_parked``); how many went."""
    cut = (now or utcnow()) - timedelta(days=older_than_days)
    gone = 0
    while True:
        with engine.begin() as conn:
            n = conn.execute(text(
                "DELETE FROM delivery_receipts WHERE id IN (SELECT id FROM delivery_receipts WHERE applied_at IS NOT NULL "
                "AND outbox_id IS NULL AND received_at < :cut ORDER BY received_at LIMIT :n)"),
                {"cut": cut, "n": int(batch)}).rowcount or 0
        gone += n
        if n < batch:
            return gone
