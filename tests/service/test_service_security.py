"""The callback service as a stranger on the internet calls it: over a real socket, without or
with wrong credentials, with malformed requests. A refused call changes nothing, is logged
without the phone number, and nothing a caller sends produces a 5xx."""
from __future__ import annotations

import logging

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from blocks.kannel import KannelGateway
from store.db import bulk_insert, get_engine, utcnow
from tests.helpers import served_in_thread

PHONE = "+79161234567"
SECRET = "k-3f9a"


@pytest.fixture
def served(any_store, monkeypatch):
    """``create_app`` on a real port (uvicorn in a thread), one contact and one submitted message."""
    from service.app import create_app

    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN", SECRET)
    engine = get_engine(any_store)
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status", "language"),
                    [("s", "1", PHONE, True, "valid", "ru")])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('c', 's', 'all', 't', 'marketing', 0, 'running')"))
        c.execute(text("INSERT INTO outbox (idempotency_key, campaign_id, contact_id, step, phone_e164, text, encoding, "
                       "segments, cost, state, attempts, planned_at, updated_at, gateway_message_id, submitted_at) "
                       "SELECT 'ref-1', (SELECT MAX(id) FROM campaigns), (SELECT MAX(id) FROM contacts), 'main', :p, 'x', 'GSM-7', "
                       "1, 0, 'submitted', 1, :t, :t, 'ref-1', :t"), {"p": PHONE, "t": utcnow()})
    with served_in_thread(create_app(any_store, emit_events=False)) as base:
        yield base, engine


def _opted_out(engine) -> bool:
    with engine.begin() as c:
        return c.execute(text("SELECT opted_out_at FROM contacts")).scalar() is not None


def _receipts(engine) -> int:
    with engine.begin() as c:
        return c.execute(text("SELECT COUNT(*) FROM delivery_receipts")).scalar()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def service_log():
    """What the service logs (its own handler: independent of how Prefect configured logging)."""
    h, logger = Lines(), logging.getLogger("smsflow.service")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    yield h.lines
    logger.removeHandler(h)
    logger.setLevel(old)


def test_forged_replies_and_receipts_are_refused_and_change_nothing(served, service_log):
    base, engine = served
    stop = {"from": PHONE, "to": "1234", "text": "STOP", "id": "mo-1", "gw": "kannel-main"}
    dlr = {"ref": "ref-1", "type": "1", "gw": "kannel-main"}
    for creds in ({}, {"key": "wrong"}, {"key": SECRET + "x"}, {"key": SECRET, "gw": "other-gw"}):
        assert httpx.get(f"{base}/inbound/kannel", params={**stop, **creds}).status_code == 401
        assert httpx.post(f"{base}/inbound/kannel", data={**stop, **creds}).status_code == 401
        assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**dlr, **creds}).status_code == 401
    assert not _opted_out(engine) and _receipts(engine) == 0
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM inbound_messages")).scalar() == 0
        assert c.execute(text("SELECT state FROM outbox")).scalar() == "submitted"
    refused = [m for m in service_log if "refused" in m]
    assert len(refused) == 12 and not any("9161234567" in m or "4567" in m for m in refused), refused
    # every call is logged, without its query string (phone numbers, keys)
    calls = [m for m in service_log if m.startswith(("GET /", "POST /"))]
    assert len(calls) >= 12 and not any("4567" in m or SECRET in m for m in calls)
    # the gateway itself, with its key: accepted
    assert httpx.get(f"{base}/inbound/kannel", params={**stop, "key": SECRET}).status_code == 200
    assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**dlr, "key": SECRET}).status_code == 200
    assert _opted_out(engine) and _receipts(engine) == 1
    with engine.begin() as c:  # the key is not kept with the message
        raw = c.execute(text("SELECT raw FROM inbound_messages")).scalar()
    assert SECRET not in str(raw)


def test_a_forged_start_cannot_resubscribe_someone_who_opted_out(served):
    base, engine = served
    assert httpx.get(f"{base}/inbound/kannel", params={"from": PHONE, "text": "СТОП", "id": "m1", "gw": "kannel-main",
                                                      "key": SECRET}).status_code == 200
    assert _opted_out(engine)
    r = httpx.get(f"{base}/inbound/kannel", params={"from": PHONE, "text": "START", "id": "m2", "gw": "kannel-main"})
    assert r.status_code == 401 and _opted_out(engine)


