"""What each campaign did and earned, one dict per campaign: the rows of `smsflow report --json`, the
nightly table artifact and the HTML page.

Definitions (every number recomputable from the store):
  planned, sent, delivered   tasks/outcomes.py buckets ("sent" = accepted by the gateway)
  failed                     undelivered + expired + rejected + failed to send
  clicks_total               every request to the campaign's short links (bots and previews included)
  clicks_human, unique_clickers, clicks_preview   tasks/clicks.py
  replies, median_reply_s    tasks/attribution.py (to the last message sent before the reply)
  opt_outs                   recipients who opted out after their message was sent
  conversions, revenue       orders credited to the campaign (tasks/attribution.py: last touch)
  cost                       the price of the parts sent
  click_rate = clicks_human / delivered; conversion_rate = conversions / delivered;
  average_order = revenue / conversions; cost_per_conversion = cost / conversions;
  roi = (revenue - cost) / cost (None when nothing was spent).
  ab                         A/B campaigns only: tasks/abtest.py ab_report (arms, rates, fixed-horizon and
                             sequential p-values, verdict, decision log, holdout lift)
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import text

from tasks.abtest import ab_report
from tasks.attribution import campaign_earnings
from tasks.clicks import click_counts
from tasks.report import collect

KEYS = ("campaign", "planned", "sent", "delivered", "failed", "clicks_total", "clicks_human", "unique_clickers",
        "replies", "opt_outs", "conversions", "revenue", "cost", "roi")


def _ratio(a: float, b: float, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


def campaign_metrics(engine, campaign: str | None = None, report=None) -> list[dict[str, Any]]:
    """One dict per campaign (or ``campaign``); ``report``: its tasks.report.collect() when the caller has it."""
    report = report if report is not None else collect(engine, campaign)
    with engine.connect() as conn:
        ids = dict(conn.execute(text("SELECT name, id FROM campaigns")).all())
    earnings = campaign_earnings(engine)
    by_campaign: dict[str, dict[str, Any]] = {}
    for r in report.rows:
        m = by_campaign.setdefault(r["campaign"], {"campaign": r["campaign"], "currency": r["currency"], "planned": 0,
                                                   "sent": 0, "delivered": 0, "failed": 0, "opt_outs": 0, "cost": 0.0,
                                                   "segments": []})
        failed = r["undelivered"] + r["expired"] + r["rejected"] + r["failed"]
        for k, v in (("planned", r["planned"]), ("sent", r["sent"]), ("delivered", r["delivered"]),
                     ("failed", failed), ("opt_outs", r["opt_outs"]), ("cost", r["cost_spent"])):
            m[k] += v
        m["segments"].append({"segment": r["segment"], "planned": r["planned"], "sent": r["sent"],
                              "delivered": r["delivered"], "failed": failed, "cost": r["cost_spent"]})
    out = []
    for name, m in by_campaign.items():
        cid = int(ids[name])
        e = earnings.get(cid, {"conversions": 0, "revenue": 0.0, "replies": 0, "median_reply_s": None, "segments": {}})
        m.update(click_counts(engine, cid))
        m.update(replies=e["replies"], median_reply_s=e["median_reply_s"], conversions=e["conversions"],
                 revenue=round(e["revenue"], 2), cost=round(m["cost"], 2))
        for sg in m["segments"]:
            se = e["segments"].get(sg["segment"], {})
            sg.update(conversions=se.get("conversions", 0), revenue=round(se.get("revenue", 0.0), 2),
                      replies=se.get("replies", 0))
        m.update(click_rate=_ratio(m["clicks_human"], m["delivered"]),
                 conversion_rate=_ratio(m["conversions"], m["delivered"]),
                 average_order=_ratio(m["revenue"], m["conversions"], 2),
                 cost_per_conversion=_ratio(m["cost"], m["conversions"], 2),
                 roi=_ratio(m["revenue"] - m["cost"], m["cost"]))
        test = ab_report(engine, cid)
        if test is not None:
            m["ab"] = test
        out.append({**{k: m[k] for k in KEYS}, **{k: v for k, v in m.items() if k not in KEYS}})
    return out
