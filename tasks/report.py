"""Campaign metrics: per campaign and segment, as tables, markdown and an HTML file with a chart."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


from sqlalchemy import text

from store.db import read_frame, utcnow
from store.quarantine import summary as quarantine_summary
from tasks.accounting import campaign_accounting
from tasks.outcomes import BUCKET_SQL, OUTCOMES, SENT_SQL, money, pct

FINAL = ("delivered", "undelivered", "expired", "rejected", "failed")


GUARANTEE = ("Every CRM row is accounted for (planned, quarantined with a reason, merged as a duplicate, or "
             "excluded by consent); a message is submitted at most once per idempotency key, across retries, reruns "
             "and crashes; consent and opt-outs are checked again at send time.")
FUNNEL = {"contacts": "CRM rows", "quarantined": "quarantined", "duplicates": "duplicates", "no_consent": "no consent",
          "not_in_segment": "not in segment", "planned": "planned"}


@dataclass
class CampaignReport:
    generated_at: datetime
    rows: list[dict[str, Any]]  # one per campaign x segment: counts per outcome bucket, rates as fractions
    failures: list[dict[str, Any]]  # campaign, reason, count
    held: list[dict[str, Any]] = None  # campaign, rule, outcome (deferred | held back | expired), count
    funnel: dict[str, Any] | None = None  # one campaign's contact funnel (tasks.accounting)
    quarantine: list[dict[str, Any]] | None = None  # one campaign's quarantine reasons (store.quarantine)
    campaign: str | None = None
    html_path: Path | None = None
    metrics: list[dict[str, Any]] | None = None  # tasks/metrics.py rows, set by write_html

    def buckets(self) -> list[str]:
        """The outcome buckets shown: every one that holds a message in some row."""
        return [b for b in OUTCOMES if any(r[b] for r in self.rows)]

    def display_rows(self) -> list[dict[str, str]]:
        """The rows as people read them (markdown, HTML, the table artifact): the same strings everywhere."""
        out = []
        for r in self.rows:
            d = {"campaign": r["campaign"], "segment": r["segment"], "planned": str(r["planned"])}
            d.update({OUTCOMES[b].split(" (")[0]: str(r[b]) for b in self.buckets()})
            d.update({"sent": str(r["sent"]), "delivery rate": pct(r["delivered"], r["sent"]),
                      "parts sent": str(r["parts_sent"]), "planned cost": money(r["cost_planned"], r["currency"]),
                      "spent": money(r["cost_spent"], r["currency"]), "opt-outs": str(r["opt_outs"])})
            out.append(d)
        return out

    def funnel_row(self) -> dict[str, str] | None:
        if not self.funnel:
            return None
        return {label: str(self.funnel[k]) for k, label in FUNNEL.items() if k in self.funnel}

    def markdown(self) -> str:
        title = f"Campaign report: {self.campaign}" if self.campaign else "Campaign report"
        lines = [f"# {title} ({self.generated_at:%Y-%m-%d %H:%M} UTC)", "", f"> {GUARANTEE}", ""]
        if not self.rows:
            return "\n".join(lines + ["No campaigns yet."])

        def table(rows: list[dict[str, str]]) -> list[str]:
            cols = list(rows[0])
            return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                    ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows])

        if self.funnel_row():
            lines += ["## Contacts", ""] + table([self.funnel_row()]) + [""]
        lines += ["## Messages", "", "Each planned message is counted in exactly one outcome column; "
                  "delivery rate = delivered / sent; costs in the gateway's currency.", ""]
        lines += table(self.display_rows())
        if self.failures:
            lines += ["", "## Failures by reason", ""] + table(
                [{k: str(v) for k, v in f.items()} for f in self.failures])
        if self.held:
            lines += ["", "## Held back by contact policy", ""] + table(
                [{k: str(v) for k, v in h.items()} for h in self.held])
        if self.quarantine:
            lines += ["", "## Quarantine reasons", ""] + table(self.quarantine_rows())
        return "\n".join(lines)

    def quarantine_rows(self) -> list[dict[str, str]]:
        return [{"step": g["step"], "reason": g["reason_code"], "count": str(g["count"]),
                 "example": f"{g['example']['crm_id']} {g['example']['phone']}: {g['example']['reason']}".strip()}
                for g in self.quarantine or []]


def collect(engine, campaign: str | None = None) -> CampaignReport:
    where = "WHERE c.name = :name" if campaign else ""
    params = {"name": campaign} if campaign else {}
    bucket_sums = ", ".join(f"SUM(CASE WHEN {BUCKET_SQL} = '{b}' THEN 1 ELSE 0 END) AS {b}" for b in OUTCOMES)
    with engine.begin() as conn:
        agg = read_frame(
            conn,
            "SELECT c.name AS campaign, COALESCE(o.segment, c.segment) AS segment, c.started_at, c.currency, "
            f"COUNT(o.id) AS planned, {bucket_sums}, "
            f"SUM(CASE WHEN {SENT_SQL} THEN 1 ELSE 0 END) AS sent, "
            f"SUM(CASE WHEN {SENT_SQL} THEN o.segments ELSE 0 END) AS parts_sent, "
            "SUM(COALESCE(o.cost, 0)) AS cost_planned, "
            f"SUM(CASE WHEN {SENT_SQL} THEN o.cost ELSE 0 END) AS cost_spent, "
            "SUM(CASE WHEN ct.opted_out_at IS NOT NULL AND o.submitted_at IS NOT NULL AND ct.opted_out_at >= o.submitted_at "
            "THEN 1 ELSE 0 END) AS opt_outs "
            f"FROM campaigns c LEFT JOIN outbox o ON o.campaign_id = c.id LEFT JOIN contacts ct ON ct.id = o.contact_id {where} "
            "GROUP BY c.name, COALESCE(o.segment, c.segment), c.started_at, c.currency ORDER BY c.started_at, c.name",
            params,
        )
        fails = read_frame(
            conn,
            "SELECT c.name AS campaign, o.state, COALESCE(o.error_code, '') AS code, COUNT(*) AS count "
            f"FROM outbox o JOIN campaigns c ON c.id = o.campaign_id "
            f"{'WHERE c.name = :name AND' if campaign else 'WHERE'} o.state IN ('undelivered','expired','rejected','failed') "
            "GROUP BY c.name, o.state, COALESCE(o.error_code, '') ORDER BY count DESC",
            params,
        )
        held = read_frame(
            conn,
            "SELECT c.name AS campaign, o.hold_rule AS rule, CASE WHEN o.state = 'planned' THEN 'deferred' "
            "WHEN o.state = 'expired' THEN 'expired' WHEN o.state = 'rejected' THEN 'held back' ELSE 'deferred, then sent' END "
            "AS outcome, COUNT(*) AS count FROM outbox o JOIN campaigns c ON c.id = o.campaign_id "
            f"{'WHERE c.name = :name AND' if campaign else 'WHERE'} o.hold_rule IS NOT NULL "
            "GROUP BY c.name, o.hold_rule, CASE WHEN o.state = 'planned' THEN 'deferred' WHEN o.state = 'expired' "
            "THEN 'expired' WHEN o.state = 'rejected' THEN 'held back' ELSE 'deferred, then sent' END ORDER BY count DESC",
            params,
        )
        cid = conn.execute(text("SELECT id FROM campaigns WHERE name = :name"), params).scalar() if campaign else None
    rows = []
    for r in agg.to_dict("records"):
        row = {"campaign": r["campaign"], "segment": r["segment"], "currency": r["currency"] or "RUB",
               "planned": int(r["planned"] or 0)}
        row.update({b: int(r[b] or 0) for b in OUTCOMES})
        row.update({"sent": int(r["sent"] or 0), "parts_sent": int(r["parts_sent"] or 0),
                    "cost_planned": round(float(r["cost_planned"] or 0.0), 2),
                    "cost_spent": round(float(r["cost_spent"] or 0.0), 2), "opt_outs": int(r["opt_outs"] or 0)})
        row["delivery_rate"] = row["delivered"] / row["sent"] if row["sent"] else 0.0
        rows.append(row)
    failures = [
        {"campaign": f["campaign"], "state": f["state"], "reason": describe_error(f["state"], f["code"]), "count": int(f["count"])}
        for f in fails.to_dict("records")
    ]
    held_rows = [{"campaign": h["campaign"], "rule": h["rule"], "outcome": h["outcome"], "count": int(h["count"])}
                 for h in held.to_dict("records")]
    funnel = quarantine = None
    if cid is not None:
        funnel = campaign_accounting(engine, cid)
        quarantine = quarantine_summary(engine, campaign=campaign)
    return CampaignReport(generated_at=utcnow(), rows=rows, failures=failures, held=held_rows, funnel=funnel,
                          quarantine=quarantine, campaign=campaign)


ERROR_TEXT = {
    "001": "unknown subscriber",
    "027": "absent subscriber",
    "013": "call barred",
    "031": "subscriber busy",
    "034": "system failure",
    "000": "validity period expired",
    "TTL": "no final receipt in time",
    "0x0000000B": "invalid destination address",
    "0x00000058": "throttled",
    "POLICY_OPTED_OUT": "opted out before send",
    "POLICY_NO_CONSENT": "consent withdrawn before send",
    "POLICY_NO_CONTACT": "contact removed before send",
}


def describe_error(state: str, code: str) -> str:
    text = ERROR_TEXT.get(code, "")
    return f"{state}: {code} {text}".strip() if code else state
