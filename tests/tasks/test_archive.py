"""tasks/archive.py: a finished campaign leaves the live outbox in short transactions and cannot be rerun."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import text

from store.db import bulk_insert, utcnow
from tasks.accounting import ensure_campaign
from tasks.archive import ArchiveRefused, archive_campaign

COLS = ("idempotency_key", "campaign_id", "step", "phone_e164", "encoding", "segments", "cost", "state", "attempts",
        "gateway_message_id", "planned_at", "updated_at")


def _campaign(engine, name: str, states: list[str], age_days: float) -> int:
    cid = ensure_campaign(engine, name=name, source="s", segment="all", template_name="t", kind="marketing",
                          gateway="sandbox", price_per_segment=2.0)
    at = utcnow() - timedelta(days=age_days)
    with engine.begin() as c:
        bulk_insert(c, "outbox", COLS, [(f"{name}:{i}", cid, "main", "+79160000000", "GSM-7", 1, 2.0, st, 1, f"{name}-m{i}",
                                         at, at) for i, st in enumerate(states)])
        ids = [r[0] for r in c.execute(text("SELECT id FROM outbox WHERE campaign_id = :c ORDER BY id"), {"c": cid})]
        bulk_insert(c, "delivery_receipts", ("gateway", "gateway_message_id", "status", "received_at", "outbox_id"),
                    [("sandbox", f"{name}-m{i}", "delivered", at, oid) for i, oid in enumerate(ids)])
    return cid


def _count(engine, sql: str, **p) -> int:
    with engine.begin() as c:
        return int(c.execute(text(sql), p).scalar())


def test_archive_removes_messages_in_batches_and_keeps_the_totals(engine):
    cid = _campaign(engine, "old", ["delivered"] * 95 + ["undelivered"] * 5, age_days=40)
    other = _campaign(engine, "other", ["delivered"] * 7, age_days=40)
    res = archive_campaign(engine, "old", batch=30)
    assert (res.messages, res.receipts, res.batches) == (100, 100, 4)
    assert res.summary["outcomes"]["delivered"] == 95 and res.summary["planned"] == 100
    assert _count(engine, "SELECT COUNT(*) FROM outbox WHERE campaign_id = :c", c=cid) == 0
    assert _count(engine, "SELECT COUNT(*) FROM outbox WHERE campaign_id = :c", c=other) == 7  # others untouched
    assert _count(engine, "SELECT COUNT(*) FROM delivery_receipts") == 7
    with engine.begin() as c:
        status, params = c.execute(text("SELECT status, params FROM campaigns WHERE id = :c"), {"c": cid}).one()
    params = params if isinstance(params, dict) else json.loads(params)
    assert status == "archived" and params["archived"]["sent"] == 100 and params["archived"]["cost_spent"] == 200.0
    with pytest.raises(ValueError, match="archived"):  # a rerun by name could send twice: refused
        ensure_campaign(engine, name="old", source="s", segment="all", template_name="t", kind="marketing",
                        gateway="sandbox", price_per_segment=2.0)
    with pytest.raises(ArchiveRefused, match="archived already"):
        archive_campaign(engine, "old")


def test_archive_refuses_live_or_recent_campaigns(engine):
    _campaign(engine, "live", ["delivered", "submitted"], age_days=40)
    _campaign(engine, "recent", ["delivered"] * 3, age_days=2)
    with pytest.raises(ArchiveRefused, match="1 message"):
        archive_campaign(engine, "live")
    with pytest.raises(ArchiveRefused, match="frequency caps"):
        archive_campaign(engine, "recent")
    with pytest.raises(ArchiveRefused, match="no campaign"):
        archive_campaign(engine, "nope")
    assert archive_campaign(engine, "recent", older_than_days=1).messages == 3
    assert _count(engine, "SELECT COUNT(*) FROM outbox") == 2


def test_an_archive_run_that_died_half_way_is_finished_by_the_next(engine, monkeypatch):
    """The campaign is marked archived (with its totals) before the first batch is removed: a run killed
    between batches leaves it archived with messages left, and running it again removes the rest."""
    import tasks.archive as archive

    class Killed(BaseException):
        """The process is gone: nothing after this runs."""

    _campaign(engine, "half", ["delivered"] * 50, age_days=40)
    batches: list[str] = []

    def text_dying_before_the_second_batch(sql):
        if sql.startswith("DELETE FROM outbox"):
            if batches:
                raise Killed()
            batches.append(sql)
        return text(sql)

    monkeypatch.setattr(archive, "text", text_dying_before_the_second_batch)
    with pytest.raises(Killed):
        archive_campaign(engine, "half", batch=20)
    monkeypatch.undo()
    assert _count(engine, "SELECT COUNT(*) FROM outbox") == 30  # the first batch of 20 went
    with engine.begin() as c:
        assert c.execute(text("SELECT status FROM campaigns WHERE name = 'half'")).scalar() == "archived"
    res = archive_campaign(engine, "half", batch=20)
    assert res.messages == 30 and res.summary["planned"] == 50 and res.summary["outcomes"]["delivered"] == 50
    assert _count(engine, "SELECT COUNT(*) FROM outbox") == 0
    with pytest.raises(ArchiveRefused, match="archived already"):
        archive_campaign(engine, "half")


def test_archive_also_deletes_parked_receipts_past_the_retention(engine):
    """Receipts that reconcile parked (applied, naming no message) belong to no campaign: an archive run
    deletes those that arrived more than ``older_than_days`` ago, oldest first, in batches, through the
    partial ``ix_receipts_parked`` (migration 0020) on both stores, among many receipts of messages.
    Younger parked ones, unapplied ones and receipts of messages stay."""
    from store.db import is_postgres
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    _campaign(engine, "done", ["delivered"] * 3, age_days=40)
    kept = _campaign(engine, "kept", ["delivered"], age_days=40)
    now = utcnow()
    with engine.begin() as c:
        pg = is_postgres(c)
        oid = c.execute(text("SELECT id FROM outbox WHERE campaign_id = :c"), {"c": kept}).scalar()
        c.execute(text(f"INSERT INTO delivery_receipts (gateway, gateway_message_id, status, received_at, applied_at, "
                       f"outbox_id) SELECT 'sandbox', 'many' || n, 'enroute', :t, :t, :o FROM ({numbers_sql(pg, 20000)}) AS q"),
                  {"t": now - timedelta(days=60), "o": oid})
        for gid, age, applied in [("p1", 45, True), ("p2", 44, True), ("p3", 43, True), ("p4", 42, True), ("p5", 31, True),
                                  ("young", 29, True), ("waiting", 50, False)]:
            at = now - timedelta(days=age)
            c.execute(text("INSERT INTO delivery_receipts (gateway, gateway_message_id, status, received_at, applied_at) "
                           "VALUES ('sandbox', :g, 'delivered', :t, :a)"), {"g": gid, "t": at, "a": at if applied else None})
    analyze(engine, "delivery_receipts")
    with statements_run(engine) as seen:
        res = archive_campaign(engine, "done", batch=2, now=now)
    assert (res.messages, res.receipts, res.parked_receipts) == (3, 3, 5)
    purges = [(s, p) for s, p in seen if "outbox_id IS NULL" in s and s.startswith("DELETE")]
    assert len(purges) == 3  # 2 + 2 + 1: short transactions
    plan = plan_of(engine, *purges[0])
    assert "ix_receipts_parked" in plan, plan
    with engine.begin() as c:
        left = {r[0] for r in c.execute(text("SELECT gateway_message_id FROM delivery_receipts "
                                             "WHERE gateway_message_id NOT LIKE 'many%'"))}
    assert left == {"kept-m0", "young", "waiting"}, left
    assert _count(engine, "SELECT COUNT(*) FROM delivery_receipts WHERE gateway_message_id LIKE 'many%'") == 20000
    assert res.as_dict()["parked_receipts"] == 5
