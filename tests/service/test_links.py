"""GET /{code}: the redirect of tracked short links, called over a real socket as phones, messengers'
preview bots and scanners call it. Every request to a known code is stored before the answer; a
malformed or unknown code is a 404 and stores nothing; nothing a caller sends produces a 5xx."""
from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from store.db import bulk_insert, get_engine, utcnow
from tests.helpers import served_in_thread

PHONE_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
            "Version/17.5 Mobile/15E148 Safari/604.1")
TARGET = "https://shop.example/sale?x=1&utm_source=sms"


@pytest.fixture
def served(any_store):
    from service.app import create_app

    engine = get_engine(any_store)
    now = utcnow()
    with engine.begin() as c:
        bulk_insert(c, "short_links", ("code", "campaign_id", "contact_id", "outbox_key", "target", "created_at",
                                       "expires_at"),
                    [("Ab3De7g", 1, 1, "c1:1:sale", TARGET, now, now + timedelta(days=90)),
                     ("Xyz2345", 1, 2, "c1:2:sale", TARGET, now - timedelta(days=91), now - timedelta(days=1))])
    with served_in_thread(create_app(any_store, emit_events=False)) as base:
        yield base, engine


def _clicks(engine):
    with engine.begin() as c:
        return c.execute(text("SELECT code, method, user_agent, ip_hash, bot_reason FROM clicks ORDER BY id")).all()


def test_a_phone_is_redirected_and_its_click_was_stored_before_the_answer(served):
    base, engine = served
    r = httpx.get(f"{base}/Ab3De7g", headers={"User-Agent": PHONE_UA})
    assert r.status_code == 302 and r.headers["location"] == TARGET
    assert r.headers["cache-control"] == "no-store"
    (click,) = _clicks(engine)  # read right after the answer: committed before it
    assert click.code == "Ab3De7g" and click.method == "GET" and click.bot_reason is None
    assert click.user_agent == PHONE_UA and click.ip_hash and "127.0.0.1" not in click.ip_hash


def test_previews_and_heads_are_redirected_and_counted_as_bots(served):
    base, engine = served
    for method, ua in (("HEAD", PHONE_UA), ("GET", "TelegramBot (like TwitterBot)"),
                       ("GET", "WhatsApp/2.23.20.0 A"), ("GET", None)):
        headers = {"User-Agent": ua} if ua else {"User-Agent": ""}
        r = httpx.request(method, f"{base}/Ab3De7g", headers=headers)
        assert r.status_code == 302 and r.headers["location"] == TARGET
    assert [c.bot_reason for c in _clicks(engine)] == ["head", "crawler", "crawler", "no_user_agent"]


def test_an_expired_link_shows_a_page_and_is_counted_as_expired(served):
    base, engine = served
    r = httpx.get(f"{base}/Xyz2345", headers={"User-Agent": PHONE_UA})
    assert r.status_code == 410 and "This link has expired" in r.text and "location" not in r.headers
    assert [c.bot_reason for c in _clicks(engine)] == ["expired"]


@pytest.mark.parametrize("path", ["/Zz9Zz9Z", "/abcdef", "/abcdefgh", "/Ab3De70", "/..%2f..%2fetc", "/%00%00%00%00%00%00%00",
                                  "/Ab3De7g/x", "/Ab3De7g%20", "/%D0%B0%D0%B1%D0%B2%D0%B3%D0%B4%D0%B5%D0%B6"])
def test_unknown_and_malformed_codes_are_404_and_store_nothing(served, path):
    base, engine = served
    r = httpx.get(base + path, headers={"User-Agent": PHONE_UA})
    assert r.status_code == 404
    assert _clicks(engine) == []


def test_only_get_and_head(served):
    base, engine = served
    assert httpx.post(f"{base}/Ab3De7g").status_code == 405
    assert _clicks(engine) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.text(min_size=0, max_size=40), ua=st.text(max_size=600))
def test_whatever_a_scanner_sends_is_never_a_5xx(served, code, ua):
    base, _ = served
    from urllib.parse import quote

    try:
        value = bytes(b for b in ua.encode("utf-8") if b >= 0x20 and b != 0x7F)  # raw bytes, as a scanner sends
        r = httpx.get(f"{base}/{quote(code, safe='')}", headers={"User-Agent": value})
    except httpx.LocalProtocolError:
        return  # a header httpx itself refuses to send
    assert r.status_code < 500


@pytest.mark.parametrize("synchronous", [True, False])
def test_click_writer_batches_on_both_stores_and_async_commit_is_postgresql_only(any_store, synchronous):
    """The writer's kept connection: one transaction per batch; with SMSFLOW_CLICK_COMMIT=async its PostgreSQL
    session commits without waiting for the WAL flush (SQLite keeps its WAL/NORMAL setting)."""
    from store.links import ClickWriter

    engine = get_engine(any_store)
    write = ClickWriter(engine, synchronous=synchronous)
    now = utcnow()
    write([(f"Ab3De{i:02d}", now, "GET", PHONE_UA, f"h{i}", None) for i in range(12)])
    write([("Ab3De99", now, "HEAD", None, "h", "head")])
    rows = _clicks(engine)
    assert [r.code for r in rows] == [f"Ab3De{i:02d}" for i in range(12)] + ["Ab3De99"]
    assert rows[-1].method == "HEAD" and rows[-1].bot_reason == "head" and rows[0].user_agent == PHONE_UA
    if engine.dialect.name == "postgresql":
        mode = write.conn.exec_driver_sql("SHOW synchronous_commit").scalar()
        write.conn.rollback()
        assert mode == ("on" if synchronous else "off")
        with engine.connect() as other:  # the setting is the writer's session only
            assert other.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    write.conn.close()
