"""Campaign records and the accounting of every source row: planned, quarantined with a
reason, merged as a duplicate, or excluded by consent; exactly once each."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from store.db import utcnow
from tasks.outcomes import message_outcomes


def ensure_campaign(engine, *, name: str, source: str, segment: str, template_name: str, kind: str,
                    gateway: str | None, price_per_segment: float, params: dict[str, Any] | None = None,
                    policy: dict[str, Any] | None = None, ends_at=None, currency: str = "RUB") -> int:
    """The campaign's id; created on first run, reused when a campaign of that name is rerun."""
    with engine.begin() as conn:
        row = conn.execute(text("SELECT id, source, status FROM campaigns WHERE name = :n"), {"n": name}).first()
        if row is not None:
            if row[2] == "archived":  # its messages left the outbox: a rerun could not know whom it reached
                raise ValueError(f"campaign '{name}' is archived (smsflow archive); a rerun could send twice: "
                                 "pick another name")
            if row[1] != source:
                raise ValueError(f"campaign '{name}' already exists for source '{row[1]}', not '{source}'; pick another name")
            conn.execute(text("UPDATE campaigns SET status = 'running', gateway = COALESCE(:g, gateway), "
                              "policy = COALESCE(:pol, policy), ends_at = COALESCE(:end, ends_at) WHERE id = :i"),
                         {"g": gateway, "i": row[0], "pol": json.dumps(policy) if policy else None, "end": ends_at})
            # the currency stays what it was when the first message was priced
            return int(row[0])
        conn.execute(
            text("INSERT INTO campaigns (name, source, segment, template_name, kind, gateway, price_per_segment, currency, "
                 "status, params, policy, ends_at, created_at, started_at) "
                 "VALUES (:n, :s, :g, :t, :k, :gw, :p, :cur, 'running', :params, :pol, :end, :now, :now)"),
            {"n": name, "s": source, "g": segment, "t": template_name, "k": kind, "gw": gateway, "p": price_per_segment,
             "cur": currency,
             "params": json.dumps(params or {}, default=str), "pol": json.dumps(policy) if policy else None,
             "end": ends_at, "now": utcnow()},
        )
        return int(conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar())


def campaign_id(engine, name: str) -> int | None:
    with engine.begin() as conn:
        found = conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar()
    return None if found is None else int(found)


def finish_campaign(engine, campaign_id: int, status: str) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE campaigns SET status = :s, finished_at = :now WHERE id = :i"),
                     {"s": status, "now": utcnow(), "i": campaign_id})


def campaign_accounting(engine, campaign_id: int) -> dict[str, Any]:
    """The contact funnel: ``{"contacts", "quarantined", "duplicates", "no_consent", "planned", "parts",
    "cost_planned", "currency"}`` where contacts = quarantined + duplicates + no_consent + planned
    (+ not_in_segment when a segment narrows the audience); parts and cost_planned are those of every
    planned message (what was sent and spent: ``tasks.outcomes``)."""
    # One pass over the source's contacts with three flags each: has a message, failed to render, is in
    # the segment. PostgreSQL hash-joins the three sets (each de-duplicated) and materializes the flags
    # once; SQLite probes the indexes per contact (it would scan a derived set once per contact). Never
    # NOT IN (SELECT ...): PostgreSQL runs that as a per-row subplan over the whole set, or spills.
    # Plans at 1M contacts: bench/notes/postgresql-plans.md.
    if engine.dialect.name == "postgresql":
        flags = """flags AS MATERIALIZED (
          SELECT ct.status, ct.sms_consent, ct.opted_out_at,
            CASE WHEN p.contact_id IS NULL THEN 0 ELSE 1 END AS planned,
            CASE WHEN r.contact_id IS NULL THEN 0 ELSE 1 END AS render_bad,
            CASE WHEN m.contact_id IS NULL THEN 0 ELSE 1 END AS member
          FROM contacts ct JOIN camp ON ct.source = camp.source
          LEFT JOIN (SELECT DISTINCT contact_id FROM outbox WHERE campaign_id = :c) p ON p.contact_id = ct.id
          LEFT JOIN (SELECT DISTINCT contact_id FROM quarantine WHERE step = 'render' AND campaign_id = :c) r
            ON r.contact_id = ct.id
          LEFT JOIN segment_memberships m ON m.segment = camp.segment AND m.contact_id = ct.id
        )"""
    else:
        flags = """flags AS (
          SELECT ct.status, ct.sms_consent, ct.opted_out_at,
            CASE WHEN EXISTS (SELECT 1 FROM outbox o WHERE o.campaign_id = :c AND o.contact_id = ct.id)
                 THEN 1 ELSE 0 END AS planned,
            CASE WHEN EXISTS (SELECT 1 FROM quarantine q WHERE q.step = 'render' AND q.campaign_id = :c
                                 AND q.contact_id = ct.id) THEN 1 ELSE 0 END AS render_bad,
            CASE WHEN EXISTS (SELECT 1 FROM segment_memberships m WHERE m.segment = camp.segment
                                 AND m.contact_id = ct.id) THEN 1 ELSE 0 END AS member
          FROM contacts ct JOIN camp ON ct.source = camp.source
        )"""
    q = text(
        """
        WITH camp AS (SELECT id, source, segment, currency FROM campaigns WHERE id = :c),
        """ + flags + """,
        funnel AS (
          SELECT
            COUNT(*) AS contacts_in_store,
            SUM(CASE WHEN planned = 0 AND status IN ('quarantined', 'new') THEN 1 ELSE 0 END) AS bad_phone,
            SUM(CASE WHEN planned = 0 AND status = 'duplicate' THEN 1 ELSE 0 END) AS dup,
            SUM(CASE WHEN planned = 0 AND status = 'valid' AND render_bad = 1 THEN 1 ELSE 0 END) AS render_bad,
            SUM(CASE WHEN planned = 0 AND status = 'valid' AND render_bad = 0 AND member = 1
                      AND (NOT sms_consent OR opted_out_at IS NOT NULL) THEN 1 ELSE 0 END) AS no_consent,
            SUM(CASE WHEN planned = 0 AND status = 'valid' AND render_bad = 0 AND member = 0 THEN 1 ELSE 0 END)
              AS not_in_segment
          FROM flags
        ),
        msgs AS (SELECT COUNT(*) AS planned, COALESCE(SUM(segments), 0) AS segments, COALESCE(SUM(cost), 0) AS cost
                 FROM outbox WHERE campaign_id = :c),
        xq AS (SELECT SUM(CASE WHEN q.reason_code <> 'duplicate_crm_id' THEN 1 ELSE 0 END) AS extract_bad,
                      SUM(CASE WHEN q.reason_code = 'duplicate_crm_id' THEN 1 ELSE 0 END) AS extract_dup
               FROM quarantine q JOIN camp ON q.source = camp.source WHERE q.step = 'extract')
        SELECT f.contacts_in_store, COALESCE(f.bad_phone, 0) AS bad_phone, COALESCE(f.dup, 0) AS dup,
               COALESCE(f.render_bad, 0) AS render_bad, COALESCE(f.no_consent, 0) AS no_consent,
               COALESCE(f.not_in_segment, 0) AS not_in_segment, COALESCE(xq.extract_bad, 0) AS extract_bad,
               COALESCE(xq.extract_dup, 0) AS extract_dup, msgs.planned, msgs.segments, msgs.cost,
               (SELECT currency FROM camp) AS currency
        FROM funnel f, msgs, xq
        """
    )
    with engine.begin() as conn:
        r = conn.execute(q, {"c": campaign_id}).mappings().one()
    # A contact with a message counts once, as planned, whatever happened to it after planning.
    out = {
        "contacts": int(r["contacts_in_store"] + r["extract_bad"] + r["extract_dup"]),
        "quarantined": int(r["extract_bad"] + r["bad_phone"] + r["render_bad"]),
        "duplicates": int(r["extract_dup"] + r["dup"]),
        "no_consent": int(r["no_consent"]),
        "planned": int(r["planned"]),
        "parts": int(r["segments"]),
        "cost_planned": round(float(r["cost"]), 4),
        "currency": r["currency"] or "RUB",
    }
    if r["not_in_segment"]:
        out["not_in_segment"] = int(r["not_in_segment"])
    return out