def test_secret_rotation_accepts_both_secrets_then_only_the_new_one(served, monkeypatch):
    base, engine = served
    q = {"ref": "ref-1", "type": "8", "gw": "kannel-main"}
    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN", f"new-one,{SECRET}")
    assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**q, "key": SECRET}).status_code == 200
    assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**q, "key": "new-one"}).status_code == 200
    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN", "new-one")
    assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**q, "key": SECRET}).status_code == 401
    monkeypatch.delenv("SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN")  # none configured: closed
    assert httpx.get(f"{base}/callbacks/kannel/dlr", params={**q, "key": "new-one"}).status_code == 401


def test_the_gateway_puts_its_secret_into_the_dlr_url(monkeypatch):
    gw = KannelGateway(password="p", dlr_url="http://h/callbacks/kannel/dlr")
    gw._block_document_name = "kannel-main"
    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN", "a%b&c,old")
    assert gw._dlr_pattern().endswith("&gw=kannel-main&key=a%%25b%%26c")  # the first (current) secret, escaped
    gw = KannelGateway(password="p", dlr_url="http://h/callbacks/kannel/dlr", callback_secret="from-block")
    gw._block_document_name = "kannel-main"
    assert gw._dlr_pattern().endswith("&key=from-block")


# --------------------------------------------------------------------------- fuzzing
def test_schemathesis_finds_no_server_error(served):
    import schemathesis
    from schemathesis.checks import not_a_server_error

    base, _ = served
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    calls, operations = 0, 0
    for op in schema.get_all_operations():
        operations += 1
        operation = op.ok()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case):
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=base, checks=[not_a_server_error], timeout=10)

        check()
    assert operations >= 5 and calls >= 3 * operations
    assert httpx.get(f"{base}/health").status_code == 200


ROUTES = ["/callbacks/kannel/dlr", "/inbound/kannel", "/callbacks/twilio/status", "/webhooks/generic/shop",
          "/webhooks/amocrm/shop", "/webhooks/bitrix24/shop", "/webhooks/x/y", "/health", "/nope"]
CTYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x",
          "application/json; charset=cp1251", "", b"\xff/\xfe"]
junk = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"from": null}', b"from=%FF%FE&text=%00", b"\xff\xfe\x00",
                     b'{"ref": 1, "type": "x"}', b"ref=r&type=1&key=" + SECRET.encode(), b"from=%2B7916&text=STOP",
                     b'{"from": "+79161234567", "text": "STOP", "gw": "kannel-main"}', b"{\"a\": " * 50]),
    st.dictionaries(st.sampled_from(["from", "text", "ref", "type", "gw", "key", "id", "answer", "ts", "events"]),
                    st.one_of(st.text(max_size=30), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
                    max_size=6).map(lambda d: __import__("json").dumps(d).encode()),
)


def raw_http(base: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int | None:
    """One request written byte for byte (lying Content-Length, non-ASCII headers, any body), as a
    client that does not care about HTTP would send it; the status code, or None when the server
    closed without answering."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(base)
    head = f"{method} {target} HTTP/1.1\r\nHost: {u.hostname}\r\nConnection: close\r\n".encode()
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)  # a declared length longer than the body ends here
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data[9:12])


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(method=st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE"]), route=st.sampled_from(ROUTES),
       query=st.binary(max_size=120), ctype=st.sampled_from(CTYPES), body=junk,
       length=st.sampled_from([None] * 6 + [b"-1", b"abc", b"99999999999", b"3"]),
       extra=st.lists(st.tuples(st.sampled_from([b"X-Smsflow-Signature", b"X-Smsflow-Timestamp", b"X-Twilio-Signature",
                                                 b"X-Forwarded-For", b"Accept"]), st.binary(max_size=40).map(
           lambda b: bytes(c for c in b if c not in b"\r\n"))), max_size=3))
def _raw(base, method, route, query, ctype, body, length, extra):
    from urllib.parse import quote_from_bytes

    headers = [(b"Content-Type", ctype if isinstance(ctype, bytes) else ctype.encode())] if ctype else []
    headers.append((b"Content-Length", length if length is not None else str(len(body)).encode()))
    status = raw_http(base, method, f"{route}?{quote_from_bytes(query, safe='=&')}", headers + extra, body)
    assert status is None or status < 500, (method, route, query, ctype, body[:80], length, extra, status)


def test_raw_random_requests_get_no_server_error(served):
    base, _ = served
    _raw(base)
    assert httpx.get(f"{base}/health").status_code == 200
