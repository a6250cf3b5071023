"""The demo's "what happened next": clicks, link previews, replies and orders after a campaign was sent.

Only `smsflow demo` uses this (a simulation, seeded): for the campaign's delivered messages with a short
link, some phones draw a link preview the moment the message arrives (a messenger's crawler or a HEAD
request, within a second), some people click (minutes to a day later, some twice), some of the clickers
and a few of the others buy within days (orders written to the demo CRM's ``orders`` table, a few of
them returned later), and some reply. Clicks are classified by the same code as the service
(smsflow.links.bot_reason) and stored as the service stores them; orders come in through the CRM
extract (tasks/orders.py) and replies through the inbound path (tasks/inbound.py), so the report counts
them exactly as it counts real ones.
"""
from __future__ import annotations

import random
import sqlite3
from datetime import timedelta
from pathlib import Path

from sqlalchemy import DateTime, text

from smsflow.links import bot_reason, ip_hash
from store.links import store_clicks
from tasks.inbound import store_and_apply

PHONE_UAS = [
    "Mozilla/5.0 (Linux; Android 14; SM-A546B) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 "
    "Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 13; Redmi Note 12) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0.0.0 Mobile "
    "Safari/537.36 YaBrowser/24.4",
]
PREVIEW_UAS = ["TelegramBot (like TwitterBot)", "WhatsApp/2.24.10.78 A", "facebookexternalhit/1.1", None]
REPLIES = ["Спасибо!", "А до какого числа скидка?", "Thanks, see you", "Где ближайший магазин?"]


def simulate(engine, campaign_id: int, crm_path: str | Path, seed: int = 42, click_share: float = 0.14,
             preview_share: float = 0.25, buy_after_click: float = 0.1, buy_without_click: float = 0.004,
             reply_share: float = 0.015, click_share_by_variant: dict[str, float] | None = None,
             step: str | None = None) -> dict[str, int]:
    """``click_share_by_variant``: an A/B demo's arms draw people differently; ``step``: only these messages
    (an A/B campaign's test, then its roll-out)."""
    rnd = random.Random(seed)
    key = b"demo"
    by_variant = click_share_by_variant or {}
    only = "AND o.step = :s " if step else ""
    p = {"c": campaign_id, **({"s": step} if step else {})}
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT l.code, o.final_at, o.phone_e164, ct.crm_id, o.variant FROM outbox o JOIN short_links l "
            "ON l.outbox_key = o.idempotency_key JOIN contacts ct ON ct.id = o.contact_id "
            f"WHERE o.campaign_id = :c AND o.state = 'delivered' {only}ORDER BY o.id").columns(final_at=DateTime),
            p).all()
        delivered = conn.execute(text(
            "SELECT o.final_at, o.phone_e164, ct.crm_id FROM outbox o JOIN contacts ct ON ct.id = o.contact_id "
            f"WHERE o.campaign_id = :c AND o.state = 'delivered' {only}ORDER BY o.id").columns(final_at=DateTime),
            p).all()
    clicks, buyers, n_clickers = [], {}, 0
    for code, at, phone, crm_id, variant in rows:
        ip = ip_hash(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}", key)
        if rnd.random() < preview_share:
            ua = rnd.choice(PREVIEW_UAS)
            method = "HEAD" if ua is None else "GET"
            clicks.append((code, at + timedelta(seconds=rnd.uniform(0.1, 1.2)), method, ua, ip,
                           bot_reason(method, ua)))
        if rnd.random() < by_variant.get(variant, click_share):
            n_clickers += 1
            ua = rnd.choice(PHONE_UAS)
            first = at + timedelta(minutes=rnd.uniform(2, 24 * 60))
            for t in [first] + ([first + timedelta(minutes=rnd.uniform(1, 600))] if rnd.random() < 0.3 else []):
                clicks.append((code, t, "GET", ua, ip, bot_reason("GET", ua)))
            if rnd.random() < buy_after_click:
                buyers[crm_id] = first + timedelta(hours=rnd.uniform(0.2, 96))
    for at, phone, crm_id in delivered:
        if crm_id not in buyers and rnd.random() < buy_without_click:
            buyers[crm_id] = at + timedelta(hours=rnd.uniform(1, 6 * 24))
    if clicks:
        store_clicks(engine, clicks)
    orders = []
    for i, (crm_id, at) in enumerate(sorted(buyers.items())):
        amount = round(min(40_000.0, rnd.lognormvariate(7.6, 0.6)), 2)  # about 2,400 RUB, long tail
        status = "returned" if rnd.random() < 0.05 else "paid"
        stamp = at.strftime("%Y-%m-%d %H:%M:%S")
        orders.append((f"{crm_id}-SMS{campaign_id}-{step or 0}-{i}", crm_id, status, amount, stamp))
    db = sqlite3.connect(crm_path)
    try:
        db.executemany("INSERT OR REPLACE INTO orders (id, contact_id, status, amount, created_at) VALUES (?, ?, ?, ?, ?)",
                       orders)
        db.commit()
    finally:
        db.close()
    replies = 0
    for at, phone, _crm_id in delivered:
        if rnd.random() < reply_share:
            with engine.begin() as conn:
                store_and_apply(conn, gateway="sandbox", gateway_message_id=f"demo-{campaign_id}-{step or 0}-{replies}",
                                from_e164=phone, to="SmsFlow", body=rnd.choice(REPLIES), raw={"demo": True})
            _backdate_reply(engine, f"demo-{campaign_id}-{step or 0}-{replies}", at + timedelta(minutes=rnd.uniform(1, 180)))
            replies += 1
    return {"clicks": len(clicks), "clickers": n_clickers, "orders": len(orders), "replies": replies}


def _backdate_reply(engine, gid: str, at) -> None:
    """A simulated reply arrives after its message, not at the moment the simulation runs."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE inbound_messages SET received_at = :t WHERE gateway_message_id = :g"),
                     {"t": at, "g": gid})
