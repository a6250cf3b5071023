"""One vocabulary for what became of planned messages, used by every summary and report.

Every planned message is in exactly one bucket (``OUTCOMES``, in funnel order), decided from the
outbox row alone (``BUCKET_SQL``). "Sent" means handed to the gateway and accepted by it; the money
"spent" is the price of the parts of sent messages, "planned" cost the price of every planned one.
SMS segments are called *parts* (the audience is the *segment*). Rates are percentages, one decimal.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import text

# bucket -> label for people, in the order a report shows them
OUTCOMES: dict[str, str] = {
    "delivered": "delivered",
    "undelivered": "undelivered (operator said no)",
    "expired": "expired at the operator (no final receipt in time)",
    "rejected": "rejected by the gateway",
    "failed": "failed to send",
    "held_back": "held back by contact policy (opt-out, consent, contact removed)",
    "expired_unsent": "not sent before the campaign ended",
    "awaiting_receipt": "sent, awaiting the final receipt",
    "deferred": "deferred by contact policy (quiet hours, caps), will be sent",
    "not_sent_yet": "not sent yet",
}
SENT = ("delivered", "undelivered", "expired", "awaiting_receipt")  # plus rejections after acceptance

_SUBMITTED = "o.submitted_at IS NOT NULL"
BUCKET_SQL = f"""CASE
  WHEN o.state = 'delivered' THEN 'delivered'
  WHEN o.state = 'undelivered' THEN 'undelivered'
  WHEN o.state = 'expired' AND {_SUBMITTED} THEN 'expired'
  WHEN o.state = 'expired' THEN 'expired_unsent'
  WHEN o.state = 'rejected' AND o.error_code LIKE 'POLICY%' THEN 'held_back'
  WHEN o.state = 'rejected' THEN 'rejected'
  WHEN o.state = 'failed' THEN 'failed'
  WHEN o.state = 'submitted' THEN 'awaiting_receipt'
  WHEN o.hold_rule IS NOT NULL THEN 'deferred'
  ELSE 'not_sent_yet' END"""
# accepted by the gateway: the messages that cost money
SENT_SQL = (f"(o.state IN ('submitted', 'delivered', 'undelivered') OR (o.state IN ('expired', 'rejected') "
            f"AND {_SUBMITTED} AND (o.error_code IS NULL OR o.error_code NOT LIKE 'POLICY%')))")


def pct(part: float, whole: float) -> str:
    """``96.5 %``; ``-`` when there is nothing to divide by."""
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def money(amount: float, currency: str | None) -> str:
    return f"{amount:,.2f} {currency or ''}".replace(",", " ").strip()


def message_outcomes(engine, campaign_id: int) -> dict[str, Any]:
    """``{"planned", "outcomes": {bucket: n, ...}, "sent", "parts_sent", "cost_spent"}``; the
    buckets add up to ``planned`` (every bucket is present, zeros included)."""
    q = text(f"""SELECT {BUCKET_SQL} AS bucket, COUNT(*) AS n,
                 SUM(CASE WHEN {SENT_SQL} THEN 1 ELSE 0 END) AS sent,
                 SUM(CASE WHEN {SENT_SQL} THEN o.segments ELSE 0 END) AS parts,
                 SUM(CASE WHEN {SENT_SQL} THEN o.cost ELSE 0 END) AS cost
                 FROM outbox o WHERE o.campaign_id = :c GROUP BY 1""")
    out = dict.fromkeys(OUTCOMES, 0)
    sent = parts = 0
    cost = 0.0
    with engine.connect() as conn:
        for bucket, n, s, p, c in conn.execute(q, {"c": campaign_id}):
            out[bucket] = int(n)
            sent += int(s or 0)
            parts += int(p or 0)
            cost += float(c or 0.0)
    return {"planned": sum(out.values()), "outcomes": out, "sent": sent, "parts_sent": parts,
            "cost_spent": round(cost, 4)}


def outcome_line(o: dict[str, Any], currency: str | None) -> str:
    """``1253 planned: 1190 delivered, 12 rejected by the gateway, ...; 1202 sent, 2204 parts, spent 5 510.00 RUB``"""
    parts = [f"{n} {OUTCOMES[b]}" for b, n in o["outcomes"].items() if n]
    return (f"{o['planned']} planned: " + (", ".join(parts) or "none") +
            f"; {o['sent']} sent, {o['parts_sent']} parts, spent {money(o['cost_spent'], currency)}")
