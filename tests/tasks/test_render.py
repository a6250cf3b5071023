"""tasks/render.py: templates over a segment into planned outbox messages."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from blocks.gateway import SandboxGateway, SubmitResult
from store.db import utcnow
from tasks.accounting import campaign_accounting, ensure_campaign
from tasks.render import plan_messages
from tasks.policy import always_open
from tasks.reconcile import apply_receipts, expire_stale, store_receipts
from smsflow.templates import MessageTemplate
from tasks.segment import ALL, AttributeFilter, Range, RfmRule, SegmentDefinition, build_membership, evaluate
from smsflow.ratelimit import TokenBucket
from tasks.send import claim, recover_in_flight, send_messages
from tasks.validate import ExtractCheckFailed, validate_new_contacts
from tests.helpers import contact, load_csv, write_csv
from tests.pipeline import TPL, _base, _gw, _planned, _submitted, q  # noqa: F401


def test_plan_renders_skips_no_consent_and_quarantines_failures(engine, tmp_path):
    tpl = MessageTemplate(name="t", variants={"ru": "Привет, {{ first_name }}! Баллы: {{ orders_count }}"})
    cid, stats = _planned(engine, tmp_path, 20, template=tpl,
                          over={0: {"sms_consent": "false"}, 1: {"sms_consent": "нет"}, 2: {"first_name": ""}})
    assert stats.no_consent == 2
    assert stats.render_failed == 1
    assert stats.planned == 17
    assert q(engine, "SELECT reason FROM quarantine WHERE step='render'").count("first_name") == 1
    text_ = q(engine, "SELECT text FROM outbox o JOIN contacts c ON c.id=o.contact_id WHERE c.crm_id='C00004'")
    assert text_.startswith("Привет, Анна!") and "СТОП" in text_
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE encoding='UCS-2' AND segments >= 1 AND cost = segments * 2.0") == 17
    acc = campaign_accounting(engine, cid)
    assert acc == {"contacts": 20, "quarantined": 1, "duplicates": 0, "no_consent": 2, "planned": 17,
                   "parts": acc["parts"], "cost_planned": acc["cost_planned"], "currency": "RUB"}
    assert acc["parts"] >= 17 and acc["cost_planned"] == pytest.approx(acc["parts"] * 2.0)


def test_plan_rerun_creates_nothing_twice(engine, tmp_path):
    cid, first = _planned(engine, tmp_path, 25)
    again = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=2.0,
                          gateway="sandbox")
    assert first.planned == 25 and again.planned == 0
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 25
