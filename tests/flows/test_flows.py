"""Flows under one session-scoped prefect_test_harness; the demo campaign end to end."""
from __future__ import annotations

import json
import sqlite3

import pytest
from sqlalchemy import text

from blocks.crm import CsvCrm, SqlCrm
from blocks.gateway import SandboxGateway
from smsflow.settings import PROJECT_ROOT, get_settings
from store.db import get_engine
from tests.helpers import DAYTIME, contact, write_csv

pytestmark = pytest.mark.usefixtures("prefect")


def _scalar(engine, sql, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).scalar()


def test_demo_campaign_accounts_for_every_contact(tmp_path):
    """2,000 demo contacts: each is sent, quarantined with a reason, merged as a duplicate,
    or excluded by consent; exactly once."""
    from flows.campaign import CampaignParams, campaign
    from smsflow.demo_crm import write_crm_sqlite

    crm = write_crm_sqlite(tmp_path / "crm.sqlite", 2000, seed=11)
    SqlCrm(url=f"sqlite:///{crm}", source_name="demo-e2e").save("demo-e2e", overwrite=True)
    SandboxGateway(min_delay_s=0.0, max_delay_s=0.5, state_path=str(tmp_path / "gw.sqlite")).save("sandbox-e2e", overwrite=True)
    result = campaign(CampaignParams(name="e2e", source_block="demo-e2e", gateway_block="sandbox-e2e",
                                     template=str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), wait_for_receipts_s=30,
                                     now=DAYTIME))
    s = result["summary"]
    assert s["contacts"] == 2000
    assert s["quarantined"] + s["duplicates"] + s["no_consent"] + s["planned"] == 2000
    assert min(s["quarantined"], s["duplicates"], s["no_consent"], s["planned"]) > 0  # the demo data exercises every path
    assert sum(s["outcomes"].values()) == s["planned"]  # every planned message ends in exactly one bucket
    assert s["outcomes"]["rejected"] > 0 and s["outcomes"]["delivered"] > 0  # the sandbox rejects some
    assert s["cost_spent"] < s["cost_planned"] and s["currency"] == "RUB"

    engine = get_engine()
    db = sqlite3.connect(crm)
    crm_ids = {r[0] for r in db.execute("SELECT id FROM contacts")}
    db.close()
    with engine.begin() as c:
        planned = {r[0] for r in c.execute(text(
            "SELECT ct.crm_id FROM outbox o JOIN contacts ct ON ct.id = o.contact_id JOIN campaigns k ON k.id = o.campaign_id "
            "WHERE k.name = 'e2e'"))}
        quarantined = {r[0] for r in c.execute(text(
            "SELECT crm_id FROM contacts WHERE source='demo-e2e' AND status='quarantined'"))}
        quarantine_reasons = dict(c.execute(text(
            "SELECT row_key, reason FROM quarantine WHERE source='demo-e2e' AND step='validate'")).fetchall())
        dups = {r[0] for r in c.execute(text("SELECT crm_id FROM contacts WHERE source='demo-e2e' AND status='duplicate'"))}
        no_consent = {r[0] for r in c.execute(text(
            "SELECT crm_id FROM contacts WHERE source='demo-e2e' AND status='valid' AND NOT sms_consent"))}
        states = dict(c.execute(text("SELECT state, COUNT(*) FROM outbox GROUP BY state")).fetchall())
        deferred = c.execute(text("SELECT ct.timezone, o.send_after, o.hold_rule FROM outbox o "
                                  "JOIN contacts ct ON ct.id = o.contact_id WHERE o.state = 'planned'")).fetchall()
    groups = [planned, quarantined, dups, no_consent]
    assert sum(map(len, groups)) == 2000
    assert set().union(*groups) == crm_ids  # every CRM contact, once
    assert all(quarantine_reasons.get(i) for i in quarantined)  # each with a reason
    assert len(planned) == s["planned"] and len(quarantined) == s["quarantined"] and len(dups) == s["duplicates"]
    # nothing is left in flight: every message is final, or deferred to its recipient's send window
    assert states.get("queued", 0) == 0 and states.get("submitted", 0) == 0
    from tasks.policy import ContactPolicy, allowed_now, resolve_timezone

    window = ContactPolicy().marketing_window
    assert len(deferred) == states.get("planned", 0)
    for tz, send_after, rule in deferred:  # deferred only where 12:00 Moscow is outside the local window
        zone, _ = resolve_timezone(tz, None, "Europe/Moscow")
        assert not allowed_now(DAYTIME, zone, window, "RU") and send_after is not None and rule == "quiet_hours"
    assert states.get("delivered", 0) > 0.5 * s["planned"]
    counts = SandboxGateway(state_path=str(tmp_path / "gw.sqlite")).sent_count_by_reference()
    assert set(counts.values()) == {1}
    assert result["report"].endswith(".html")


