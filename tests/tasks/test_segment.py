"""tasks/segment.py: rules and memberships."""
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


def test_segment_rules():
    import pandas as pd

    now = datetime(2026, 11, 25)
    df = pd.DataFrame({
        "id": [1, 2, 3, 4],
        "language": ["ru", "en", "ru", "ru"],
        "funnel_stage": ["customer", "customer", "lead", "customer"],
        "city": ["Москва", "London", None, "Казань"],
        "last_activity_at": ["2026-11-20", "2026-01-01", "2026-11-24", None],
        "orders_count": [10, 1, 0, 5],
        "total_spent": [50000, 100, 0, 20000],
        "last_order_at": ["2026-11-01", "2025-01-01", None, "2026-10-01"],
    })
    seg = SegmentDefinition(name="s", filters=[AttributeFilter(field="language", op="eq", value="ru")],
                            funnel_stages=["customer"])
    assert evaluate(df, seg, now)[0].tolist() == [True, False, False, True]
    act = SegmentDefinition(name="a", days_since_last_activity=Range(max=30))
    assert evaluate(df, act, now)[0].tolist() == [True, False, True, False]
    num = SegmentDefinition(name="n", filters=[AttributeFilter(field="total_spent", op="gte", value=20000)])
    assert evaluate(df, num, now)[0].tolist() == [True, False, False, True]
    rfm = SegmentDefinition(name="r", rfm=RfmRule(min_total=13))  # row 3 scores 4+4+4
    mask, score = evaluate(df, rfm, now)
    assert mask.tolist() == [True, False, False, False]
    assert score.tolist()[0] == "555"
    missing = SegmentDefinition(name="m", filters=[AttributeFilter(field="city", op="missing")])
    assert evaluate(df, missing, now)[0].tolist() == [False, False, True, False]


def test_segment_membership_written(engine, tmp_path):
    path = _base(tmp_path, 12, {i: {"language": "en"} for i in range(4)})
    load_csv(engine, path)
    seg = SegmentDefinition(name="english", filters=[AttributeFilter(field="language", value="en")])
    assert build_membership(engine, "test", seg, utcnow()) == 4 + sum(1 for i in range(4, 12) if i % 4 == 3)
    assert build_membership(engine, "test", ALL, utcnow()) == 12
    assert q(engine, "SELECT size FROM segments WHERE name='all'") == 12
