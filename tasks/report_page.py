"""The HTML report a marketer reads: the funnel, delivery and clicks over time, failures by reason, cost
against revenue, per segment. Interactive Plotly charts, self-contained: plotly.js is inlined once, no
CDN, so the page works offline and as an e-mail attachment; readable on a laptop and on a phone."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import DateTime, text

from tasks.clicks import is_human
from tasks.metrics import campaign_metrics
from tasks.report import GUARANTEE, CampaignReport, collect
from store.db import get_engine

CONFIG = {"responsive": True, "displaylogo": False}
GREEN, RED, BLUE, GREY, ORANGE = "#2e7d32", "#c62828", "#1565c0", "#9e9e9e", "#ef6c00"


def _series(engine, campaign: str | None) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Deliveries, requests to links and people's clicks per hour."""
    where = "AND c.name = :n" if campaign else ""
    p = {"n": campaign} if campaign else {}
    with engine.connect() as conn:
        delivered = [r[0] for r in conn.execute(text(
            f"SELECT o.final_at FROM outbox o JOIN campaigns c ON c.id = o.campaign_id WHERE o.state = 'delivered' "
            f"AND o.final_at IS NOT NULL {where}").columns(final_at=DateTime), p)]
        clicks = conn.execute(text(
            "SELECT k.at, k.bot_reason, o.final_at, o.state FROM clicks k JOIN short_links l ON l.code = k.code "
            f"JOIN campaigns c ON c.id = l.campaign_id LEFT JOIN outbox o ON o.idempotency_key = l.outbox_key "
            f"WHERE 1 = 1 {where}").columns(at=DateTime, final_at=DateTime), p).all()

    def hourly(times: list) -> pd.Series:
        if not times:
            return pd.Series(dtype="int64")
        return pd.Series(1, index=pd.DatetimeIndex(times)).resample("1h").sum()

    human = [at for at, bot, fin, state in clicks if is_human(bot, at, fin, state)]
    return hourly(delivered), hourly([c[0] for c in clicks]), hourly(human)