def test_rerun_of_a_campaign_sends_nothing_twice(tmp_path):
    from flows.campaign import CampaignParams, campaign

    rows = [contact(i) for i in range(60)]
    path = write_csv(tmp_path / "crm.csv", rows)
    CsvCrm(path=str(path), source_name="rerun").save("rerun-src", overwrite=True)
    gw_path = str(tmp_path / "gw.sqlite")
    SandboxGateway(min_delay_s=0, max_delay_s=0, state_path=gw_path, rejected_rate=0).save("gw-rerun", overwrite=True)
    params = CampaignParams(name="rerun", source_block="rerun-src", gateway_block="gw-rerun",
                            template=str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), wait_for_receipts_s=5, now=DAYTIME)
    first = campaign(params)
    second = campaign(params)
    assert first["send"]["submitted"] == 60
    assert second["send"]["submitted"] == 0
    assert second["summary"]["planned"] == 60
    counts = SandboxGateway(state_path=gw_path).sent_count_by_reference()
    assert len(counts) == 60 and set(counts.values()) == {1}


def test_each_step_flow_runs_alone(tmp_path):
    from flows.crm_extract import crm_extract
    from flows.reconcile import reconcile
    from flows.render import render
    from flows.report import report
    from flows.segment import segment
    from flows.send import send
    from flows.validate_and_dedup import validate_and_dedup

    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(15)] + [contact(99, phone="garbage")])
    CsvCrm(path=str(path), source_name="alone").save("alone", overwrite=True)
    SandboxGateway(min_delay_s=0, max_delay_s=0, state_path=str(tmp_path / "gw.sqlite")).save("gw-alone", overwrite=True)
    assert crm_extract("alone")["rows"] == 16
    v = validate_and_dedup("alone")
    assert v["valid"] == 15 and v["quarantined"] == 1
    segs = tmp_path / "segments.yaml"
    segs.write_text("- name: english\n  filters: [{field: language, value: en}]\n", encoding="utf-8")
    assert segment("alone", "english", str(segs))["members"] == 3  # C00003, C00007, C00011 (C00099 has no valid phone)
    r = render("alone-camp", str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), "alone", "english", 1.0, "gw-alone")
    assert r["planned"] == 3
    sent = send("alone-camp", "gw-alone", now=DAYTIME)
    assert sent["submitted"] + sent["rejected"] == 3
    rec = reconcile("gw-alone", "alone-camp", wait_seconds=5)
    assert sum(rec["by_status"].values()) == sent["submitted"]
    rep = report("alone-camp")
    assert rep["rows"][0]["planned"] == 3
    with open(rep["html"], encoding="utf-8") as f:
        assert "alone-camp" in f.read()
    with pytest.raises(ValueError, match="not defined"):
        segment("alone", "nope", str(segs))


def test_broken_template_stops_before_anything_is_planned(tmp_path):
    from flows.render import render
    from smsflow.templates import TemplateError

    bad = tmp_path / "bad.j2"
    bad.write_text("Привет, {{ first_name ", encoding="utf-8")
    with pytest.raises(TemplateError, match="bad"):
        render("bad-camp", str(bad), "nosource")
    assert _scalar(get_engine(), "SELECT COUNT(*) FROM outbox") == 0


