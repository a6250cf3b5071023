"""tasks/reconcile.py: receipts to final states."""
from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import text

from blocks.gateway import SubmitResult
from store.db import utcnow
from tasks.reconcile import apply_receipts, expire_stale, store_receipts
from tasks.send import claim
from tests.pipeline import _planned, _submitted, q


def test_receipts_out_of_order_and_twice_end_in_the_right_state(engine, tmp_path):
    cid, gw = _submitted(engine, tmp_path, 30, duplicate_receipt_rate=1.0, late_intermediate_rate=1.0,
                         undelivered_rate=0.3)
    receipts = gw.fetch_receipts()
    assert len(receipts) == 90  # final + duplicate + late 'enroute' for each
    store_receipts(engine, "sandbox", list(reversed(receipts)))
    s = apply_receipts(engine)
    assert s.applied == 30
    again = apply_receipts(engine)
    assert again.applied == 0
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state IN ('delivered','undelivered','expired')") == 30
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='undelivered' AND error_code IS NOT NULL") >= 1
    # a late intermediate receipt after everything: still final
    store_receipts(engine, "sandbox", [r for r in receipts if r.status == "enroute"])
    apply_receipts(engine)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted'") == 0


def test_receipt_before_submit_is_recorded(engine, tmp_path):
    from blocks.gateway import Receipt

    cid, _ = _planned(engine, tmp_path, 3)
    df = claim(engine, cid, 3, "x")
    ref = df["idempotency_key"].iloc[0]
    store_receipts(engine, "sandbox", [Receipt("gw-1", ref, "delivered", "000", utcnow(), {})])
    assert apply_receipts(engine).applied == 1
    from tasks.send import SendStats, record_results

    ids = dict(zip(df["idempotency_key"], df["id"].astype(int)))
    record_results(engine, ids, [SubmitResult(k, True, f"gw-{i}") for i, k in enumerate(df["idempotency_key"], 1)],
                   5, {}, SendStats())
    assert q(engine, "SELECT state FROM outbox WHERE idempotency_key=:k", k=ref) == "delivered"
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted'") == 2


def test_unknown_receipt_waits_then_applies(engine, tmp_path):
    from blocks.gateway import Receipt

    cid, gw = _submitted(engine, tmp_path, 2)
    store_receipts(engine, "sandbox", [Receipt("not-yet-known", None, "delivered", "000", utcnow(), {})])
    s = apply_receipts(engine)
    assert s.applied == 0 and s.pending == 1
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET gateway_message_id='not-yet-known' WHERE id=(SELECT MIN(id) FROM outbox)"))
    assert apply_receipts(engine).applied == 1


def test_ttl_expiry_and_a_real_receipt_still_wins(engine, tmp_path):
    cid, gw = _submitted(engine, tmp_path, 4)
    assert expire_stale(engine, timedelta(hours=1), now=utcnow() + timedelta(hours=2)) == 4
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='expired' AND error_code='TTL'") == 4
    store_receipts(engine, "sandbox", gw.fetch_receipts())
    apply_receipts(engine)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE error_code='TTL'") == 0


def _messages(c, campaign: str, numbers: str, now, state: str, gateway_id: str) -> int:
    """A campaign and one message per row ``n`` of ``numbers`` (key 'm<n>'), with SQL for its state and
    gateway id; the campaign's id."""
    c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                   "VALUES (:n, 's', 'all', 't', 'marketing', 0, 'running')"), {"n": campaign})
    cid = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": campaign}).scalar()
    c.execute(text(f"INSERT INTO outbox (idempotency_key, campaign_id, step, phone_e164, text, encoding, segments, cost, "
                   f"state, attempts, planned_at, updated_at, gateway_message_id) SELECT 'm' || n, :c, 'main', '+7916', "
                   f"'hi', 'GSM-7', 1, 0, {state}, 0, :t, :t, {gateway_id} FROM ({numbers}) AS q"), {"c": cid, "t": now})
    return cid


def _applied_history(c, numbers: str, at) -> None:
    """Receipts already applied (gateway id 'old<n>'), one per row ``n`` of ``numbers``, received at ``at``."""
    c.execute(text(f"INSERT INTO delivery_receipts (gateway, gateway_message_id, reference, status, received_at, "
                   f"applied_at) SELECT 'sandbox', 'old' || n, 'm' || n, 'enroute', :t, :t FROM ({numbers}) AS q"),
              {"t": at})


