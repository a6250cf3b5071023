"""store/quarantine.py and the commands that show it: what was held back, why, phones masked
(SQLite and PostgreSQL), and a campaign whose every message fails to render exits non-zero."""
from __future__ import annotations

import csv
import json

import pytest

from store.db import utcnow
from store import quarantine
from tasks.accounting import ensure_campaign
from tasks.render import plan_messages
from tasks.policy import always_open
from smsflow.templates import MessageTemplate
from tasks.segment import ALL, build_membership
from tests.helpers import contact, load_csv, write_csv


def _campaign(engine, tmp_path, template: MessageTemplate, name="camp"):
    rows = [contact(i) for i in range(10)]
    rows[0]["phone"] = "+7 495 123-45-67"  # a landline
    rows[1]["phone"] = "не номер"
    rows[5]["id"] = rows[6]["id"]  # the same CRM id twice
    load_csv(engine, write_csv(tmp_path / "crm.csv", rows))
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name=name, source="test", segment="all", template_name=template.name,
                          kind=template.kind, gateway="sandbox", price_per_segment=1.0,
                          policy=always_open().model_dump(mode="json"))
    return plan_messages(engine, campaign_id=cid, source="test", segment="all", template=template,
                         price_per_segment=1.0, gateway="sandbox")


def test_summary_counts_every_reason_with_one_masked_example(engine, tmp_path):
    tpl = MessageTemplate(name="t", variants={"ru": "{{ first_name }} {{ nope.x }}", "en": "Hi {{ first_name }}"})
    stats = _campaign(engine, tmp_path, tpl)
    groups = {(g["step"], g["reason_code"]): g for g in quarantine.summary(engine, campaign="camp")}
    assert {k: g["count"] for k, g in groups.items()} == {
        ("extract", "duplicate_crm_id"): 1, ("validate", "not_mobile"): 1, ("validate", "invalid"): 1,
        ("render", "render_error"): stats.render_failed}
    assert stats.render_failed > 0 and stats.planned > 0
    ex = groups[("render", "render_error")]["example"]
    assert "'nope' is undefined" in ex["reason"] and ex["campaign"] == "camp"
    assert ex["phone"].startswith("+7916***") and len(ex["phone"]) == len("+7916***0002")
    assert groups[("validate", "not_mobile")]["example"]["crm_id"] == "C00000"
    lines = quarantine.summary_lines(list(groups.values()))
    assert len(lines) == 4 and not any("+7916100" in line for line in lines)  # never a full number

    only_render = list(quarantine.held_back(engine, campaign="camp", step="render"))
    assert len(only_render) == stats.render_failed and {r.step for r in only_render} == {"render"}
    out = tmp_path / "q.csv"
    assert quarantine.write_csv(quarantine.held_back(engine, campaign="camp"), out) == 3 + stats.render_failed
    with open(out, encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == list(quarantine.CSV_FIELDS)
    assert all("***" in r["phone"] for r in got)
    with pytest.raises(quarantine.UnknownCampaign):
        quarantine.summary(engine, campaign="nope")
    with pytest.raises(ValueError, match="unknown step"):
        quarantine.summary(engine, step="send")


@pytest.mark.usefixtures("prefect")
def test_cli_campaign_that_renders_nothing_exits_non_zero_and_says_why(tmp_path):
    from typer.testing import CliRunner

    from smsflow.cli import app

    rows = [contact(i) for i in range(6)]
    rows[0]["phone"] = "12"
    src = write_csv(tmp_path / "crm.csv", rows)
    tpl = tmp_path / "broken.j2"
    tpl.write_text("{{ first_name }}: {{ ''.__class__.__mro__ }}", encoding="utf-8")  # blocked by the sandbox
    qout = tmp_path / "held.csv"
    res = CliRunner().invoke(app, ["campaign", "--source", str(src), "--template", str(tpl), "--dry-run",
                                   "--quarantine-out", str(qout)])
    assert res.exit_code == 1, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # the JSON contract holds on failure too
    assert summary["planned"] == 0
    assert "campaign: crm-broken" in res.stderr and "held back: 6 rows" in res.stderr
    assert "render_error" in res.stderr and "error: no message could be rendered (5 failed)" in res.stderr
    with open(qout, encoding="utf-8") as f:
        held = list(csv.DictReader(f))
    assert sorted(r["step"] for r in held) == ["render"] * 5 + ["validate"]

    listed = CliRunner().invoke(app, ["quarantine", "--campaign", "crm-broken", "--step", "render", "--limit", "2"])
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0] == "held back: 5 rows in campaign crm-broken, step render"
    assert sum(line.startswith("render\trender_error\tC0000") for line in lines) == 2
    assert lines[-1] == "... 3 more (--limit, or --out FILE for all)"
    assert "+7916100" not in listed.stdout
    bad = CliRunner().invoke(app, ["quarantine", "--campaign", "no-such"])
    assert bad.exit_code == 2 and "no campaign named 'no-such'" in bad.stderr
