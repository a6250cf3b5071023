"""CRM write-back: final delivery states, SMS opt-outs and replies go back to the CRM as notes /
timeline entries and an opt-out field, batched, retried, never twice (a row per key here, and a
``[smsflow:key]`` marker in the CRM that the block checks before it writes)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from blocks.crm_writeback import CrmWriteBack, WriteBackItem
from store.db import utcnow

STATE_TEXT = {"delivered": "доставлено / delivered", "undelivered": "не доставлено / undelivered",
              "expired": "истёк срок / expired", "rejected": "отклонено / rejected", "failed": "ошибка / failed"}


@dataclass
class WriteBackStats:
    queued: int = 0
    written: int = 0
    failed: int = 0
    pending: int = 0


def queue_items(engine, source: str) -> int:
    """Record what should go back to the CRM (idempotent: one row per key)."""
    now = utcnow()
    with engine.begin() as conn:
        n = 0
        n += conn.execute(text(
            "INSERT INTO crm_writebacks (key, source, crm_id, kind, text, status, attempts, created_at) "
            "SELECT 'msg:' || o.id || ':' || o.state, c.source, c.crm_id, 'delivery', "
            "'SMS ' || k.name || ': ' || o.state || COALESCE(' (' || o.error_code || ')', ''), 'pending', 0, :now "
            "FROM outbox o JOIN contacts c ON c.id = o.contact_id JOIN campaigns k ON k.id = o.campaign_id "
            "WHERE c.source = :s AND o.state IN ('delivered', 'undelivered', 'expired', 'rejected', 'failed') "
            "AND (o.error_code IS NULL OR o.error_code NOT LIKE 'POLICY_%') "
            "ON CONFLICT (key) DO NOTHING"), {"s": source, "now": now}).rowcount or 0
        n += conn.execute(text(
            "INSERT INTO crm_writebacks (key, source, crm_id, kind, text, status, attempts, created_at) "
            "SELECT 'optout:' || ch.id, c.source, c.crm_id, 'opt_out', 'SMS opt-out: ' || ch.method, 'pending', 0, :now "
            "FROM consent_changes ch JOIN contacts c ON c.id = ch.contact_id "
            "WHERE c.source = :s AND ch.change = 'opted_out' ON CONFLICT (key) DO NOTHING"), {"s": source, "now": now}).rowcount or 0
        n += conn.execute(text(
            "INSERT INTO crm_writebacks (key, source, crm_id, kind, text, status, attempts, created_at) "
            "SELECT 'reply:' || m.id, c.source, c.crm_id, 'reply', 'SMS reply: ' || COALESCE(m.text, ''), 'pending', 0, :now "
            "FROM inbound_messages m JOIN contacts c ON c.id = m.contact_id "
            "WHERE c.source = :s AND m.kind = 'reply' ON CONFLICT (key) DO NOTHING"), {"s": source, "now": now}).rowcount or 0
        n += _queue_clicks(conn, source, now)
    return n


def _queue_clicks(conn, source: str, now) -> int:
    """A message's link clicked by a person (its first such click; tasks/clicks.py says who is a person)."""
    from sqlalchemy import DateTime

    from tasks.clicks import is_human

    rows = conn.execute(text(
        "SELECT l.code, c.source, c.crm_id, k.name, x.at, x.bot_reason, o.final_at, o.state FROM clicks x "
        "JOIN short_links l ON l.code = x.code JOIN outbox o ON o.idempotency_key = l.outbox_key "
        "JOIN contacts c ON c.id = o.contact_id JOIN campaigns k ON k.id = o.campaign_id "
        "WHERE c.source = :s AND x.bot_reason IS NULL AND NOT EXISTS (SELECT 1 FROM crm_writebacks w "
        "WHERE w.key = 'click:' || l.code) ORDER BY x.at").columns(at=DateTime, final_at=DateTime),
        {"s": source}).all()
    items, seen = [], set()
    for code, src, crm_id, campaign, at, bot, fin, state in rows:
        if code in seen or not is_human(bot, at, fin, state):
            continue
        seen.add(code)
        items.append({"key": f"click:{code}", "source": src, "crm_id": crm_id,
                      "text": f"SMS {campaign}: link clicked at {at:%Y-%m-%d %H:%M} UTC", "now": now})
    if items:
        conn.execute(text(
            "INSERT INTO crm_writebacks (key, source, crm_id, kind, text, status, attempts, created_at) "
            "VALUES (:key, :source, :crm_id, 'click', :text, 'pending', 0, :now) ON CONFLICT (key) DO NOTHING"), items)
    return len(items)


def write_back(engine, block: CrmWriteBack, source: str, batch: int = 500, max_attempts: int = 5) -> WriteBackStats:
    stats = WriteBackStats(queued=queue_items(engine, source))
    while True:
        with engine.begin() as conn:
            rows = conn.execute(text(
                "SELECT key, crm_id, kind, text FROM crm_writebacks WHERE source = :s AND status = 'pending' "
                "AND attempts < :m ORDER BY created_at, key LIMIT :n"), {"s": source, "m": max_attempts, "n": batch}).fetchall()
        if not rows:
            break
        results = block.write_back([WriteBackItem(key=r[0], crm_id=r[1], kind=r[2], text=r[3] or "") for r in rows])
        now = utcnow()
        with engine.begin() as conn:
            for res in results:
                if res.ok:
                    conn.execute(text("UPDATE crm_writebacks SET status = 'done', crm_ref = :r, done_at = :now, "
                                      "attempts = attempts + 1 WHERE key = :k"), {"r": res.crm_ref, "now": now, "k": res.key})
                    stats.written += 1
                else:
                    conn.execute(text("UPDATE crm_writebacks SET attempts = attempts + 1, error = :e, "
                                      "status = CASE WHEN :t THEN 'pending' ELSE 'failed' END WHERE key = :k"),
                                 {"e": (res.error or "")[:500], "t": bool(res.transient), "k": res.key})
                    stats.failed += 0 if res.transient else 1
        if all(not r.ok and r.transient for r in results):
            break  # the vendor keeps refusing for now: the next scheduled run continues
    with engine.begin() as conn:
        stats.pending = int(conn.execute(text("SELECT COUNT(*) FROM crm_writebacks WHERE source = :s AND status = 'pending'"),
                                         {"s": source}).scalar())
    return stats
