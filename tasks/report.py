"""Campaign metrics: per campaign and segment, as tables, markdown and an HTML file with a chart."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from store.db import read_frame, utcnow

FINAL = ("delivered", "undelivered", "expired", "rejected", "failed")


@dataclass
class CampaignReport:
    generated_at: datetime
    rows: list[dict[str, Any]]  # one per campaign x segment
    failures: list[dict[str, Any]]  # campaign, reason, count
    held: list[dict[str, Any]] = None  # campaign, rule, outcome (deferred | held back | expired), count
    html_path: Path | None = None

    def markdown(self) -> str:
        lines = [f"# Campaign report ({self.generated_at:%Y-%m-%d %H:%M} UTC)", ""]
        if not self.rows:
            return "\n".join(lines + ["No campaigns yet."])
        cols = ["campaign", "segment", "planned", "sent", "delivered", "failed", "pending", "delivery_rate",
                "segments", "cost", "opt_outs"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in self.rows:
            vals = [f"{r[c]:.1%}" if c == "delivery_rate" else (f"{r[c]:.2f}" if c == "cost" else str(r[c])) for c in cols]
            lines.append("| " + " | ".join(vals) + " |")
        if self.failures:
            lines += ["", "## Failures by reason", "", "| campaign | state | reason | count |", "|---|---|---|---|"]
            for f in self.failures:
                lines.append(f"| {f['campaign']} | {f['state']} | {f['reason']} | {f['count']} |")
        if self.held:
            lines += ["", "## Held back by contact policy", "", "| campaign | rule | outcome | count |", "|---|---|---|---|"]
            for h in self.held:
                lines.append(f"| {h['campaign']} | {h['rule']} | {h['outcome']} | {h['count']} |")
        return "\n".join(lines)


def collect(engine, campaign: str | None = None) -> CampaignReport:
    where = "WHERE c.name = :name" if campaign else ""
    params = {"name": campaign} if campaign else {}
    with engine.begin() as conn:
        agg = read_frame(
            conn,
            "SELECT c.name AS campaign, COALESCE(o.segment, c.segment) AS segment, c.started_at, "
            "COUNT(o.id) AS planned, "
            "SUM(CASE WHEN o.state IN ('submitted','delivered','undelivered','expired') OR "
            "(o.state = 'rejected' AND o.submitted_at IS NOT NULL) THEN 1 ELSE 0 END) AS sent, "
            "SUM(CASE WHEN o.state = 'delivered' THEN 1 ELSE 0 END) AS delivered, "
            "SUM(CASE WHEN o.state IN ('undelivered','expired','rejected','failed') THEN 1 ELSE 0 END) AS failed, "
            "SUM(CASE WHEN o.state IN ('planned','queued','submitted') THEN 1 ELSE 0 END) AS pending, "
            "SUM(CASE WHEN o.state IN ('submitted','delivered','undelivered','expired') THEN o.segments ELSE 0 END) AS segments, "
            "SUM(CASE WHEN o.state IN ('submitted','delivered','undelivered','expired') THEN o.cost ELSE 0 END) AS cost, "
            "SUM(CASE WHEN ct.opted_out_at IS NOT NULL AND o.submitted_at IS NOT NULL AND ct.opted_out_at >= o.submitted_at "
            "THEN 1 ELSE 0 END) AS opt_outs "
            f"FROM campaigns c LEFT JOIN outbox o ON o.campaign_id = c.id LEFT JOIN contacts ct ON ct.id = o.contact_id {where} "
            "GROUP BY c.name, COALESCE(o.segment, c.segment), c.started_at ORDER BY c.started_at, c.name",
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
    rows = []
    for r in agg.to_dict("records"):
        sent = int(r["sent"] or 0)
        delivered = int(r["delivered"] or 0)
        rows.append(
            {
                "campaign": r["campaign"],
                "segment": r["segment"],
                "planned": int(r["planned"] or 0),
                "sent": sent,
                "delivered": delivered,
                "failed": int(r["failed"] or 0),
                "pending": int(r["pending"] or 0),
                "delivery_rate": (delivered / sent) if sent else 0.0,
                "segments": int(r["segments"] or 0),
                "cost": round(float(r["cost"] or 0.0), 2),
                "opt_outs": int(r["opt_outs"] or 0),
            }
        )
    failures = [
        {"campaign": f["campaign"], "state": f["state"], "reason": describe_error(f["state"], f["code"]), "count": int(f["count"])}
        for f in fails.to_dict("records")
    ]
    held_rows = [{"campaign": h["campaign"], "rule": h["rule"], "outcome": h["outcome"], "count": int(h["count"])}
                 for h in held.to_dict("records")]
    return CampaignReport(generated_at=utcnow(), rows=rows, failures=failures, held=held_rows)


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


def _chart_png(report: CampaignReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(report.rows)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.5 * len(df) + 1.5)))
    labels = [f"{r.campaign} / {r.segment}" for r in df.itertuples()]
    left = [0] * len(df)
    for col, color in (("delivered", "#2e7d32"), ("failed", "#c62828"), ("pending", "#9e9e9e")):
        ax.barh(labels, df[col], left=left, color=color, label=col)
        left = [a + b for a, b in zip(left, df[col])]
    ax.set_xlabel("messages")
    ax.set_title("Delivery by campaign and segment")
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(report: CampaignReport, out_dir: Path, name: str = "report") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{report.generated_at:%Y%m%d-%H%M%S}.html"
    table = pd.DataFrame(report.rows).to_html(index=False, float_format=lambda v: f"{v:.3f}") if report.rows else "<p>No campaigns.</p>"
    fails = pd.DataFrame(report.failures).to_html(index=False) if report.failures else "<p>No failures.</p>"
    held = pd.DataFrame(report.held).to_html(index=False) if report.held else "<p>Nothing held back.</p>"
    chart = f'<img alt="delivery chart" src="data:image/png;base64,{_chart_png(report)}">' if report.rows else ""
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>SMS campaign report</h1><p>Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC</p>
<h2>By campaign and segment</h2>{table}<h2>Chart</h2>{chart}<h2>Failures by reason</h2>{fails}<h2>Held back by contact policy</h2>{held}</body></html>"""
    path.write_text(doc, encoding="utf-8")
    report.html_path = path
    return path


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="campaign-report", cache_policy=NO_CACHE)
def report_task(campaign: str | None, out_dir: str, database_url: str | None) -> CampaignReport:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from store.db import get_engine

    report = collect(get_engine(database_url), campaign)
    write_html(report, Path(out_dir), name=f"report-{campaign}" if campaign else "report")
    create_markdown_artifact(report.markdown() + f"\n\nHTML: `{report.html_path}`", key="campaign-report",
                             description="Delivery, failures, cost per campaign and segment")
    if report.rows:
        create_table_artifact(report.rows, key="campaign-metrics", description="Per campaign and segment")
    return report
