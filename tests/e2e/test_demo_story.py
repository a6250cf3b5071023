"""`smsflow demo` tells the whole story, and `smsflow report --json` (an exact contract) adds up: every
number is recomputed here independently from the store (plain loops over raw rows, not tasks/metrics)."""
from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`smsflow demo` as a user runs it, once for this module: (data dir's parent, env, campaign, stdout)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    env = _env(tmp_path)
    res = subprocess.run([SMSFLOW, "demo", "--contacts", "800", "--wait", "5"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    name = re.search(r"campaign (demo-\S+):", res.stdout).group(1)
    return tmp_path, env, name, res.stdout


def test_the_demo_shows_the_whole_funnel_and_the_report_adds_up(demo):
    tmp_path, env, name, out = demo
    assert "earned:" in out and "ROI" in out
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


def test_the_demo_report_draws_its_charts_in_a_real_browser_offline(demo):
    """Debian's Chromium (headless, driven by Playwright) opens the demo's HTML report with every network
    request refused: the charts draw (Plotly's SVGs exist), no console error; screenshots of a laptop and a
    phone view are kept in artifacts/ (the CI artifact)."""
    import shutil

    tmp_path, _env_, name, out = demo
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required under CI (scripts/browser.sh installs it)")
        pytest.skip("chromium not installed (bash scripts/browser.sh)")
    from playwright.sync_api import sync_playwright

    page_path = Path(re.search(r"^report: (.+)$", out, re.M).group(1))
    assert page_path.is_file()
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    errors: list[str] = []
    refused: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            for label, viewport in (("laptop", {"width": 1366, "height": 900}), ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                           else (refused.append(route.request.url), route.abort()))
                page.goto(page_path.as_uri())
                page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4",
                                       timeout=30_000)
                charts = page.eval_on_selector_all(".js-plotly-plot", "els => els.map(e => e.id)")
                assert {"funnel", "over-time", "cost-revenue", "segments"} <= set(charts), charts
                # the funnel drew its four stages, the time chart its lines
                assert page.eval_on_selector_all("#funnel .trace.bars .point", "els => els.length") == 4
                assert page.eval_on_selector_all("#over-time .scatterlayer .trace", "els => els.length") >= 2
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"] + 1, f"{label}: the page scrolls sideways ({width}px)"
                page.screenshot(path=str(artifacts / f"report-demo-{label}.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    assert not errors, errors
    assert not refused, f"the page asked the network for {refused}"
    assert (artifacts / "report-demo-laptop.png").stat().st_size > 20_000


def test_the_ab_demo_runs_end_to_end_with_a_holdout_and_its_numbers_add_up(tmp_path):
    """`smsflow demo --ab`: test share, holdout, a decision a day later, the winner to the rest. The test's
    arm counts are recomputed from raw rows; the report's fixed-horizon numbers equal `smsflow ab-stats`
    on those counts; the page draws the A/B chart offline."""
    import shutil

    env = _env(tmp_path)
    res = subprocess.run([SMSFLOW, "demo", "--ab", "--contacts", "2000", "--wait", "3"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    name = re.search(r"campaign (demo-ab-\S+):", res.stdout).group(1)
    assert "decision a day later:" in res.stdout and "against the holdout" in res.stdout
    rep = json.loads(subprocess.run([SMSFLOW, "report", "--campaign", name, "--json"], env=env, capture_output=True,
                                    text=True, timeout=300).stdout)
    ab = rep["ab"]
    assert ab["phase"] == "rolled_out" and ab["winner"] in ("A", "B") and ab["held_out"] > 0
    engine = get_engine(f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}")
    with engine.connect() as c:
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar_one()
        msgs = c.execute(text("SELECT idempotency_key, contact_id, variant, step, submitted_at FROM outbox "
                              "WHERE campaign_id = :c"), {"c": cid}).all()
        held = {r[0] for r in c.execute(text("SELECT contact_id FROM ab_members WHERE campaign_id = :c"), {"c": cid})}
        clicks = c.execute(text("SELECT l.outbox_key, k.bot_reason, k.at, o.final_at FROM clicks k JOIN short_links l "
                                "ON l.code = k.code JOIN outbox o ON o.idempotency_key = l.outbox_key "
                                "WHERE l.campaign_id = :c AND o.state = 'delivered'"), {"c": cid}).all()
    assert len(msgs) == len({m[1] for m in msgs}) and not held & {m[1] for m in msgs}  # one per contact
    assert {m[2] for m in msgs if m[3] == "ab-rollout"} == {ab["winner"]}
    clicked = {k for k, bot, at, fin in clicks if bot is None and (_t(at) - _t(fin)).total_seconds() > 2}
    for arm in ("A", "B"):
        sent = [m for m in msgs if m[2] == arm and m[3] == "ab-test" and m[4] is not None]
        assert ab["arms"][arm]["sent"] == len(sent)
        assert ab["arms"][arm]["events"] == sum(1 for m in sent if m[0] in clicked)
    a, b = ab["arms"]["A"], ab["arms"]["B"]
    cli = json.loads(subprocess.run([SMSFLOW, "ab-stats", "--variant", f"A={a['sent']}:{a['events']}", "--variant",
                                     f"B={b['sent']}:{b['events']}", "--split", "A=0.5,B=0.5"], env=env,
                                    capture_output=True, text=True, timeout=120).stdout)
    assert cli["variants"]["B"] == ab["fixed_horizon"]["variants"]["B"]
    assert cli["srm_p_value"] == ab["fixed_horizon"]["srm_p_value"]
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required under CI (scripts/browser.sh installs it)")
        pytest.skip("chromium not installed (bash scripts/browser.sh)")
    from playwright.sync_api import sync_playwright

    page_path = Path(re.search(r"^report: (.+)$", res.stdout, re.M).group(1))
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                       else route.abort())
            page.goto(page_path.as_uri())
            page.wait_for_function(f"document.querySelectorAll('[id=\"ab-{name}\"] .main-svg').length >= 1",
                                   timeout=30_000)
            assert page.eval_on_selector_all(f'[id="ab-{name}"] .trace.bars .point', "els => els.length") == 2
            assert "A/B tests" in page.content()
            artifacts = REPO / "artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "report-demo-ab.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
