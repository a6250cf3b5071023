"""Inbound replies: keywords, opt-out before the next send, the service's store-then-2xx rule."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from tasks.inbound import classify, normalize_keyword
from tests.helpers import DAYTIME


@pytest.mark.parametrize("body", ["STOP", " stop ", "Stop!", "СТОП", "стоп.", "  Отписаться ", "ОТПИСКА", "unsubscribe",
                                  "End", "quit", "CANCEL", "optout", "Revoke", "STOPALL", "«СТОП»", "stop!!!"])
def test_stop_words(body):
    assert classify(body) == "stop"


@pytest.mark.parametrize("body,kind", [("START", "start"), ("старт", "start"), ("HELP", "help"), ("помощь?", "help"),
                                       ("info", "help"), ("ИНФО", "help"), ("stop sending me this", "reply"),
                                       ("Спасибо!", "reply"), ("", "reply"), (None, "reply"), ("не стоп", "reply")])
def test_other_kinds(body, kind):
    assert classify(body) == kind


def test_normalize_keyword():
    assert normalize_keyword("  ёлка! ") == "ЕЛКА"


def _contact(engine, phone="+79161234567", lang="ru"):
    from store.db import bulk_insert

    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status", "language"),
                    [("s", "1", phone, True, "valid", lang)])


def test_service_stores_inbound_applies_stop_and_ignores_duplicates(engine, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app

    _contact(engine)
    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNEL", "mo-key")
    url = engine.url.render_as_string(hide_password=False)
    client = TestClient(create_app(url, emit_events=False))
    client.params = {"key": "mo-key"}  # Kannel's get-url carries the gateway's callback secret
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/inbound/kannel", params={"from": "+79161234567", "to": "1234", "text": "Стоп!", "id": "mo-1"})
    assert r.status_code == 200
    r2 = client.get("/inbound/kannel", params={"from": "+79161234567", "to": "1234", "text": "Стоп!", "id": "mo-1"})
    assert r2.status_code == 200
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM inbound_messages")).scalar() == 1
        assert c.execute(text("SELECT opted_out_at IS NOT NULL FROM contacts")).scalar()
        assert c.execute(text("SELECT COUNT(*) FROM consent_changes WHERE change='opted_out' AND method='sms_keyword'")).scalar() == 1
    client.post("/inbound/kannel", data={"from": "89161234567", "text": "START", "id": "mo-2"})
    with engine.begin() as c:
        assert c.execute(text("SELECT opted_out_at FROM contacts")).scalar() is None
        assert c.execute(text("SELECT consent_method FROM contacts")).scalar() == "sms_keyword"
    client.get("/inbound/kannel", params={"from": "+79161234567", "text": "Когда доставка?", "id": "mo-3"})
    with engine.begin() as c:
        row = c.execute(text("SELECT kind, contact_id IS NOT NULL FROM inbound_messages WHERE gateway_message_id='mo-3'")).one()
    assert tuple(row) == ("reply", True)
    assert client.get("/inbound/kannel", params={"text": "x"}).status_code == 422
    client.get("/inbound/kannel", params={"from": "+79161234567", "text": "помощь", "id": "mo-4"})
    client.get("/inbound/kannel", params={"from": "+79161234567", "text": "помощь", "id": "mo-4"})  # twice
    with engine.begin() as c:
        rows = c.execute(text("SELECT o.text, o.state, k.kind FROM outbox o JOIN campaigns k ON k.id = o.campaign_id "
                              "WHERE k.name = 'auto-replies'")).fetchall()
    assert len(rows) == 1 and "СТОП" in rows[0][0] and rows[0][1] == "planned" and rows[0][2] == "transactional"


def test_opt_out_mid_campaign_stops_the_next_message(sqlite_engine, tmp_path):
    """A STOP arriving between two send batches: the contact's planned message is not sent."""
    from blocks.gateway import SandboxGateway
    from store.db import bulk_insert, utcnow
    from tasks.inbound import store_and_apply
    from smsflow.ratelimit import TokenBucket
    from tasks.send import send_messages

    eng = sqlite_engine
    with eng.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [("s", str(i), f"+7916{i:07d}", True, "valid") for i in range(4)])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('c','s','all','t','marketing',0,'running')"))
        now = utcnow()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"k{i}", 1, i + 1, "main", f"+7916{i:07d}", "hi", "GSM-7", 1, 0, "planned", 0, now, now) for i in range(4)])
    gw = SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), rejected_rate=0, batch_size=2)
    first = send_messages(eng, campaign_id=1, gateway=gw, bucket=TokenBucket(1000), claimer="a", max_messages=2, now=DAYTIME)
    assert first.submitted == 2
    with eng.begin() as c:
        store_and_apply(c, gateway="kannel", gateway_message_id="mo", from_e164="+79160000003", to=None, body="СТОП", raw={})
    second = send_messages(eng, campaign_id=1, gateway=gw, bucket=TokenBucket(1000), claimer="a", max_messages=10, now=DAYTIME)
    assert second.submitted == 1 and second.policy_blocked == 1
    assert "k3" not in gw.sent_count_by_reference()
