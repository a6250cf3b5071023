"""tasks/report.py and smsflow/privacy.py masking."""
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


def test_report_counts_and_html(engine, tmp_path):
    from tasks.report import collect
    from tasks.report_page import write_html

    cid, gw = _submitted(engine, tmp_path, 20, undelivered_rate=0.5)
    store_receipts(engine, "sandbox", gw.fetch_receipts())
    apply_receipts(engine)
    from tasks.outcomes import OUTCOMES, message_outcomes

    rep = collect(engine, "camp")
    row = rep.rows[0]
    assert row["planned"] == 20 and row["sent"] == 20
    assert sum(row[b] for b in OUTCOMES) == 20  # every planned message in exactly one bucket
    final = ("delivered", "undelivered", "expired", "rejected", "failed")
    assert sum(row[b] for b in final) == 20 and 0 < row["undelivered"] < 20
    assert row["delivered"] == q(engine, "SELECT COUNT(*) FROM outbox WHERE state='delivered'")
    assert row["delivery_rate"] == pytest.approx(row["delivered"] / 20)
    assert sum(f["count"] for f in rep.failures) == 20 - row["delivered"]
    o = message_outcomes(engine, cid)  # the CLI's summary and the report agree
    assert {b: row[b] for b in OUTCOMES} == o["outcomes"] and o["sent"] == row["sent"]
    assert o["cost_spent"] == pytest.approx(row["cost_spent"]) and row["currency"] == "RUB"
    assert rep.funnel["planned"] == 20 and rep.funnel["contacts"] == 20
    rate = f"{100 * row['delivered'] / 20:.1f} %"
    shown = rep.display_rows()[0]
    assert shown["delivery rate"] == rate and shown["spent"].endswith(" RUB")
    path = write_html(rep, tmp_path / "reports", "r", engine=engine)
    html = path.read_text(encoding="utf-8")
    assert 'id="funnel"' in html and 'id="over-time"' in html and "camp" in html
    assert "<script src=" not in html and len(html) > 1_000_000  # plotly.js inlined: no CDN, works offline
    md = rep.markdown()
    assert f"| camp | all | 20 | {row['delivered']} | {row['undelivered']} |" in md
    for text_ in (md, html):  # one vocabulary: the same rate string, no raw fractions, a currency
        assert rate in text_ and "RUB" in text_ and "at most once per idempotency key" in text_
        assert f"{row['delivery_rate']:.3f}" not in text_


def test_event_log_and_masking():
    from smsflow.privacy import mask_phone, mask_phones_in

    assert mask_phone("+79161234567") == "+7916***4567"
    assert mask_phones_in("bad number +7 916 123-45-67 here") == "bad number +7916***4567 here"
    assert "1234567" not in mask_phones_in("call 89161234567")