def test_cli_campaign_dry_run_prints_the_accounting(tmp_path):
    from typer.testing import CliRunner

    from smsflow.cli import app

    rows = [contact(i) for i in range(30)]
    rows[0]["phone"] = "+7 495 123-45-67"
    rows[1]["sms_consent"] = "0"
    rows[2]["phone"] = rows[3]["phone"]
    rows[2]["updated_at"] = "2020-01-01T00:00:00Z"
    csv_path = write_csv(tmp_path / "in.csv", rows)
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ first_name | default('клиент') }}, у нас новинки!", encoding="utf-8")
    res = CliRunner().invoke(app, ["campaign", "--source-csv", str(csv_path), "--template", str(tpl), "--dry-run"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out) == {"contacts", "quarantined", "duplicates", "no_consent", "planned", "parts", "cost_planned",
                        "currency"}
    assert out["contacts"] == 30
    assert (out["quarantined"], out["duplicates"], out["no_consent"], out["planned"]) == (1, 1, 1, 27)
    assert out["parts"] >= 27 and out["cost_planned"] == pytest.approx(out["parts"] * SandboxGateway().price_per_segment)
    assert out["currency"] == SandboxGateway().currency == "RUB"
    assert f"messages: 27 planned, {out['parts']} parts, planned cost" in res.stderr
    assert _scalar(get_engine(), "SELECT COUNT(*) FROM outbox WHERE state <> 'planned'") == 0  # nothing sent
    assert not (get_settings().data_dir / "sandbox_gateway.sqlite").exists() or \
        SandboxGateway().sent_count_by_reference() == {}


def test_logs_never_contain_a_full_phone_number(tmp_path):
    """Run a campaign (with a bad number in it) and read every log line the flows emitted."""
    import logging
    import re

    from flows.campaign import CampaignParams, campaign

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("prefect", "prefect.flow_runs", "prefect.task_runs")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    loggers[0].addHandler(handler)
    try:
        rows = [contact(i) for i in range(20)] + [contact(50, phone="+7 916 12")]
        path = write_csv(tmp_path / "crm.csv", rows)
        CsvCrm(path=str(path), source_name="logs").save("logs-src", overwrite=True)
        SandboxGateway(min_delay_s=0, max_delay_s=0, state_path=str(tmp_path / "gw.sqlite")).save("gw-logs", overwrite=True)
        state = campaign(CampaignParams(name="logs", source_block="logs-src", gateway_block="gw-logs", wait_for_receipts_s=3,
                                        template=str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), now=DAYTIME),
                         return_state=True)
    finally:
        loggers[0].removeHandler(handler)
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)
    assert state.is_completed()
    joined = "\n".join(records)
    assert "send logs via gw-logs" in joined  # the flows did log
    assert not re.search(r"\+?7\s?9\d{2}\D?\d{3}\D?\d{2}\D?\d{2}", joined)
    with get_engine().begin() as c:
        kinds = {r[0] for r in c.execute(text("SELECT kind FROM event_log"))}
    assert {"campaign.planned", "campaign.sent"} <= kinds


def test_cli_gateway_save_stores_secrets_as_secrets():
    from typer.testing import CliRunner

    from blocks.registry import load_gateway
    from smsflow.cli import app

    res = CliRunner().invoke(app, ["gateway", "save", "tw-test", "--kind", "http", "--url", "https://api.example",
                                   "--username", "AC123", "--password", "p4ss-w0rd", "--rate", "25"])
    assert res.exit_code == 0, res.output
    assert "p4ss-w0rd" not in res.output
    gw = load_gateway("tw-test")
    assert gw.rate_per_second == 25 and gw.auth_token.get_secret_value() == "p4ss-w0rd"
    assert "p4ss-w0rd" not in repr(gw)
    bad = CliRunner().invoke(app, ["gateway", "save", "x", "--kind", "pigeon"])
    assert bad.exit_code != 0


