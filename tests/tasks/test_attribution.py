"""tasks/orders.py and tasks/attribution.py: CRM orders in, each credited to at most one message."""
from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from blocks.crm import CrmSourceError, SqlCrm
from store.db import bulk_insert
from tasks.attribution import attributed_orders, attributed_replies, campaign_earnings, crm_revenue
from tasks.orders import extract_orders
from tests.helpers import load_csv
from tests.pipeline import _base, q

T0 = datetime(2026, 3, 2, 10, 0)


def _crm_db(path, orders):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, contact_id TEXT, status TEXT, amount REAL, "
               "created_at TEXT, changed_at TEXT)")
    db.executemany("INSERT OR REPLACE INTO orders VALUES (?, ?, ?, ?, ?, ?)", orders)
    db.commit()
    db.close()


def _crm(path):
    return SqlCrm(url=f"sqlite:///{path}", source_name="test",
                  orders_query="SELECT id AS order_id, contact_id, amount, status, created_at AS ordered_at, "
                               "changed_at AS updated_at FROM orders")


def _phones(engine):
    with engine.begin() as c:
        return dict(c.execute(text("SELECT crm_id, phone_e164 FROM contacts")).all())


def _campaign(engine, name):
    with engine.begin() as c:
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES (:n, 'test', 'all', 't', 'marketing', 2.0, 'done')"), {"n": name})
        return c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar()


def _message(engine, cid, crm_id, delivered_at, state="delivered", code=None, click_at=None, bot=None):
    phones = _phones(engine)
    key = f"c{cid}:{crm_id}"
    with engine.begin() as c:
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "segment", "phone_e164", "text",
                                  "encoding", "segments", "cost", "state", "attempts", "planned_at", "updated_at",
                                  "submitted_at", "final_at"),
                    [(key, cid, None, "main", "all", phones[crm_id], "x", "GSM-7", 1, 2.0, state, 1, delivered_at,
                      delivered_at, delivered_at - timedelta(seconds=5), delivered_at)])
        if code:
            bulk_insert(c, "short_links", ("code", "campaign_id", "contact_id", "outbox_key", "target", "created_at",
                                           "expires_at"),
                        [(code, cid, None, key, "https://shop.example/", delivered_at, delivered_at + timedelta(days=90))])
            bulk_insert(c, "clicks", ("code", "at", "method", "user_agent", "ip_hash", "bot_reason"),
                        [(code, click_at, "GET", "phone", "h", bot)])


@pytest.fixture
def crm_store(engine, tmp_path):
    load_csv(engine, _base(tmp_path, 6))
    return engine


def test_orders_come_in_incrementally_and_a_refund_turns_revenue_off(crm_store, tmp_path):
    engine, db = crm_store, tmp_path / "crm.sqlite"
    _crm_db(db, [("O1", "C00000", "paid", 1000.0, "2026-03-03T10:00:00", "2026-03-03T10:00:00"),
                 ("O2", "C00001", "new", 500.0, "2026-03-03T11:00:00", "2026-03-03T11:00:00"),
                 ("O3", "C00099", "paid", 300.0, "2026-03-03T12:00:00", "2026-03-03T12:00:00"),  # contact unknown
                 ("O4", "C00002", "paid", "lots", "2026-03-03T12:00:00", "2026-03-03T12:00:00")])
    r = extract_orders(engine, _crm(db))
    assert (r.rows, r.stored, r.quarantined) == (4, 3, 1)
    assert q(engine, "SELECT reason FROM quarantine WHERE step = 'orders'") == "order without a valid amount"
    assert q(engine, "SELECT SUM(amount) FROM orders WHERE revenue") == 1300.0
    assert q(engine, "SELECT contact_id IS NULL FROM orders WHERE crm_order_id = 'O3'") in (1, True)
    _crm_db(db, [("O1", "C00000", "returned", 1000.0, "2026-03-03T10:00:00", "2026-03-05T09:00:00")])
    r = extract_orders(engine, _crm(db))
    assert r.rows == 3  # what changed since the watermark, and the rows AT it (>=: none with the same time is missed)
    assert q(engine, "SELECT SUM(amount) FROM orders WHERE revenue") == 300.0
    assert q(engine, "SELECT COUNT(*) FROM orders") == 3


def test_orders_without_the_needed_columns_fail_with_one_clear_error(crm_store, tmp_path):
    _crm_db(tmp_path / "other.sqlite", [("O1", "C00000", "paid", 1.0, "2026-03-03", "2026-03-03")])
    crm = SqlCrm(url=f"sqlite:///{tmp_path / 'other.sqlite'}", source_name="test",
                 orders_query="SELECT id AS order_id, changed_at AS updated_at FROM orders")
    with pytest.raises(CrmSourceError, match="contact_id, amount, status, ordered_at"):
        extract_orders(crm_store, crm)