def _figures(engine, metrics: list[dict[str, Any]], failures: list[dict[str, Any]], campaign: str | None) -> list:
    import plotly.graph_objects as go

    figs = []
    sent = sum(m["sent"] for m in metrics)
    delivered = sum(m["delivered"] for m in metrics)
    clickers = sum(m["unique_clickers"] for m in metrics)
    conversions = sum(m["conversions"] for m in metrics)
    f = go.Figure(go.Funnel(y=["sent", "delivered", "clicked (people)", "converted (orders)"],
                            x=[sent, delivered, clickers, conversions], textinfo="value+percent initial",
                            marker={"color": [BLUE, GREEN, ORANGE, "#6a1b9a"]}))
    f.update_layout(title="Funnel: sent -> delivered -> clicked -> converted")
    figs.append(("funnel", f))
    d, raw, human = _series(engine, campaign)
    f = go.Figure()
    f.add_trace(go.Scatter(x=d.index, y=d.values, name="delivered", mode="lines+markers", line={"color": GREEN}))
    f.add_trace(go.Scatter(x=human.index, y=human.values, name="clicks by people", mode="lines+markers",
                           line={"color": ORANGE}))
    f.add_trace(go.Scatter(x=raw.index, y=raw.values, name="all requests (incl. previews, bots)", mode="lines",
                           line={"color": GREY, "dash": "dot"}))
    f.update_layout(title="Delivery and clicks over time (per hour, UTC)", xaxis_title="", yaxis_title="per hour")
    figs.append(("over-time", f))
    if failures:
        df = pd.DataFrame(failures).groupby("reason", as_index=False)["count"].sum().sort_values("count")
        f = go.Figure(go.Bar(x=df["count"], y=df["reason"], orientation="h", marker_color=RED))
        f.update_layout(title="Failures by reason", xaxis_title="messages")
        figs.append(("failures", f))
    names = [m["campaign"] for m in metrics]
    f = go.Figure([go.Bar(x=names, y=[m["cost"] for m in metrics], name="cost", marker_color=RED),
                   go.Bar(x=names, y=[m["revenue"] for m in metrics], name="revenue (attributed)",
                          marker_color=GREEN)])
    cur = metrics[0]["currency"] if metrics else ""
    f.update_layout(title=f"Cost vs revenue ({cur})", barmode="group")
    figs.append(("cost-revenue", f))
    segs = [(m["campaign"], s) for m in metrics for s in m["segments"]]
    if segs:
        labels = [f"{c} / {s['segment']}" for c, s in segs]
        f = go.Figure([go.Bar(x=labels, y=[s["delivered"] for _, s in segs], name="delivered", marker_color=GREEN),
                       go.Bar(x=labels, y=[s["conversions"] for _, s in segs], name="conversions",
                              marker_color="#6a1b9a")])
        f.update_layout(title="Per segment", barmode="group")
        figs.append(("segments", f))
    for m in metrics:
        t = m.get("ab")
        if not t:
            continue
        arms = [a for a in t["arms"] if t["arms"][a]["rate"] is not None]
        ctl = t["arms"][t["control"]]["rate"] or 0.0
        fixed = (t.get("fixed_horizon") or {}).get("variants", {})
        err_hi = [0.0 if a == t["control"] else max(0.0, fixed[a]["diff_ci"][1] + ctl - t["arms"][a]["rate"])
                  if a in fixed else 0.0 for a in arms]
        err_lo = [0.0 if a == t["control"] else max(0.0, t["arms"][a]["rate"] - (fixed[a]["diff_ci"][0] + ctl))
                  if a in fixed else 0.0 for a in arms]
        f = go.Figure(go.Bar(x=arms, y=[t["arms"][a]["rate"] * 100 for a in arms],
                             error_y={"type": "data", "symmetric": False, "array": [e * 100 for e in err_hi],
                                      "arrayminus": [e * 100 for e in err_lo]},
                             marker_color=[GREEN if a == t["winner"] else BLUE for a in arms]))
        f.update_layout(title=f"A/B {m['campaign']}: {t['metric'].replace('_', ' ')} per arm, % (bars: interval of "
                              f"the difference to the control {t['control']})")
        figs.append((f"ab-{m['campaign']}", f))
    for _, fig in figs:
        fig.update_layout(margin={"l": 40, "r": 20, "t": 60, "b": 40}, height=380, template="plotly_white",
                          legend={"orientation": "h", "y": -0.2})
    return figs


def metrics_rows(metrics: list[dict[str, Any]]) -> list[dict[str, str]]:
    def pct(v):
        return "" if v is None else f"{v * 100:.1f} %"

    return [{"campaign": m["campaign"], "sent": str(m["sent"]), "delivered": str(m["delivered"]),
             "failed": str(m["failed"]), "clicks (people)": str(m["clicks_human"]),
             "requests": str(m["clicks_total"]), "clickers": str(m["unique_clickers"]), "click rate": pct(m["click_rate"]),
             "replies": str(m["replies"]), "opt-outs": str(m["opt_outs"]), "conversions": str(m["conversions"]),
             "conversion rate": pct(m["conversion_rate"]), "revenue": f"{m['revenue']:,.2f}",
             "average order": "" if m["average_order"] is None else f"{m['average_order']:,.2f}",
             "cost": f"{m['cost']:,.2f}", "cost / conversion": "" if m["cost_per_conversion"] is None
             else f"{m['cost_per_conversion']:,.2f}", "ROI": pct(m["roi"])} for m in metrics]