def test_cli_dry_run_plan_out_follows_local_time(tmp_path):
    import csv as csv_mod

    from typer.testing import CliRunner

    from smsflow.cli import app

    rows = [contact(i) for i in range(6)]
    rows[1]["timezone"] = "Asia/Kamchatka"
    rows[2]["timezone"] = "Europe/Kaliningrad"
    rows[3]["sms_consent"] = "no"
    rows[4]["phone"] = "+7 423 212-34-56"  # Vladivostok landline: not a mobile -> quarantined, not in the plan
    rows[5]["timezone"] = ""  # mobile number, many zones -> the default (Moscow)
    csv_path = write_csv(tmp_path / "in.csv", rows)
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ first_name | default('клиент') }}, скидки!", encoding="utf-8")
    plan = tmp_path / "plan.csv"
    res = CliRunner().invoke(app, ["campaign", "--source-csv", str(csv_path), "--template", str(tpl), "--dry-run",
                                   "--now", "2026-11-24T20:30:00Z", "--plan-out", str(plan)])
    assert res.exit_code == 0, res.output
    with open(plan, encoding="utf-8") as f:
        got = {r["contact_id"]: r for r in csv_mod.DictReader(f)}
    assert list(next(iter(got.values())).keys()) == ["contact_id", "phone", "timezone", "send_at_local",
                                                     "send_at_utc", "rule", "text", "parts", "cost", "currency"]
    assert got["C00000"]["phone"] == "+7916***0000" and "скидки!" in got["C00000"]["text"]
    assert int(got["C00000"]["parts"]) >= 1 and float(got["C00000"]["cost"]) == int(got["C00000"]["parts"]) * 2.5
    assert got["C00003"]["text"] == "" and got["C00000"]["currency"] == "RUB"
    assert set(got) == {"C00000", "C00001", "C00002", "C00003", "C00005"}
    assert got["C00000"]["send_at_local"] == "2026-11-25T10:00:00+03:00" and got["C00000"]["rule"] == "quiet_hours"
    assert got["C00000"]["send_at_utc"] == "2026-11-25T07:00:00+00:00"
    assert got["C00001"]["send_at_local"] == "2026-11-25T10:00:00+12:00"  # Kamchatka: 08:30 local now
    assert got["C00002"]["send_at_utc"] == "2026-11-25T08:00:00+00:00"  # Kaliningrad UTC+2
    assert got["C00003"]["rule"] == "no_consent" and got["C00003"]["send_at_utc"] == ""
    assert got["C00005"]["timezone"] == "Europe/Moscow"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["planned"] == 4 and out["no_consent"] == 1 and out["quarantined"] == 1


@pytest.mark.parametrize("kind", ["cp1251-semicolon", "utf16-tab", "xlsx"])
def test_cli_campaign_reads_the_exports_people_have(tmp_path, kind):
    """Russian Excel/1C exports: cp1251 + ';', Excel's UTF-16 + tab, XLSX; columns named in Russian
    and mapped on the command line; the detected format is said; no csv-* Block is left behind."""
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from smsflow.cli import app
    from tests.helpers import HEADER

    rows = [contact(i) for i in range(12)]
    header = ["Телефон" if h == "phone" else "Код" if h == "id" else h for h in HEADER]
    table = [header, *[[r[h] for h in HEADER] for r in rows]]
    if kind == "xlsx":
        from openpyxl import Workbook

        wb = Workbook()
        for line in table:
            wb.active.append(line)
        path = tmp_path / "выгрузка.xlsx"
        wb.save(path)
    else:
        enc, sep = {"cp1251-semicolon": ("cp1251", ";"), "utf16-tab": ("utf-16", "\t")}[kind]
        path = tmp_path / "выгрузка.csv"
        path.write_bytes("".join(sep.join(line) + "\r\n" for line in table).encode(enc))
    tpl = tmp_path / "t.j2"
    tpl.write_text("{{ first_name }}, у нас новинки в городе {{ city }}!", encoding="utf-8")
    args = ["campaign", "--source", str(path), "--template", str(tpl), "--dry-run", "--now", DAYTIME.isoformat()]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Телефон" in res.stderr and "--phone-column" in res.stderr, res.output
    res = CliRunner().invoke(app, [*args, "--phone-column", "Телефон", "--column", "id=Код"])
    assert res.exit_code == 0, res.output
    said = {"cp1251-semicolon": "CSV, encoding cp1251 (detected), delimiter ';' (detected)",
            "utf16-tab": "CSV, encoding utf-16 (detected), delimiter tab (detected)", "xlsx": "XLSX, first sheet"}[kind]
    assert f"reading {path.name}: {said}" in res.stderr
    assert "extract   12 CRM rows read" in res.stderr and "render    12 planned" in res.stderr  # progress per step
    assert "campaign: выгрузка-t (rerun with --name выгрузка-t" in res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["contacts"] == 12 and out["planned"] == 12
    texts = [t for (t,) in get_engine().connect().execute(text(
        "SELECT o.text FROM outbox o JOIN campaigns k ON k.id = o.campaign_id WHERE k.name = 'выгрузка-t'"))]
    assert len(texts) == 12 and sum("Анна, у нас новинки в городе Москва!" in t for t in texts) == 3
    with get_client(sync_client=True) as client:
        left = [b.name for b in client.read_block_documents() if (b.name or "").startswith("csv-")]
    assert left == []


