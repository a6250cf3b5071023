"""Erasure ("forget me"): remove or anonymise a person in every table, keep only a salted
hash of the number on the suppression list so that a later import can never message them."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import text

from smsflow.privacy import phone_hash
from store.db import utcnow
from smsflow.phones import normalize_phones

log = logging.getLogger("smsflow.erasure")


@dataclass
class ErasureResult:
    contacts: int = 0
    messages: int = 0
    cancelled: int = 0
    inbound: int = 0
    receipts: int = 0
    quarantine: int = 0
    suppressed_numbers: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def _in(ids) -> str:
    return ",".join(str(int(i)) for i in ids) or "NULL"


def forget(engine, who: str, default_region: str = "RU") -> ErasureResult:
    """``who`` is a phone number (any format) or a CRM id. Everything happens in one transaction."""

    who = who.strip()
    if not who:
        raise ValueError("nothing to forget: give a phone number or a CRM id")
    norm = normalize_phones(pd.Series([who]), default_region=default_region).iloc[0]
    e164 = norm["phone_e164"] if norm["phone_e164"] else None
    res = ErasureResult()
    now = utcnow()
    with engine.begin() as conn:
        rows = conn.execute(
            text("SELECT id, phone_e164, crm_id FROM contacts WHERE crm_id = :w OR phone_raw = :w "
                 "OR (phone_e164 IS NOT NULL AND phone_e164 = :p)"),
            {"w": who, "p": e164 or "-"},
        ).fetchall()
        ids = [int(r[0]) for r in rows]
        phones = {p for p in [e164, *(r[1] for r in rows)] if p}
        crm_ids = {r[2] for r in rows}
        res.contacts = len(ids)
        phone_params = {f"p{i}": p for i, p in enumerate(sorted(phones))}
        phone_list = ",".join(f":p{i}" for i in range(len(phone_params))) or "NULL"
        msg_ids = [int(r[0]) for r in conn.execute(
            text(f"SELECT id FROM outbox WHERE contact_id IN ({_in(ids)}) OR phone_e164 IN ({phone_list})"), phone_params)]
        res.messages = len(msg_ids)
        # nothing still waiting may go out to an erased person
        res.cancelled = conn.execute(text(
            f"UPDATE outbox SET state = 'rejected', error_code = 'POLICY_ERASED', hold_rule = 'erased', final_at = :now, "
            f"updated_at = :now WHERE id IN ({_in(msg_ids)}) AND state IN ('planned', 'queued')"), {"now": now}).rowcount or 0
        conn.execute(text(f"UPDATE outbox SET text = NULL, phone_e164 = NULL, contact_id = NULL, last_error = NULL, "
                          f"updated_at = :now WHERE id IN ({_in(msg_ids)})"), {"now": now})
        res.receipts = conn.execute(text(f"UPDATE delivery_receipts SET raw = NULL WHERE outbox_id IN ({_in(msg_ids)})")).rowcount or 0
        res.inbound = conn.execute(text(
            f"DELETE FROM inbound_messages WHERE contact_id IN ({_in(ids)}) OR from_e164 IN ({phone_list})"), phone_params).rowcount or 0
        crm_params = {f"k{i}": k for i, k in enumerate(sorted(crm_ids))}
        crm_list = ",".join(f":k{i}" for i in range(len(crm_params))) or "NULL"
        res.quarantine = conn.execute(text(
            f"DELETE FROM quarantine WHERE contact_id IN ({_in(ids)}) OR (step IN ('extract', 'validate') AND row_key IN ({crm_list}))"),
            crm_params).rowcount or 0
        conn.execute(text(f"DELETE FROM segment_memberships WHERE contact_id IN ({_in(ids)})"))
        # running journeys stop for an erased person (their steps go with them), and the CRM events
        # about their orders/deals lose their payloads (names, phones, addresses)
        for src, ent in conn.execute(text(
                f"SELECT source, entity_id FROM journey_instances WHERE contact_id IN ({_in(ids)}) "
                f"OR phone_e164 IN ({phone_list})"), phone_params).all():
            if src and ent and ent.startswith(f"{src}:"):
                conn.execute(text("UPDATE crm_events SET payload = NULL WHERE source = :s AND entity_id = :e"),
                             {"s": src, "e": ent[len(src) + 1:]})
        conn.execute(text(f"DELETE FROM journey_instances WHERE contact_id IN ({_in(ids)}) OR phone_e164 IN ({phone_list})"),
                     phone_params)
        conn.execute(text(f"UPDATE contacts SET duplicate_of = NULL WHERE duplicate_of IN ({_in(ids)})"))
        conn.execute(text(f"UPDATE event_log SET contact_id = NULL WHERE contact_id IN ({_in(ids)})"))
        conn.execute(text(f"UPDATE consent_changes SET contact_id = NULL WHERE contact_id IN ({_in(ids)})"))
        conn.execute(text(f"DELETE FROM contacts WHERE id IN ({_in(ids)})"))
        for p in phones:
            conn.execute(text("INSERT INTO suppression_list (phone_hash, reason, created_at) VALUES (:h, 'erased', :now) "
                              "ON CONFLICT (phone_hash) DO NOTHING"), {"h": phone_hash(p), "now": now})
        res.suppressed_numbers = len(phones)
        conn.execute(text("INSERT INTO consent_changes (changed_at, change, method, details) VALUES (:now, 'erased', 'erasure', :d)"),
                     {"now": now, "d": json.dumps({"contacts": res.contacts, "messages": res.messages})})
        conn.execute(text("INSERT INTO event_log (ts, kind, payload) VALUES (:now, 'privacy.erased', :p)"),
                     {"now": now, "p": json.dumps(res.as_dict())})
    log.info("erasure: %d contact(s), %d message(s) anonymised, %d number(s) suppressed", res.contacts, res.messages,
             res.suppressed_numbers)
    return res


def suppressed_hashes(conn) -> set[str]:
    return {r[0] for r in conn.execute(text("SELECT phone_hash FROM suppression_list"))}
