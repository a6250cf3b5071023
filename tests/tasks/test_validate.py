"""tasks/validate.py: validate and dedup against the store (plain functions, no Prefect)."""
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


def test_validate_quarantines_with_reason_and_merges_duplicates(engine, tmp_path):
    path = _base(tmp_path, 10, {
        1: {"phone": "+7 495 123-45-67"},  # Moscow landline
        2: {"phone": "abc"},
        3: {"phone": ""},
        4: {"phone": "8 (916) 100-00-05", "updated_at": "2026-03-01T00:00:00Z"},  # same number as row 5, newer
        5: {"phone": "+79161000005", "updated_at": "2026-01-01T00:00:00Z"},
    })
    _, stats = load_csv(engine, path)
    assert stats.checked == 10
    assert stats.quarantined == 3
    assert stats.duplicates == 1
    assert q(engine, "SELECT COUNT(*) FROM quarantine WHERE step='validate'") == 3
    reasons = {r: c for r, c in _rows(engine, "SELECT reason_code, COUNT(*) FROM quarantine WHERE step='validate' GROUP BY reason_code")}
    assert reasons == {"not_mobile": 1, "invalid": 1, "missing": 1}
    kept = q(engine, "SELECT id FROM contacts WHERE crm_id='C00004'")
    assert q(engine, "SELECT status FROM contacts WHERE crm_id='C00005'") == "duplicate"
    assert q(engine, "SELECT duplicate_of FROM contacts WHERE crm_id='C00005'") == kept
    assert q(engine, "SELECT phone_e164 FROM contacts WHERE crm_id='C00004'") == "+79161000005"


def _rows(engine, sql, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).fetchall()


def test_broken_extract_stops_before_anything_is_validated(sqlite_engine, tmp_path):
    path = _base(tmp_path, 20, {i: {"phone": ""} for i in range(18)})  # phone column 90% empty
    with pytest.raises(ExtractCheckFailed, match="failed its checks"):
        load_csv(sqlite_engine, path)
    assert q(sqlite_engine, "SELECT COUNT(*) FROM contacts WHERE status = 'new'") == 20
