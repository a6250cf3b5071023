"""`smsflow demo` tells the whole story, and `smsflow report --json` (an exact contract) adds up: every
number is recomputed here independently from the store (plain loops over raw rows, not tasks/metrics)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from store.db import get_engine

REPO = Path(__file__).resolve().parents[2]
SMSFLOW = str(REPO / ".venv/bin/smsflow")
KEYS = ["campaign", "planned", "sent", "delivered", "failed", "clicks_total", "clicks_human", "unique_clickers",
        "replies", "opt_outs", "conversions", "revenue", "cost", "roi"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "SMSFLOW_"))}
    env.update(SMSFLOW_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "home"), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _t(v):
    return datetime.fromisoformat(v) if isinstance(v, str) else v


def test_the_demo_shows_the_whole_funnel_and_the_report_adds_up(tmp_path):
    env = _env(tmp_path)
    demo = subprocess.run([SMSFLOW, "demo", "--contacts", "800", "--wait", "5"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-4000:]
    name = re.search(r"campaign (demo-\S+):", demo.stdout).group(1)
    assert "earned:" in demo.stdout and "ROI" in demo.stdout
    rep = subprocess.run([SMSFLOW, "report", "--campaign", name, "--json"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    lines = rep.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert list(r)[: len(KEYS)] == KEYS

    engine = get_engine(f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}")
    with engine.connect() as c:
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar_one()
        msgs = c.execute(text("SELECT idempotency_key, state, phone_e164, final_at, submitted_at, gateway_message_id, "
                              "segments, cost FROM outbox WHERE campaign_id = :c"), {"c": cid}).all()
        clicks = c.execute(text("SELECT l.outbox_key, c.at, c.bot_reason, l.contact_id FROM clicks c JOIN short_links l "
                                "ON l.code = c.code WHERE l.campaign_id = :c"), {"c": cid}).all()
        orders = c.execute(text("SELECT o.amount, o.ordered_at, ct.phone_e164 FROM orders o JOIN contacts ct "
                                "ON ct.id = o.contact_id WHERE o.revenue")).all()
        all_msgs = c.execute(text("SELECT idempotency_key, campaign_id, state, phone_e164, final_at FROM outbox")).all()
        replies = c.execute(text("SELECT from_e164, received_at FROM inbound_messages WHERE kind = 'reply'")).all()
    by_key = {m.idempotency_key: m for m in msgs}
    delivered = [m for m in msgs if m.state == "delivered"]
    assert r["planned"] == len(msgs) and r["delivered"] == len(delivered) > 0
    assert r["failed"] == sum(m.state in ("undelivered", "expired", "rejected", "failed") for m in msgs)
    assert r["clicks_total"] == len(clicks) > 0

    def human(k, at, bot):
        m = by_key[k]
        if bot is not None:
            return False
        return not (m.state == "delivered" and abs((_t(at) - _t(m.final_at)).total_seconds()) <= 2.0)

    humans = [cl for cl in clicks if human(cl.outbox_key, cl.at, cl.bot_reason)]
    assert r["clicks_human"] == len(humans) and 0 < len(humans) < len(clicks)  # previews and bots were there
    assert r["unique_clickers"] == len({cl.contact_id for cl in humans})
    # conversions: each revenue order to the latest touch of its phone (any campaign) within 7 days
    touches = [(m.phone_e164, _t(m.final_at), m.campaign_id) for m in all_msgs if m.state == "delivered"]
    touches += [(by_key[cl.outbox_key].phone_e164, _t(cl.at), cid) for cl in humans]
    conv, revenue = 0, 0.0
    for amount, at, phone in orders:
        at = _t(at)
        before = [t for t in touches if t[0] == phone and t[1] <= at and at - t[1] <= timedelta(days=7)]
        if before and max(before, key=lambda t: t[1])[2] == cid:
            conv += 1
            revenue += amount
    assert r["conversions"] == conv > 0 and abs(r["revenue"] - revenue) < 0.01
    cost = sum(m.cost for m in msgs if m.gateway_message_id is not None and m.state != "rejected")
    assert abs(r["cost"] - round(cost, 2)) < 0.01
    assert abs(r["roi"] - round((revenue - r["cost"]) / r["cost"], 4)) < 1e-3
    # replies: to the last message sent to that phone before, within 7 days
    sent = [(m.phone_e164, _t(m.submitted_at)) for m in msgs if m.submitted_at is not None]
    assert r["replies"] == sum(any(p == ph and s <= _t(at) <= s + timedelta(days=7) for p, s in sent)
                               for ph, at in replies) > 0


def test_report_of_an_unknown_campaign_is_one_clear_error(tmp_path):
    res = subprocess.run([SMSFLOW, "report", "--campaign", "nope", "--json"], env=_env(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip() == "error: no campaign named 'nope'"
