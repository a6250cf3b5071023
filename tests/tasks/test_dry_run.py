"""tasks/dry_run.py: the in-process dry run plans exactly what the campaign flow's dry run plans."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from blocks.crm import CsvCrm
from blocks.gateway import SandboxGateway
from smsflow.demo_crm import write_crm_csv
from smsflow.settings import PROJECT_ROOT, reset_settings
from store.db import get_engine
from tasks.dry_run import dry_run_campaign
from tasks.policy import ContactPolicy

TEMPLATE = str(PROJECT_ROOT / "templates" / "demo_promo.yaml")


def _planned(engine, name: str) -> list[tuple]:
    with engine.begin() as c:
        return c.execute(text(
            "SELECT ct.crm_id, o.phone_e164, o.language, o.text, o.encoding, o.segments, o.cost, o.state "
            "FROM outbox o JOIN contacts ct ON ct.id = o.contact_id JOIN campaigns k ON k.id = o.campaign_id "
            "WHERE k.name = :n ORDER BY ct.crm_id"), {"n": name}).all()


def _verdicts(engine, source: str) -> list[tuple]:
    with engine.begin() as c:
        return c.execute(text("SELECT ct.crm_id, ct.status, ct.phone_e164, k.crm_id FROM contacts ct "
                              "LEFT JOIN contacts k ON k.id = ct.duplicate_of WHERE ct.source = :s "
                              "ORDER BY ct.crm_id"), {"s": source}).all()


def test_dry_run_plans_what_the_flow_plans(any_store, tmp_path, monkeypatch, prefect):
    """The same 3,000-row export through the in-process dry run (one source key) and through the campaign
    flow with dry_run (another): the same verdicts, the same messages, the same accounting."""
    from flows.campaign import CampaignParams, campaign

    monkeypatch.setenv("SMSFLOW_DATABASE_URL", any_store)
    reset_settings()
    export = write_crm_csv(tmp_path / "export.csv", 3000, seed=7)
    engine = get_engine(any_store)

    here = CsvCrm(path=str(export), source_name="here")
    got = dry_run_campaign(engine, here, name="preview", template=TEMPLATE, policy=ContactPolicy(),
                           price_per_segment=SandboxGateway().price_per_segment)

    CsvCrm(path=str(export), source_name="flow").save("dry-run-flow", overwrite=True)
    SandboxGateway().save("dry-run-sandbox", overwrite=True)
    want = campaign(CampaignParams(name="via-flow", source_block="dry-run-flow", gateway_block="dry-run-sandbox",
                                   template=TEMPLATE, dry_run=True))

    assert got["summary"] == want["summary"]
    s = got["summary"]
    assert s["contacts"] == 3000 and min(s["quarantined"], s["duplicates"], s["no_consent"], s["planned"]) > 0
    assert _verdicts(engine, "here") == _verdicts(engine, "flow")
    mine, theirs = _planned(engine, "preview"), _planned(engine, "via-flow")
    assert len(mine) == s["planned"] and mine == theirs
    assert {r[-1] for r in mine} == {"planned"}  # nothing sent
    with engine.begin() as c:
        kinds = [r[0] for r in c.execute(text(
            "SELECT e.kind FROM event_log e JOIN campaigns k ON k.id = e.campaign_id WHERE k.name = 'preview' "
            "ORDER BY e.id"))]
        status = c.execute(text("SELECT status FROM campaigns WHERE name = 'preview'")).scalar()
    assert kinds == ["campaign.planned", "campaign.dry_run"] and status == "planned"


def test_dry_run_is_idempotent_and_a_bad_segment_fails_before_reading(engine, tmp_path):
    export = write_crm_csv(tmp_path / "export.csv", 500, seed=3)
    src = CsvCrm(path=str(export), source_name="again")
    first = dry_run_campaign(engine, src, name="twice", template=TEMPLATE, price_per_segment=1.0)
    second = dry_run_campaign(engine, src, name="twice", template=TEMPLATE, price_per_segment=1.0)
    assert second["summary"] == first["summary"] and second["campaign_id"] == first["campaign_id"]
    assert len(_planned(engine, "twice")) == first["summary"]["planned"] > 0
    with pytest.raises(ValueError, match="needs a segments file"):
        dry_run_campaign(engine, CsvCrm(path=str(tmp_path / "missing.csv"), source_name="x"), name="seg",
                         template=TEMPLATE, segment="vip")