def test_receipts_without_our_reference_find_their_message_through_the_gateway_id_index(engine):
    """Migration 0017 makes ``ix_outbox_gateway_message_id`` partial (only messages that have a gateway id):
    the join of receipts that name only the gateway's id must still use it, on both stores, among many
    messages that have none yet."""
    from blocks.gateway import Receipt
    from store.db import is_postgres
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    now = utcnow()
    with engine.begin() as c:
        pg = is_postgres(c)
        # 20,000 messages: the even ones submitted with a gateway id, the odd ones still planned (none)
        _messages(c, "g", numbers_sql(pg, 20000), now, state="CASE WHEN n % 2 = 0 THEN 'submitted' ELSE 'planned' END",
                  gateway_id="CASE WHEN n % 2 = 0 THEN 'gw' || n END")
    analyze(engine, "outbox")
    store_receipts(engine, "sandbox", [Receipt(f"gw{n}", None, "delivered", "000", now, {}) for n in (0, 2, 4)])
    with statements_run(engine) as seen:
        assert apply_receipts(engine).applied == 3
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state = 'delivered'") == 3
    (stmt, params), = [(s, p) for s, p in seen if "o.gateway_message_id = r.gateway_message_id" in s]
    plan = plan_of(engine, stmt[stmt.index("SELECT"):], params)  # the staging's join (its temp table is the run's)
    assert "ix_outbox_gateway_message_id" in plan, plan


def test_the_unapplied_receipts_are_found_through_a_partial_index_and_applying_checks_no_key(engine):
    """Migration 0018: ``ix_receipts_unapplied`` holds only unapplied receipts and the apply's join reads
    them through it on both stores (not every receipt ever stored); on PostgreSQL ``outbox_id`` carries no
    foreign key (a FOR KEY SHARE row lock per applied receipt), SQLite keeps it. Applied receipts keep
    their message's id."""
    from sqlalchemy import inspect

    from blocks.gateway import Receipt
    from store.db import is_postgres
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    now = utcnow()
    with engine.begin() as c:
        pg = is_postgres(c)
        _messages(c, "u", numbers_sql(pg, 20000), now, state="'submitted'", gateway_id="'gw' || n")
        _applied_history(c, numbers_sql(pg, 20000), now)  # 3 new ones below
    analyze(engine, "delivery_receipts")
    store_receipts(engine, "sandbox", [Receipt(f"gw{n}", f"m{n}", "delivered", "000", now, {}) for n in (5, 6, 7)])
    with statements_run(engine) as seen:
        assert apply_receipts(engine).applied == 3
    (stmt, params), = [(s, p) for s, p in seen if "o.idempotency_key = r.reference" in s]
    assert "ix_receipts_unapplied" in plan_of(engine, stmt[stmt.index("SELECT"):], params)
    with engine.begin() as c:
        got = c.execute(text("SELECT r.reference, o.idempotency_key FROM delivery_receipts r JOIN outbox o "
                             "ON o.id = r.outbox_id WHERE r.gateway_message_id LIKE 'gw%' ORDER BY r.id")).fetchall()
        index_sql = c.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_receipts_unapplied'") if pg else
                              text("SELECT sql FROM sqlite_master WHERE name = 'ix_receipts_unapplied'")).scalar()
    assert [tuple(r) for r in got] == [("m5", "m5"), ("m6", "m6"), ("m7", "m7")]
    assert "applied_at IS NULL" in index_sql, index_sql
    keys = {fk["constrained_columns"][0] for fk in inspect(engine).get_foreign_keys("delivery_receipts")}
    assert ("outbox_id" in keys) is (not pg), keys


