"""Signed CRM webhooks: 401 / 413 / 422 and never a 5xx; stored once before the 2xx."""
from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import text

from service.webhooks import sign


@pytest.fixture
def client(sqlite_engine, monkeypatch):
    from fastapi.testclient import TestClient

    from service.app import create_app

    monkeypatch.setenv("SMSFLOW_WEBHOOK_SECRET_SHOP", "s3cret")
    return TestClient(create_app(sqlite_engine.url.render_as_string(hide_password=False), emit_events=False),
                      raise_server_exceptions=False)


def _signed(body: bytes, secret="s3cret", ts=None):
    ts = str(int(ts if ts is not None else time.time()))
    return {"X-Smsflow-Timestamp": ts, "X-Smsflow-Signature": sign(secret, ts, body), "content-type": "application/json"}


def test_generic_json_signed_stored_once(client, sqlite_engine):
    body = json.dumps({"id": "ev-1", "type": "order.created", "entity_id": "A-17", "total": 1990}).encode()
    r = client.post("/webhooks/generic/shop", content=body, headers=_signed(body))
    assert r.status_code == 200 and r.json() == {"received": 1, "new": 1}
    r = client.post("/webhooks/generic/shop", content=body, headers=_signed(body))  # delivered again
    assert r.status_code == 200 and r.json()["new"] == 0
    with sqlite_engine.begin() as c:
        rows = c.execute(text("SELECT event_type, entity_id FROM crm_events")).fetchall()
    assert [tuple(r) for r in rows] == [("order.created", "A-17")]


@pytest.mark.parametrize("mutate,status", [
    (lambda b, h: (b, {**h, "X-Smsflow-Signature": "0" * 64}), 401),
    (lambda b, h: (b, {k: v for k, v in h.items() if k != "X-Smsflow-Signature"}), 401),
    (lambda b, h: (b, _signed(b, ts=time.time() - 301)), 401),
    (lambda b, h: (b, _signed(b, secret="other")), 401),
    (lambda b, h: (b"{not json", _signed(b"{not json")), 422),
    (lambda b, h: (b'{"no_type": 1}', _signed(b'{"no_type": 1}')), 422),
    (lambda b, h: (b"x" * (1024 * 1024 + 1), _signed(b"x" * (1024 * 1024 + 1))), 413),
])
def test_bad_requests_are_4xx(client, mutate, status):
    body = json.dumps({"id": "e", "type": "deal.stage_changed"}).encode()
    b, h = mutate(body, _signed(body))
    assert client.post("/webhooks/generic/shop", content=b, headers=h).status_code == status


def test_unknown_source_or_kind(client):
    body = b'{"type": "x"}'
    assert client.post("/webhooks/generic/nosuch", content=body, headers=_signed(body)).status_code == 401
    assert client.post("/webhooks/carrier-pigeon/shop", content=body, headers=_signed(body)).status_code in (401, 404)


def test_amocrm_and_bitrix_formats(client, sqlite_engine):
    amo = "leads[status][0][id]=101&leads[status][0][status_id]=142&leads[status][0][pipeline_id]=7&account[subdomain]=shop"
    h = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/webhooks/amocrm/shop", content=amo, headers=h).status_code == 401
    r = client.post("/webhooks/amocrm/shop?token=s3cret", content=amo, headers=h)
    assert r.status_code == 200 and r.json()["new"] == 1
    btx = "event=ONCRMDEALUPDATE&data[FIELDS][ID]=42&ts=1732500000&auth[application_token]=s3cret"
    assert client.post("/webhooks/bitrix24/shop", content=btx.replace("s3cret", "nope"), headers=h).status_code == 401
    r = client.post("/webhooks/bitrix24/shop", content=btx, headers=h)
    assert r.status_code == 200 and r.json()["new"] == 1
    assert client.post("/webhooks/bitrix24/shop", content="auth[application_token]=s3cret", headers=h).status_code == 422
    with sqlite_engine.begin() as c:
        rows = dict(c.execute(text("SELECT event_type, entity_id FROM crm_events")).fetchall())
    assert rows == {"lead.status": "101", "oncrmdealupdate": "42"}
