"""Tracked short links through render: one code per recipient, stored with its message; counted in parts."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from smsflow import links as links_mod
from smsflow.settings import reset_settings
from smsflow.templates import MessageTemplate, TemplateLoadError
from store.db import utcnow
from tasks.accounting import ensure_campaign
from tasks.policy import always_open
from tasks.render import open_campaign, plan_messages, render_extra
from tasks.segment import ALL, build_membership
from tests.helpers import load_csv
from tests.pipeline import _base, q

BASE = "https://s.example.ru"
TPL = MessageTemplate(name="sale", variants={
    "ru": 'Скидка 20%: {{ link("https://shop.example/sale?x=1") }}',
    "en": 'Sale 20%: {{ link("https://shop.example/sale?x=1") }}'})


@pytest.fixture
def link_base(monkeypatch):
    monkeypatch.setenv("SMSFLOW_LINK_BASE_URL", BASE)
    reset_settings()
    yield BASE
    reset_settings()


def _planned(engine, tmp_path, n, utm=None):
    load_csv(engine, _base(tmp_path, n))
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="camp", source="test", segment="all", template_name=TPL.name, kind=TPL.kind,
                          gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))
    stats = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=2.0,
                          gateway="sandbox", extra=render_extra("camp", utm))
    return cid, stats


def _t(v):
    from datetime import datetime

    return datetime.fromisoformat(v) if isinstance(v, str) else v


def _rows(engine, sql):
    with engine.begin() as c:
        return c.execute(text(sql)).all()


def test_each_message_gets_its_own_code_stored_with_its_target_and_message(engine, tmp_path, link_base):
    cid, stats = _planned(engine, tmp_path, 30, utm={"utm_source": "sms", "utm_campaign": "camp"})
    msgs = _rows(engine, "SELECT idempotency_key, contact_id, text, segments FROM outbox ORDER BY contact_id")
    got = {r.outbox_key: r for r in _rows(engine, "SELECT code, outbox_key, contact_id, target, expires_at, "
                                                  "created_at FROM short_links")}
    assert stats.planned == len(msgs) == len(got) == 30
    for m in msgs:
        link = got[m.idempotency_key]
        assert f"{BASE}/{link.code}" in m.text and link.contact_id == m.contact_id
        assert link.target == "https://shop.example/sale?x=1&utm_source=sms&utm_campaign=camp"
        assert (_t(link.expires_at) - _t(link.created_at)).days == 90
    assert len({r.code for r in got.values()}) == 30


def test_a_code_already_taken_is_replaced_in_the_text_with_the_same_parts(engine, tmp_path, link_base, monkeypatch):
    cid, _ = _planned(engine, tmp_path, 3)
    taken = q(engine, "SELECT MIN(code) FROM short_links")
    drawn = iter([taken, taken, "Zz9Zz9Z"] + [links_mod.new_code() for _ in range(10)])
    monkeypatch.setattr(links_mod, "new_code", lambda: next(drawn))
    load_csv(engine, _base(tmp_path, 4))  # one contact more: rendered with the taken code first
    build_membership(engine, "test", ALL, utcnow())
    plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=2.0,
                  gateway="sandbox", extra=render_extra("camp"))
    new = _rows(engine, "SELECT o.text, l.code FROM outbox o JOIN short_links l ON l.outbox_key = o.idempotency_key "
                        "ORDER BY o.contact_id DESC LIMIT 1")[0]
    assert new.code == "Zz9Zz9Z" and new.text.count("Zz9Zz9Z") == 1 and taken not in new.text
    assert q(engine, "SELECT COUNT(*) FROM short_links") == 4


def test_a_link_template_without_a_base_url_fails_before_anything_is_rendered(engine, tmp_path, monkeypatch):
    monkeypatch.delenv("SMSFLOW_LINK_BASE_URL", raising=False)
    reset_settings()
    path = tmp_path / "t.yaml"
    path.write_text('name: sale\nvariants:\n  ru: \'Скидка {{ link("https://shop.example/") }}\'\n', encoding="utf-8")
    with pytest.raises(TemplateLoadError, match="SMSFLOW_LINK_BASE_URL"):
        open_campaign(engine, name="x", template=str(path), source="test", segment="all", price_per_segment=1.0,
                      gateway="sandbox")
    assert q(engine, "SELECT COUNT(*) FROM campaigns") == 0


def test_the_link_counts_in_the_parts_the_preview_shows(engine, tmp_path, link_base):
    from smsflow.sms_encoding import sms_info

    _planned(engine, tmp_path, 10)
    for t, segs in _rows(engine, "SELECT text, segments FROM outbox"):
        assert sms_info(t).segments == segs


def test_click_counts_raw_human_unique_and_previews(engine, tmp_path, link_base):
    from datetime import timedelta

    from store.db import bulk_insert
    from tasks.clicks import click_counts

    cid, _ = _planned(engine, tmp_path, 5)
    links = _rows(engine, "SELECT l.code, o.idempotency_key FROM short_links l JOIN outbox o "
                          "ON o.idempotency_key = l.outbox_key ORDER BY o.contact_id")
    delivered = utcnow() - timedelta(hours=1)
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET state = 'delivered', final_at = :t"), {"t": delivered})
        (a, _), (b, _), (d, _) = links[0], links[1], links[2]
        bulk_insert(c, "clicks", ("code", "at", "method", "user_agent", "ip_hash", "bot_reason"), [
            (a, delivered + timedelta(seconds=1), "GET", "phone", "h1", None),       # preview window
            (a, delivered + timedelta(minutes=5), "GET", "phone", "h1", None),       # a person
            (a, delivered + timedelta(minutes=9), "GET", "phone", "h1", None),       # the same person again
            (b, delivered + timedelta(minutes=2), "HEAD", "phone", "h2", "head"),
            (b, delivered + timedelta(minutes=3), "GET", "TelegramBot", "h3", "crawler"),
            (d, delivered + timedelta(days=2), "GET", "phone", "h4", None),          # a person
        ])
    assert click_counts(engine, cid) == {"clicks_total": 6, "clicks_human": 3, "unique_clickers": 2,
                                         "clicks_preview": 1}


def test_a_persons_click_is_written_back_to_the_crm_once(engine, tmp_path, link_base):
    from datetime import timedelta

    from store.db import bulk_insert
    from tasks.writeback import queue_items

    _planned(engine, tmp_path, 3)
    (a, _), (b, _) = _rows(engine, "SELECT l.code, o.contact_id FROM short_links l JOIN outbox o "
                                   "ON o.idempotency_key = l.outbox_key ORDER BY o.contact_id")[:2]
    delivered = utcnow() - timedelta(hours=1)
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET state = 'delivered', final_at = :t"), {"t": delivered})
        bulk_insert(c, "clicks", ("code", "at", "method", "user_agent", "ip_hash", "bot_reason"), [
            (a, delivered + timedelta(seconds=1), "GET", "phone", "h", None),       # a preview on arrival
            (a, delivered + timedelta(minutes=3), "GET", "phone", "h", None),       # the person
            (a, delivered + timedelta(minutes=4), "GET", "phone", "h", None),       # the person again
            (b, delivered + timedelta(minutes=5), "GET", "TelegramBot", "h", "crawler")])
    queue_items(engine, "test")
    queue_items(engine, "test")
    rows = _rows(engine, "SELECT key, kind, text FROM crm_writebacks WHERE kind = 'click'")
    assert [(k, kind) for k, kind, _ in rows] == [(f"click:{a}", "click")] and "link clicked" in rows[0][2]
