"""HttpGateway (Twilio-compatible) against an offline Twilio that follows the documented API."""
from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest
from sqlalchemy import text

from blocks.gateway import GatewayUnavailable, OutgoingMessage
from blocks.http_gateway import HttpGateway, twilio_signature, verify_twilio_signature
from tests.fakes.twilio import FakeTwilio
from tests.helpers import DAYTIME


def _gw(fake: FakeTwilio, **kw) -> HttpGateway:
    return HttpGateway(account_sid=fake.account_sid, auth_token=fake.auth_token, from_number="+15005550006",
                       status_callback_url="https://cb.example/callbacks/twilio/status", **kw).with_transport(fake.transport())


def test_submit_maps_documented_answers():
    fake = FakeTwilio(unsubscribed={"+79160000002"})
    msgs = [OutgoingMessage("r1", "+79160000001", "Привет"), OutgoingMessage("r2", "+79160000002", "Hi"),
            OutgoingMessage("r3", "89160000003", "Hi")]
    res = {r.reference: r for r in _gw(fake).submit(msgs)}
    assert res["r1"].accepted and res["r1"].gateway_message_id.startswith("SM")
    assert not res["r2"].accepted and res["r2"].error_code == "21610" and not res["r2"].transient
    assert not res["r3"].accepted and res["r3"].error_code == "21211"
    cb = fake.messages[0]["status_callback"]
    assert parse_qs(urlparse(cb).query)["ref"] == ["r1"]  # our reference travels with the message


def test_429_retry_after_is_honoured():
    fake = FakeTwilio(rate_per_s=5)
    res = _gw(fake, concurrency=4).submit([OutgoingMessage(f"r{i}", f"+7916000{i:04d}", "x") for i in range(12)])
    accepted = sum(r.accepted for r in res)
    transient = sum(r.transient for r in res)
    assert accepted + transient == 12 and accepted >= 5
    assert fake.throttled >= 1
    assert len(fake.messages) == accepted  # nothing created twice


def test_wrong_credentials_and_outage():
    fake = FakeTwilio()
    bad = HttpGateway(account_sid=fake.account_sid, auth_token="wrong").with_transport(fake.transport())
    r = bad.submit([OutgoingMessage("r", "+79160000001", "x")])[0]
    assert not r.accepted and r.error_code == "20003"
    fake.down = True
    with pytest.raises(GatewayUnavailable):
        _gw(fake).submit([OutgoingMessage("r", "+79160000001", "x")])
    assert fake.messages == []


def test_signature_roundtrip():
    params = {"MessageSid": "SM1", "MessageStatus": "delivered", "To": "+79160000001"}
    url = "https://cb.example/callbacks/twilio/status?ref=c1:2:main"
    sig = twilio_signature("tok", url, params)
    assert verify_twilio_signature("tok", url, params, sig)
    assert not verify_twilio_signature("tok", url, {**params, "MessageStatus": "failed"}, sig)
    assert not verify_twilio_signature("other", url, params, sig)


def test_status_callback_endpoint_checks_signature_and_stores(engine, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app

    monkeypatch.setenv("SMSFLOW_TWILIO_AUTH_TOKEN", "tok")
    client = TestClient(create_app(engine.url.render_as_string(hide_password=False), emit_events=False))
    url = "http://testserver/callbacks/twilio/status?ref=c1%3A5%3Amain"
    form = {"MessageSid": "SMabc", "MessageStatus": "undelivered", "ErrorCode": "30005", "To": "+79160000001"}
    r = client.post(url, data=form, headers={"X-Twilio-Signature": "forged"})
    assert r.status_code == 401
    sig = twilio_signature("tok", url, form)
    r = client.post(url, data=form, headers={"X-Twilio-Signature": sig})
    assert r.status_code == 200, r.text
    with engine.begin() as c:
        row = c.execute(text("SELECT gateway_message_id, reference, status, error_code FROM delivery_receipts")).one()
    assert tuple(row) == ("SMabc", "c1:5:main", "undelivered", "30005")


def test_crash_window_with_a_provider_that_cannot_be_asked(sqlite_engine, tmp_path):
    """Twilio accepted two messages, we died before recording them. One status callback came in
    (it carries our ref): that one is settled, never resent. The other waits for evidence and
    is only planned again after the grace period."""
    from datetime import timedelta

    from blocks.gateway import Receipt
    from store.db import bulk_insert, utcnow
    from tasks.reconcile import store_receipts
    from tasks.send import claim, recover_in_flight

    eng = sqlite_engine
    with eng.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [("s", str(i), f"+7916000000{i}", True, "valid") for i in range(2)])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('c','s','all','t','marketing',0,'running')"))
        now = utcnow()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"k{i}", 1, i + 1, "main", f"+7916000000{i}", "hi", "GSM-7", 1, 0, "planned", 0, now, now)
                     for i in range(2)])
    fake = FakeTwilio()
    gw = _gw(fake, evidence_grace_s=7 * 86400)
    claimed = claim(eng, 1, 2, "dead", lease_s=0, now=DAYTIME)
    gw.submit([OutgoingMessage(k, p, t) for k, p, t in zip(claimed["idempotency_key"], claimed["phone_e164"], claimed["text"])])
    store_receipts(eng, "twilio", [Receipt(fake.messages[0]["sid"], "k0", "enroute", None, utcnow(), {})])
    assert recover_in_flight(eng, 1, gw, "new") == (1, 0)
    with eng.begin() as c:
        states = dict(c.execute(text("SELECT idempotency_key, state FROM outbox")).fetchall())
    assert states == {"k0": "submitted", "k1": "queued"}  # k1: no evidence yet, not resent
    with eng.begin() as c:
        c.execute(text("UPDATE outbox SET queued_at = :t WHERE idempotency_key = 'k1'"), {"t": utcnow() - timedelta(days=8)})
    assert recover_in_flight(eng, 1, gw, "new") == (0, 1)


def test_lost_answer_is_in_doubt_and_never_resent_blindly(sqlite_engine, tmp_path):
    """The request reached Twilio but the answer was lost: the message stays in flight (queued),
    not back to planned, so no second submit can happen before evidence settles it."""
    import httpx

    from store.db import bulk_insert, utcnow
    from smsflow.ratelimit import TokenBucket
    from tasks.send import send_messages

    fake = FakeTwilio()

    def lossy(request):
        resp = fake.handle(request)
        if request.method == "POST":
            raise httpx.ReadTimeout("answer lost", request=request)
        return resp

    gw = HttpGateway(account_sid=fake.account_sid, auth_token=fake.auth_token, from_number="+15005550006"
                     ).with_transport(httpx.MockTransport(lossy))
    eng = sqlite_engine
    with eng.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"), [("s", "1", "+79160000001", True, "valid")])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('c','s','all','t','marketing',0,'running')"))
        now = utcnow()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [("k1", 1, 1, "main", "+79160000001", "hi", "GSM-7", 1, 0, "planned", 0, now, now)])
    s = send_messages(eng, campaign_id=1, gateway=gw, bucket=TokenBucket(100), claimer="a", max_messages=10, now=DAYTIME)
    assert s.in_doubt == 1 and len(fake.messages) == 1
    again = send_messages(eng, campaign_id=1, gateway=gw, bucket=TokenBucket(100), claimer="b", max_messages=10, now=DAYTIME)
    assert again.claimed == 0 and len(fake.messages) == 1
    with eng.begin() as c:
        assert c.execute(text("SELECT state FROM outbox")).scalar() == "queued"