def test_an_order_goes_to_the_last_touch_within_its_window_and_to_one_campaign_only(crm_store, tmp_path):
    engine = crm_store
    a, b = _campaign(engine, "spring"), _campaign(engine, "summer")
    _message(engine, a, "C00000", T0)                             # delivered, then an order 2 days later
    _message(engine, a, "C00001", T0)                             # delivered, order 10 days later: too late
    _message(engine, a, "C00002", T0)                             # both campaigns touched: the later one wins
    _message(engine, b, "C00002", T0 + timedelta(days=1))
    _message(engine, a, "C00003", T0 - timedelta(days=9), code="Ab3De7g",   # delivery too old, a click 1 day before
             click_at=T0 + timedelta(days=1))
    _message(engine, b, "C00004", T0, code="Bc4Ef8h", click_at=T0 + timedelta(days=1), bot="crawler")
    db = tmp_path / "crm.sqlite"
    _crm_db(db, [("O1", "C00000", "paid", 1000.0, "2026-03-04T10:00:00", "2026-03-04T10:00:00"),
                 ("O2", "C00001", "paid", 700.0, "2026-03-12T10:00:00", "2026-03-12T10:00:00"),
                 ("O3", "C00002", "delivered", 400.0, "2026-03-04T10:00:00", "2026-03-04T10:00:00"),
                 ("O4", "C00003", "paid", 250.0, "2026-03-04T10:00:00", "2026-03-04T10:00:00"),
                 ("O5", "C00004", "paid", 90.0, "2026-03-20T10:00:00", "2026-03-20T10:00:00"),   # bot click only
                 ("O6", "C00000", "paid", 50.0, "2026-03-01T10:00:00", "2026-03-01T10:00:00")])  # before any touch
    extract_orders(engine, _crm(db))
    credited = attributed_orders(engine).set_index("order_id")
    by_crm = {q(engine, "SELECT crm_order_id FROM orders WHERE id = :i", i=int(i)): r for i, r in credited.iterrows()}
    assert by_crm["O1"]["campaign_id"] == a and by_crm["O1"]["via"] == "delivery"
    assert pd_na(by_crm["O2"]["campaign_id"]) and pd_na(by_crm["O5"]["campaign_id"]) and pd_na(by_crm["O6"]["campaign_id"])
    assert by_crm["O3"]["campaign_id"] == b
    assert by_crm["O4"]["campaign_id"] == a and by_crm["O4"]["via"] == "click"
    earned = campaign_earnings(engine)
    assert earned[a]["conversions"] == 2 and earned[a]["revenue"] == 1250.0
    assert earned[b]["conversions"] == 1 and earned[b]["revenue"] == 400.0
    assert sum(e["revenue"] for e in earned.values()) <= crm_revenue(engine) == 2490.0


def pd_na(v) -> bool:
    import pandas as pd

    return bool(pd.isna(v))


def test_randomly_touched_orders_never_sum_above_crm_revenue(crm_store, tmp_path):
    engine, rnd = crm_store, random.Random(7)
    cids = [_campaign(engine, f"c{i}") for i in range(3)]
    for n in range(6):
        for cid in rnd.sample(cids, rnd.randint(1, 3)):
            _message(engine, cid, f"C{n:05d}", T0 + timedelta(hours=rnd.randint(0, 300)))
    orders = [(f"O{i}", f"C{rnd.randrange(6):05d}", rnd.choice(["paid", "new", "returned"]), rnd.randint(1, 999),
               (T0 + timedelta(hours=rnd.randint(-50, 500))).isoformat(), T0.isoformat()) for i in range(60)]
    _crm_db(tmp_path / "crm.sqlite", orders)
    extract_orders(engine, _crm(tmp_path / "crm.sqlite"))
    credited = attributed_orders(engine)
    assert credited["order_id"].is_unique
    earned = campaign_earnings(engine)
    total = sum(e["revenue"] for e in earned.values())
    assert 0 < total <= crm_revenue(engine)
    assert sum(e["conversions"] for e in earned.values()) == int(credited["campaign_id"].notna().sum())


def test_replies_go_to_the_last_message_sent_before_them(crm_store):
    engine = crm_store
    a = _campaign(engine, "spring")
    _message(engine, a, "C00000", T0)
    phone = _phones(engine)["C00000"]
    with engine.begin() as c:
        bulk_insert(c, "inbound_messages", ("gateway", "gateway_message_id", "from_e164", "text", "kind", "received_at"),
                    [("k", "m1", phone, "а где купить?", "reply", T0 + timedelta(minutes=30)),
                     ("k", "m2", phone, "СТОП", "stop", T0 + timedelta(minutes=40))])
    r = attributed_replies(engine)
    assert len(r) == 1 and r["campaign_id"].iloc[0] == a
    assert r["seconds"].iloc[0] == pytest.approx(30 * 60 + 5)
    assert campaign_earnings(engine, a)[a]["median_reply_s"] == pytest.approx(1805)


def test_a_campaign_may_set_its_own_windows(crm_store, tmp_path):
    """Campaign "flash" counts orders within 1 day of delivery; "spring" keeps the 7-day default."""
    from tasks.accounting import set_attribution

    engine = crm_store
    flash, spring = _campaign(engine, "flash"), _campaign(engine, "spring")
    set_attribution(engine, flash, 1.0, 1.0)
    _message(engine, flash, "C00000", T0)
    _message(engine, spring, "C00001", T0)
    _message(engine, flash, "C00002", T0)
    db = tmp_path / "crm.sqlite"
    _crm_db(db, [("O1", "C00000", "paid", 100.0, "2026-03-04T10:00:00", "2026-03-04T10:00:00"),   # 2 days: too late
                 ("O2", "C00001", "paid", 200.0, "2026-03-04T10:00:00", "2026-03-04T10:00:00"),   # 2 days: within 7
                 ("O3", "C00002", "paid", 300.0, "2026-03-02T20:00:00", "2026-03-02T20:00:00")])  # 10 hours
    extract_orders(engine, _crm(db))
    earned = campaign_earnings(engine)
    assert earned[flash]["conversions"] == 1 and earned[flash]["revenue"] == 300.0
    assert earned[spring]["conversions"] == 1 and earned[spring]["revenue"] == 200.0
