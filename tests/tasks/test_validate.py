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
    # each row points at its contact (found by CRM id in the batch's transaction)
    assert q(engine, "SELECT COUNT(*) FROM quarantine x JOIN contacts c ON c.id = x.contact_id AND c.crm_id = x.row_key "
                     "WHERE x.step = 'validate'") == 3
    reasons = {r: c for r, c in _rows(engine, "SELECT reason_code, COUNT(*) FROM quarantine WHERE step='validate' GROUP BY reason_code")}
    assert reasons == {"not_mobile": 1, "invalid": 1, "missing": 1}
    kept = q(engine, "SELECT id FROM contacts WHERE crm_id='C00004'")
    assert q(engine, "SELECT status FROM contacts WHERE crm_id='C00005'") == "duplicate"
    assert q(engine, "SELECT duplicate_of FROM contacts WHERE crm_id='C00005'") == kept
    assert q(engine, "SELECT phone_e164 FROM contacts WHERE crm_id='C00004'") == "+79161000005"


def test_dedup_follows_the_crm_when_numbers_change(engine, tmp_path):
    """Re-dedup after numbers change: the newest holder keeps a shared number, a duplicate whose number is no
    longer shared becomes valid again, a number no longer shared frees its holders; only the source's
    mergeable contacts count (a quarantined contact with the number changes nothing)."""
    from tasks.dedup import dedup_source

    load_csv(engine, _base(tmp_path, 6))
    ids = {crm: q(engine, "SELECT id FROM contacts WHERE crm_id = :c", c=crm) for crm in ("C00001", "C00002", "C00003")}

    def number(crm, phone, day):
        with engine.begin() as c:
            c.execute(text("UPDATE contacts SET phone_e164 = :p, crm_updated_at = :t WHERE crm_id = :c"),
                      {"p": phone, "t": datetime(2026, 1, day), "c": crm})

    def state():
        return {r[0]: (r[1], r[2]) for r in _rows(engine, "SELECT crm_id, status, duplicate_of FROM contacts "
                                                  "WHERE crm_id IN ('C00001', 'C00002', 'C00003', 'C00004')")}

    for crm, day in (("C00001", 3), ("C00002", 2), ("C00003", 1)):
        number(crm, "+79160000001", day)
    with engine.begin() as c:  # quarantined: not mergeable, whatever its number
        c.execute(text("UPDATE contacts SET status = 'quarantined', phone_e164 = '+79160000001', "
                       "crm_updated_at = :t WHERE crm_id = 'C00004'"), {"t": datetime(2026, 1, 9)})
    assert dedup_source(engine, "test") == 2
    assert state() == {"C00001": ("valid", None), "C00002": ("duplicate", ids["C00001"]),
                       "C00003": ("duplicate", ids["C00001"]), "C00004": ("quarantined", None)}
    number("C00001", "+79160000009", 4)  # the keeper's new number: the next newest keeps the old one
    assert dedup_source(engine, "test") == 1
    assert state()["C00002"] == ("valid", None) and state()["C00003"] == ("duplicate", ids["C00002"])
    assert state()["C00001"] == ("valid", None)
    number("C00002", "+79160000008", 5)  # nobody shares C00003's number now: valid again
    assert dedup_source(engine, "test") == 0
    assert {k: v for k, v in state().items() if k != "C00004"} == {c: ("valid", None) for c in ids}
    assert dedup_source(engine, "test") == 0  # nothing changes twice


def _rows(engine, sql, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).fetchall()


def test_broken_extract_stops_before_anything_is_validated(sqlite_engine, tmp_path):
    path = _base(tmp_path, 20, {i: {"phone": ""} for i in range(18)})  # phone column 90% empty
    with pytest.raises(ExtractCheckFailed, match="failed its checks"):
        load_csv(sqlite_engine, path)
    assert q(sqlite_engine, "SELECT COUNT(*) FROM contacts WHERE status = 'new'") == 20