def test_deferred_messages_go_out_when_their_window_opens(tmp_path):
    """Planned at 23:30 Moscow: nothing sent; the scheduled 'send due' run at 10:00 sends them."""
    from datetime import datetime, timezone

    from flows.campaign import CampaignParams, campaign
    from flows.send import send

    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(8)])
    CsvCrm(path=str(path), source_name="night").save("night-src", overwrite=True)
    gw_path = str(tmp_path / "gw.sqlite")
    SandboxGateway(min_delay_s=0, max_delay_s=0, state_path=gw_path, rejected_rate=0).save("gw-night", overwrite=True)
    night = datetime(2026, 11, 24, 20, 30, tzinfo=timezone.utc)
    first = campaign(CampaignParams(name="night", source_block="night-src", gateway_block="gw-night", wait_for_receipts_s=0,
                                    template=str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), now=night))
    assert first["send"]["submitted"] == 0 and first["send"]["held"] == {"quiet_hours": 8}
    assert send(None, "sandbox", now=night)["campaigns"] == {}  # nothing due yet
    due = send(None, "sandbox", now=datetime(2026, 11, 25, 7, 0, tzinfo=timezone.utc))
    assert due["campaigns"]["night"]["submitted"] == 8  # through the campaign's own gateway block
    assert len(SandboxGateway(state_path=gw_path).sent_count_by_reference()) == 8


def test_due_sender_recovers_messages_left_in_doubt(tmp_path):
    """A campaign whose only unsent messages are 'queued' with an expired claim (in doubt, or left by a
    crashed sender) is picked up by the scheduled 'send due' run: its recovery settles them."""
    from datetime import datetime, timezone

    from sqlalchemy import text

    from flows.campaign import CampaignParams, campaign
    from flows.send import send
    from store.db import get_engine

    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(5)])
    CsvCrm(path=str(path), source_name="doubt").save("doubt-src", overwrite=True)
    gw_path = str(tmp_path / "gw.sqlite")
    SandboxGateway(min_delay_s=0, max_delay_s=0, state_path=gw_path, rejected_rate=0).save("gw-doubt", overwrite=True)
    day = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
    campaign(CampaignParams(name="doubt", source_block="doubt-src", gateway_block="gw-doubt", wait_for_receipts_s=0,
                            template=str(PROJECT_ROOT / "templates" / "demo_promo.yaml"), now=day, dry_run=True))
    engine = get_engine()
    with engine.begin() as c:  # as if a sender claimed them and died before any answer
        c.execute(text("UPDATE outbox SET state = 'queued', claimed_by = 'dead', queued_at = :t, "
                       "claim_expires_at = :t, attempts = 1"), {"t": datetime(2026, 11, 25, 8, 0)})
    due = send(None, "sandbox", now=day)
    assert due["campaigns"]["doubt"]["recovered_replanned"] == 5 and due["campaigns"]["doubt"]["submitted"] == 5
    assert len(SandboxGateway(state_path=gw_path).sent_count_by_reference()) == 5


def test_the_extract_flow_reads_the_crms_orders_too(tmp_path):
    """The hourly extract deployment brings orders/deals with the contacts (conversions need them)."""
    from flows.crm_extract import crm_extract

    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(4)])
    orders = tmp_path / "orders.csv"
    orders.write_text("order_id,contact_id,amount,status,ordered_at\nO1,C00001,990,paid,2026-03-03 10:00:00\n"
                      "O2,C00002,150,cancelled,2026-03-03 11:00:00\n", encoding="utf-8")
    CsvCrm(path=str(path), source_name="with-orders", orders_path=str(orders)).save("with-orders", overwrite=True)
    out = crm_extract("with-orders")
    assert out["rows"] == 4 and out["orders"] == {"rows": 2, "stored": 2, "quarantined": 0}
    CsvCrm(path=str(path), source_name="no-orders").save("no-orders", overwrite=True)
    assert "orders" not in crm_extract("no-orders")