def ab_rows(metrics: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per arm of every A/B test: size, rate, lift with interval, fixed-horizon and sequential p."""
    def num(v, fmt="{:.4f}"):
        return "" if v is None else fmt.format(v)

    rows = []
    for m in metrics:
        t = m.get("ab")
        if not t:
            continue
        fixed = (t.get("fixed_horizon") or {}).get("variants", {})
        seq = t.get("sequential_p") or {}
        for arm, a in t["arms"].items():
            v = fixed.get(arm, {})
            ci = v.get("diff_ci")
            rows.append({"campaign": m["campaign"], "arm": arm + (" (control)" if arm == t["control"] else ""),
                         "metric": t["metric"], "sent": str(a["sent"]), "events": str(a["events"]),
                         "rate": num(a["rate"] and a["rate"] * 100, "{:.2f} %"),
                         "lift": num(v.get("lift") and v["lift"] * 100, "{:+.1f} %"),
                         "difference, CI (pp)": "" if not ci else f"{ci[0] * 100:+.2f} .. {ci[1] * 100:+.2f}",
                         "p (fixed horizon)": num(v.get("p_value")), "p (Holm)": num(v.get("p_adjusted")),
                         "p (sequential, always valid)": num(seq.get(arm)), "opt-outs": str(a["opt_outs"]),
                         "conversions": str(a.get("conversions", 0)), "revenue": f"{a.get('revenue', 0.0):,.2f}"})
    return rows


def ab_summary(metrics: list[dict[str, Any]]) -> list[str]:
    """Each test's verdict in words, its SRM status, holdout lift and decision log, as lines."""
    out = []
    for m in metrics:
        t = m.get("ab")
        if not t:
            continue
        srm = t.get("srm_p_value")
        srm_s = "n/a" if srm is None else (f"MISMATCH (p = {srm:.2g} < 0.001): no automatic decision" if srm < 0.001
                                           else f"ok (p = {srm:.2g})")
        out.append(f"{m['campaign']} ({t['phase']}): {t['verdict']}")
        out.append(f"  sample ratio: {srm_s}; held out: {t['held_out']}; looks: {len(t['looks'])}")
        h = t.get("holdout_lift")
        if h:
            lo, hi = h["conversion_lift_ci"]
            rlo, rhi = h["revenue_per_contact_lift_ci"]
            out.append(f"  against the holdout ({h['days']:g} days): conversion {h['conversion_contacted'] * 100:.2f} % "
                       f"vs {h['conversion_held_out'] * 100:.2f} % (difference {lo * 100:+.2f} .. {hi * 100:+.2f} pp), "
                       f"revenue per contact {h['revenue_per_contact_contacted']:.2f} vs "
                       f"{h['revenue_per_contact_held_out']:.2f} (difference {rlo:+.2f} .. {rhi:+.2f})")
    return out


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_page(engine, report, metrics: list[dict[str, Any]], title: str, notes: str) -> str:
    """The page's HTML. ``report`` is tasks.report.CampaignReport (funnel, outcome rows, failures)."""
    from plotly.offline import get_plotlyjs

    figs = _figures(engine, metrics, report.failures, report.campaign)
    charts = "".join(f'<section class="chart">{fig.to_html(full_html=False, include_plotlyjs=False, div_id=key, config=CONFIG)}'
                     f"</section>" for key, fig in figs)
    outcome_rows = report.display_rows()
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:0 auto;padding:1em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;font-size:.9em}}td,th{{border:1px solid #ddd;padding:4px 8px;text-align:right}}
th{{background:#f5f5f5}}td:first-child,th:first-child{{text-align:left}}.scroll{{overflow-x:auto}}
.chart{{margin:1.5em 0}}.cards{{display:flex;flex-wrap:wrap;gap:.8em}}.card{{flex:1 1 9em;border:1px solid #ddd;
border-radius:8px;padding:.6em}}.card b{{display:block;font-size:1.5em}}blockquote{{color:#444;border-left:4px solid
{GREEN};margin:1em 0;padding-left:1em}}@media (max-width:600px){{body{{padding:.5em}}h1{{font-size:1.3em}}}}</style>
<script>{get_plotlyjs()}</script></head><body>
<h1>{html.escape(title)}</h1><p>Generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC</p>
{_cards(metrics)}
{charts}
<h2>What each campaign earned</h2>{_table(metrics_rows(metrics))}
{_ab_section(metrics)}
<h2>Where every message ended</h2>{_table(outcome_rows)}
<h2>Failures by reason</h2>{_table([{k: str(v) for k, v in f.items()} for f in report.failures])}
<blockquote>{html.escape(notes)}</blockquote>
</body></html>"""


def _ab_section(metrics: list[dict[str, Any]]) -> str:
    rows = ab_rows(metrics)
    if not rows:
        return ""
    lines = "".join(f"<p>{html.escape(x)}</p>" for x in ab_summary(metrics))
    log = [{"campaign": m["campaign"], "look at (UTC)": lk["at"][:19], "decided": lk["winner"] or "",
            "verdict": lk["verdict"]} for m in metrics if m.get("ab") for lk in m["ab"]["looks"][-10:]]
    return f"<h2>A/B tests</h2>{lines}{_table(rows)}<h3>Decision log (last looks)</h3>{_table(log)}"


def _cards(metrics: list[dict[str, Any]]) -> str:
    if not metrics:
        return "<p>No campaigns yet.</p>"
    tot = {k: sum(m[k] for m in metrics) for k in ("sent", "delivered", "clicks_human", "conversions", "revenue", "cost")}
    roi = (tot["revenue"] - tot["cost"]) / tot["cost"] if tot["cost"] else None
    cur = metrics[0]["currency"]
    cards = [("sent", f"{tot['sent']:,}"), ("delivered", f"{tot['delivered']:,}"),
             ("clicks by people", f"{tot['clicks_human']:,}"), ("conversions", f"{tot['conversions']:,}"),
             (f"revenue, {cur}", f"{tot['revenue']:,.0f}"), (f"cost, {cur}", f"{tot['cost']:,.0f}"),
             ("ROI", "n/a" if roi is None else f"{roi * 100:.0f} %")]
    return '<div class="cards">' + "".join(f'<div class="card"><b>{v}</b>{html.escape(k)}</div>' for k, v in cards) + "</div>"


def write_page(engine, report, metrics: list[dict[str, Any]], out_dir: Path, name: str, notes: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{report.generated_at:%Y%m%d-%H%M%S}.html"
    title = f"SMS campaign report: {report.campaign}" if report.campaign else "SMS campaigns report"
    path.write_text(render_page(engine, report, metrics, title, notes), encoding="utf-8")
    return path


def write_html(report: CampaignReport, out_dir: Path, name: str = "report", engine=None) -> Path:
    """The report's page (Plotly charts, self-contained); sets ``report.html_path`` and ``report.metrics``."""
    engine = engine or get_engine()
    metrics = campaign_metrics(engine, report.campaign, report)
    path = write_page(engine, report, metrics, out_dir, name, GUARANTEE)
    report.html_path = path
    report.metrics = metrics
    return path


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="campaign-report", cache_policy=NO_CACHE)
def report_task(campaign: str | None, out_dir: str, database_url: str | None) -> CampaignReport:
    """Collect, write the HTML page, and publish the same numbers as Prefect artifacts: the markdown
    report, the per-campaign table of what each earned, and a link to the page."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    engine = get_engine(database_url)
    report = collect(engine, campaign)
    write_html(report, Path(out_dir), name=f"report-{campaign}" if campaign else "report", engine=engine)
    earned = metrics_rows(report.metrics or [])
    md = report.markdown()
    if earned:
        cols = list(earned[0])
        md += ("\n\n## What each campaign earned\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
               + "\n".join("| " + " | ".join(r[c] for c in cols) + " |" for r in earned))
    tests = ab_rows(report.metrics or [])
    if tests:
        cols = list(tests[0])
        md += ("\n\n## A/B tests\n\n" + "\n".join(f"- {x.strip()}" for x in ab_summary(report.metrics or []))
               + "\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
               + "\n".join("| " + " | ".join(r[c] for c in cols) + " |" for r in tests))
        create_table_artifact(tests, key="ab-tests", description="A/B arms: rates, lift, p-values")
    create_markdown_artifact(md + f"\n\nHTML: `{report.html_path}`", key="campaign-report",
                             description="Delivery, clicks, conversions, revenue, cost, ROI per campaign")
    if report.rows:
        create_table_artifact(report.display_rows(), key="campaign-metrics", description="Per campaign and segment")
    if earned:
        create_table_artifact(earned, key="campaign-earnings", description="What each campaign earned")
    create_link_artifact(report.html_path.resolve().as_uri(), link_text=f"HTML report ({report.html_path.name})",
                         key="campaign-report-page", description="The report page (self-contained, works offline)")
    return report