def test_receipts_that_name_no_message_an_hour_after_arriving_are_parked(engine):
    """A receipt that names no message (by our reference, or by the gateway's id when it has no reference)
    ORPHAN_AFTER after it arrived is parked: applied, without a message, so no later pass joins it again.
    Younger ones wait (their message's gateway id may not be recorded yet); old ones that do name a message
    are applied as usual. The parking finds them through ``ix_receipts_unapplied`` (migration 0019), on both
    stores, among many applied receipts."""
    from store.db import is_postgres
    from tasks.reconcile import ORPHAN_AFTER
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    now = utcnow()
    old = now - ORPHAN_AFTER - timedelta(minutes=5)
    with engine.begin() as c:
        pg = is_postgres(c)
        _messages(c, "o", numbers_sql(pg, 3), now, state="'submitted'", gateway_id="'gw' || n")
        _applied_history(c, numbers_sql(pg, 20000), old)
        for gid, ref, at in [("x1", "someone-else-1", old), (None, None, old), ("gw-unknown", None, old),
                             ("x2", "m1", old), ("gw2", None, old), ("x3", "someone-else-2", now),
                             ("gw-not-yet", None, now)]:
            c.execute(text("INSERT INTO delivery_receipts (gateway, gateway_message_id, reference, status, received_at) "
                           "VALUES ('sandbox', :g, :r, 'delivered', :t)"), {"g": gid, "r": ref, "t": at})
    analyze(engine, "delivery_receipts")
    with statements_run(engine) as seen:
        s = apply_receipts(engine)
    assert (s.orphaned, s.applied, s.pending) == (3, 2, 2), s
    (stmt, params), = [(st, p) for st, p in seen
                      if st.startswith("UPDATE delivery_receipts SET applied_at = ") and "received_at" in st]
    plan = plan_of(engine, stmt, params)
    # the index is searched by age (PostgreSQL: "Index Cond: (received_at < ...)", SQLite: "(received_at<?)")
    assert "ix_receipts_unapplied" in plan and re.search(r"Index Cond: \(received_at <|\(received_at<\?\)", plan), plan
    with engine.connect() as c:
        rows = {(g, r): (a is not None, o) for g, r, a, o in c.execute(text(
            "SELECT gateway_message_id, reference, applied_at, outbox_id FROM delivery_receipts "
            "WHERE gateway_message_id NOT LIKE 'old%' OR gateway_message_id IS NULL"))}
        ids = {k: i for k, i in c.execute(text("SELECT idempotency_key, id FROM outbox"))}
    assert rows == {("x1", "someone-else-1"): (True, None), (None, None): (True, None), ("gw-unknown", None): (True, None),
                    ("x2", "m1"): (True, ids["m1"]), ("gw2", None): (True, ids["m2"]),
                    ("x3", "someone-else-2"): (False, None), ("gw-not-yet", None): (False, None)}, rows
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state = 'delivered'") == 2
    again = apply_receipts(engine)
    assert (again.orphaned, again.applied, again.pending) == (0, 0, 2), again


def test_the_stores_apply_decides_every_state_and_receipt_as_decide_does(engine):
    """The apply decides in SQL: for every outbox state (with and without our TTL code) and every receipt
    status (and one no table knows), the message ends as ``decide`` says, with its error code, final time
    and gateway id as the apply's rules say, on both stores. Each message gets one receipt by reference
    (with a gateway id of its own) and one other receipt of lower rank that must not win."""
    from itertools import product

    from blocks.gateway import Receipt
    from tasks.reconcile import RECEIPT_RANK, STATE_RANK, TTL_CODE, decide

    now = utcnow()
    event = now - timedelta(minutes=3)
    cases = [(st, code, status) for (st, code), status in product(
        [(s, None) for s in STATE_RANK] + [("expired", TTL_CODE), ("undelivered", "E1")],
        [*RECEIPT_RANK, "strange"])]
    with engine.begin() as c:
        _messages(c, "every", " UNION ALL ".join(f"SELECT {i} AS n" for i in range(len(cases))), now,
                  state="'planned'", gateway_id="NULL")
        for i, (st, code, _) in enumerate(cases):
            c.execute(text("UPDATE outbox SET state = :s, error_code = :e, gateway_message_id = :g "
                           "WHERE idempotency_key = :k"),
                      {"s": st, "e": code, "g": f"ours{i}" if i % 2 else None, "k": f"m{i}"})
    receipts = []
    for i, (_, _, status) in enumerate(cases):
        receipts.append(Receipt(f"theirs{i}", f"m{i}", status, f"R{i}", event, {}))
        if RECEIPT_RANK.get(status, 2) == 3:  # a later intermediate receipt: lower rank, never the best
            receipts.append(Receipt(f"theirs{i}", f"m{i}", "enroute", "000", event + timedelta(seconds=1), {}))
    store_receipts(engine, "sandbox", receipts[::-1])
    s = apply_receipts(engine)
    with engine.connect() as c:
        got = {k: (st, e, f, g) for k, st, e, f, g in c.execute(text(
            "SELECT idempotency_key, state, error_code, final_at, gateway_message_id FROM outbox"))}
    expected = {}
    for i, (st, code, status) in enumerate(cases):
        new = decide(st, code, status)
        gid = f"ours{i}" if i % 2 else None
        if new is None:
            expected[f"m{i}"] = (st, code, None, gid)
            continue
        final = RECEIPT_RANK.get(status, 2) == 3
        expected[f"m{i}"] = (new, None if status == "delivered" else (f"R{i}" if final else code),
                             event if final else None, gid or f"theirs{i}")

    def when(f):  # SQLite hands back text
        return None if f is None else (datetime.fromisoformat(f) if isinstance(f, str) else f).replace(tzinfo=None)

    got = {k: (st, e, when(f), g) for k, (st, e, f, g) in got.items()}
    assert got == expected
    assert s.applied == sum(decide(st, code, status) is not None for st, code, status in cases)
    assert s.by_status == dict(Counter(new for new in (decide(*case) for case in cases) if new is not None))
    assert s.ignored == len(receipts) - s.applied and s.pending == 0