def log_event(engine, kind: str, *, campaign_id: int | None = None, payload: dict[str, Any] | None = None,
              emit: bool = True) -> None:
    """Append to the store's event log and emit the same as a Prefect event (``smsflow.<kind>``),
    so automations and deployment triggers can react to it."""
    import json
    import sys

    flow_run_id = None
    if "prefect" in sys.modules:  # else no flow run can be on (a preview does not import Prefect at all)
        try:
            from prefect.runtime import flow_run

            flow_run_id = flow_run.id
        except Exception:  # noqa: BLE001 - outside a flow run
            pass
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO event_log (ts, kind, campaign_id, flow_run_id, payload) VALUES (:ts, :k, :c, :f, :p)"),
            {"ts": utcnow(), "k": kind, "c": campaign_id, "f": flow_run_id,
             "p": json.dumps(payload or {}, ensure_ascii=False, default=str)},
        )
    if emit:
        from prefect.events import emit_event

        emit_event(
            event=f"smsflow.{kind}",
            resource={"prefect.resource.id": f"smsflow.campaign.{campaign_id}" if campaign_id else "smsflow"},
            payload=payload or {},
        )


def record_planned(engine, campaign_id: int, rendered: dict[str, Any], emit: bool = True) -> None:
    """The ``campaign.planned`` event: what the render step planned and priced."""
    log_event(engine, "campaign.planned", campaign_id=campaign_id, emit=emit,
              payload={k: rendered[k] for k in ("planned", "parts", "cost_planned", "currency")})


def close_campaign(engine, campaign_id: int, *, sent: bool, emit: bool = True) -> dict[str, Any]:
    """The end of a campaign run: its accounting (with where every message ended, when it was sent), its
    status ('sent' or 'planned') and the ``campaign.sent`` / ``campaign.dry_run`` event."""
    summary = campaign_accounting(engine, campaign_id)
    if sent:
        summary.update(message_outcomes(engine, campaign_id))
    finish_campaign(engine, campaign_id, "sent" if sent else "planned")
    log_event(engine, "campaign.sent" if sent else "campaign.dry_run", campaign_id=campaign_id, payload=summary,
              emit=emit)
    return summary


def set_attribution(engine, campaign_id: int, delivery_days: float | None, click_days: float | None) -> None:
    """The campaign's own attribution windows (tasks/attribution.py), kept in campaigns.params."""
    if delivery_days is None and click_days is None:
        return
    with engine.begin() as conn:
        raw = conn.execute(text("SELECT params FROM campaigns WHERE id = :i"), {"i": campaign_id}).scalar()
        params = (raw if isinstance(raw, dict) else json.loads(raw or "{}")) or {}
        params["attribution"] = {"delivery_days": delivery_days, "click_days": click_days}
        conn.execute(text("UPDATE campaigns SET params = :p WHERE id = :i"),
                     {"p": json.dumps(params, default=str), "i": campaign_id})
