"""Inbound replies: STOP / START / HELP keywords (Russian and English) and plain replies.

A STOP opts the contact out at once (before the next send: the sender re-checks opt-out
when it claims a message); START opts back in; HELP gets the configured auto-reply;
anything else is stored on the contact for the CRM.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import text

from store.db import utcnow
from smsflow.sms_encoding import sms_info
from smsflow.phones import normalize_phones

STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "END", "QUIT", "CANCEL", "OPTOUT", "OPT-OUT", "OPT OUT", "REVOKE",
     "СТОП", "ОТПИСАТЬСЯ", "ОТПИСКА", "ОТПИШИТЕ", "ОТМЕНА"}
)
START_WORDS = frozenset({"START", "UNSTOP", "СТАРТ", "ПОДПИСАТЬСЯ"})
HELP_WORDS = frozenset({"HELP", "INFO", "ПОМОЩЬ", "ИНФО"})

_EDGE = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_keyword(body: str | None) -> str:
    """' Стоп! ' -> 'СТОП'; case, surrounding spaces and punctuation do not matter; ё = е."""
    if not body:
        return ""
    s = unicodedata.normalize("NFKC", body).strip()
    s = _EDGE.sub("", s)
    s = _SPACES.sub(" ", s).upper().replace("Ё", "Е")
    return s


def classify(body: str | None) -> str:
    """'stop' | 'start' | 'help' | 'reply' (the whole message must be the keyword)."""
    k = normalize_keyword(body)
    if k in STOP_WORDS:
        return "stop"
    if k in START_WORDS:
        return "start"
    if k in HELP_WORDS:
        return "help"
    return "reply"


@dataclass
class InboundResult:
    stored: bool  # False for a duplicate delivery of the same inbound message
    kind: str
    contacts: int = 0
    auto_reply: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


HELP_REPLY = {
    "ru": "SmsFlow: рассылка магазина. Для отказа ответьте СТОП. Поддержка: 8-800-000-00-00",
    "en": "SmsFlow: shop news. Reply STOP to opt out. Support: +7 800 000-00-00",
}


def store_and_apply(conn, *, gateway: str, gateway_message_id: str | None, from_e164: str | None, to: str | None,
                    body: str | None, raw: dict[str, Any]) -> InboundResult:
    """Store one inbound message (idempotent by the gateway's id) and apply its keyword,
    in the caller's transaction: the caller answers 2xx only after the commit."""
    kind = classify(body)
    now = utcnow()
    row = conn.execute(
        text("INSERT INTO inbound_messages (gateway, gateway_message_id, from_e164, to_address, text, kind, raw, received_at) "
             "VALUES (:gw, :gid, :frm, :to, :body, :kind, :raw, :now) "
             "ON CONFLICT (gateway_message_id) DO NOTHING RETURNING id"),
        {"gw": gateway, "gid": gateway_message_id, "frm": from_e164, "to": to, "body": body, "kind": kind,
         "raw": json.dumps(raw, ensure_ascii=False, default=str), "now": now},
    ).first()
    if row is None:  # the same inbound message delivered again: already applied
        return InboundResult(stored=False, kind=kind)
    inbound_id = int(row[0])
    contacts = [int(r[0]) for r in conn.execute(text("SELECT id FROM contacts WHERE phone_e164 = :p"), {"p": from_e164})] \
        if from_e164 else []
    result = InboundResult(stored=True, kind=kind, contacts=len(contacts))
    if contacts:
        ids = ",".join(map(str, contacts))
        if kind == "stop":
            conn.execute(text(f"UPDATE contacts SET opted_out_at = :now, updated_at = :now WHERE id IN ({ids}) "
                              "AND opted_out_at IS NULL"), {"now": now})
        elif kind == "start":
            conn.execute(text("UPDATE contacts SET opted_out_at = NULL, sms_consent = :t, consent_at = :now, "
                              f"consent_method = 'sms_keyword', consent_source = :g, updated_at = :now WHERE id IN ({ids})"),
                         {"now": now, "t": True, "g": gateway})
        if kind in ("stop", "start"):
            details = json.dumps({"gateway": gateway, "inbound_id": inbound_id, "keyword": normalize_keyword(body)})
            for cid in contacts:
                conn.execute(text("INSERT INTO consent_changes (contact_id, changed_at, change, method, source, details) "
                                  "VALUES (:c, :now, :k, 'sms_keyword', :g, :d)"),
                             {"now": now, "k": "opted_out" if kind == "stop" else "opted_in", "c": cid, "g": gateway,
                              "d": details})
        conn.execute(text("UPDATE inbound_messages SET contact_id = :c, processed_at = :now WHERE id = :i"),
                     {"c": contacts[0], "now": now, "i": inbound_id})
    if kind == "help" and from_e164:
        lang = conn.execute(text("SELECT language FROM contacts WHERE id = :i"), {"i": contacts[0]}).scalar() if contacts else None
        result.auto_reply = HELP_REPLY.get(lang or "ru", HELP_REPLY["ru"])
        queue_auto_reply(conn, inbound_id, contacts[0] if contacts else None, from_e164, lang, result.auto_reply, gateway)
    result.details["inbound_id"] = inbound_id
    return result


AUTO_REPLY_CAMPAIGN = "auto-replies"


def queue_auto_reply(conn, inbound_id: int, contact_id: int | None, phone: str, language: str | None, body: str,
                     gateway: str) -> None:
    """Plan the auto-reply in the outbox (transactional campaign 'auto-replies'); the send flow
    delivers it like any message, at most once per inbound message."""

    now = utcnow()
    cid = conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": AUTO_REPLY_CAMPAIGN}).scalar()
    if cid is None:
        conn.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, gateway, price_per_segment, "
                          "status, created_at, started_at) VALUES (:n, 'inbound', '-', 'help', 'transactional', :g, 0, "
                          "'running', :now, :now)"), {"n": AUTO_REPLY_CAMPAIGN, "g": gateway, "now": now})
        cid = conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": AUTO_REPLY_CAMPAIGN}).scalar()
    info = sms_info(body)
    conn.execute(
        text("INSERT INTO outbox (idempotency_key, campaign_id, contact_id, step, phone_e164, language, text, encoding, "
             "segments, cost, state, attempts, gateway, planned_at, updated_at) VALUES (:k, :c, :ct, 'help', :p, :l, :t, "
             ":e, :s, 0, 'planned', 0, :g, :now, :now) ON CONFLICT (idempotency_key) DO NOTHING"),
        {"k": f"inbound:{inbound_id}:help", "c": cid, "ct": contact_id, "p": phone, "l": language or "ru", "t": body,
         "e": info.encoding, "s": info.segments, "g": gateway, "now": now},
    )


def store_pulled_replies(engine, gw) -> int:
    """Replies pulled from a gateway (SMPP deliver_sm MO) go through the same keyword handling as the
    service's; the number stored."""
    msgs = gw.fetch_inbound()
    if not msgs:
        return 0
    phones = normalize_phones(pd.Series([m.get("from") for m in msgs]))["phone_e164"]
    with engine.begin() as conn:
        for m, e164 in zip(msgs, phones):
            store_and_apply(conn, gateway=gw.gateway_name, gateway_message_id=m.get("gateway_message_id"),
                            from_e164=e164 or m.get("from"), to=m.get("to"), body=m.get("text"), raw={"to": m.get("to")})
    return len(msgs)

