"""The quarantine: rows a step could not use, kept with the reason (never silently dropped).

Written by the extract, validate and render steps (``write_quarantine``); read for people: a
campaign's (its source's extract and validate rows and its own render rows) or the whole store's,
as summaries, listings and a CSV.

Phones are masked everywhere (``+7916***4567``); nothing else personal is shown but the CRM id.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from smsflow.privacy import mask_phone
from store.db import Columns, bulk_insert

STEPS = ("extract", "validate", "render")
CSV_FIELDS = ("step", "reason_code", "reason", "crm_id", "phone", "campaign", "source")
QUARANTINE_FIELDS = ("step", "source", "row_key", "campaign_id", "contact_id", "reason_code", "reason", "payload")


def write_quarantine(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Quarantine rows, idempotent per (step, source, row_key): a rerun does not count them twice."""
    if not rows:
        return 0
    return bulk_insert(
        conn,
        "quarantine",
        QUARANTINE_FIELDS,
        Columns([[r.get(f) for r in rows] for f in QUARANTINE_FIELDS]),  # converted column by column
        on_conflict="update",
        conflict_columns=("step", "source", "row_key"),
        update_columns=("reason_code", "reason", "payload", "contact_id"),
    )


class UnknownCampaign(LookupError):
    pass


@dataclass(frozen=True)
class HeldBack:
    step: str
    reason_code: str
    reason: str
    crm_id: str
    phone: str  # masked
    campaign: str
    source: str

    def as_row(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in CSV_FIELDS}


def _where(engine, campaign: str | None, step: str | None) -> tuple[str, dict]:
    clauses, params = [], {}
    if campaign is not None:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT id, source FROM campaigns WHERE name = :n"), {"n": campaign}).first()
        if row is None:
            raise UnknownCampaign(f"no campaign named {campaign!r}")
        clauses.append("((q.step IN ('extract', 'validate') AND q.source = :src) OR q.campaign_id = :cid)")
        params.update(src=row[1], cid=row[0])
    if step is not None:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
        clauses.append("q.step = :step")
        params["step"] = step
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _held(step, code, reason, row_key, payload, campaign, source, crm_id, phone_e164) -> HeldBack:
    data = payload if isinstance(payload, dict) else json.loads(payload or "{}")
    phone = data.get("phone_raw") or data.get("phone") or data.get("phone_e164") or phone_e164 or ""
    crm = crm_id or data.get("crm_id") or (data.get("id") if step == "extract" else None) or row_key
    return HeldBack(step, code, reason, str(crm), mask_phone(str(phone)) if phone else "", campaign or "", source)


def held_back(engine, campaign: str | None = None, step: str | None = None,
              limit: int | None = None) -> Iterator[HeldBack]:
    """Every quarantined row (of a campaign, of a step), oldest first."""
    where, params = _where(engine, campaign, step)
    sql = ("SELECT q.step, q.reason_code, q.reason, q.row_key, q.payload, k.name, q.source, ct.crm_id, ct.phone_e164 "
           "FROM quarantine q LEFT JOIN campaigns k ON k.id = q.campaign_id "
           "LEFT JOIN contacts ct ON ct.id = q.contact_id" + where + " ORDER BY q.id")
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    with engine.connect() as conn:
        for r in conn.execute(text(sql), params):
            yield _held(*r)


def summary(engine, campaign: str | None = None, step: str | None = None) -> list[dict]:
    """``[{step, reason_code, count, example}]``, most frequent first; ``example`` is one row, masked."""
    where, params = _where(engine, campaign, step)
    sql = ("SELECT q.step, q.reason_code, COUNT(*), MIN(q.id) FROM quarantine q" + where +
           " GROUP BY q.step, q.reason_code ORDER BY COUNT(*) DESC, q.step, q.reason_code")
    with engine.connect() as conn:
        groups = conn.execute(text(sql), params).all()
        out = []
        for step_, code, n, first in groups:
            ex = conn.execute(text(
                "SELECT q.step, q.reason_code, q.reason, q.row_key, q.payload, k.name, q.source, ct.crm_id, ct.phone_e164 "
                "FROM quarantine q LEFT JOIN campaigns k ON k.id = q.campaign_id "
                "LEFT JOIN contacts ct ON ct.id = q.contact_id WHERE q.id = :i"), {"i": first}).one()
            out.append({"step": step_, "reason_code": code, "count": int(n), "example": _held(*ex).as_row()})
    return out


def summary_lines(groups: list[dict]) -> list[str]:
    """The summary for a terminal: one line per reason with its count and one example."""
    lines = []
    for g in groups:
        ex = g["example"]
        who = ex["crm_id"] + (f" {ex['phone']}" if ex["phone"] else "")
        lines.append(f"  {g['count']:>7}  {g['step']:<8}  {g['reason_code']:<18}  e.g. {who}: {ex['reason']}")
    return lines


def write_csv(rows: Iterator[HeldBack], path: str | Path) -> int:
    """Held-back rows to a UTF-8 CSV (phones masked); the number of rows written."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r.as_row())
            n += 1
    return n
