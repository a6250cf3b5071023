"""tasks/render.py: templates over a segment into planned outbox messages."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import bindparam, text

from store.db import utcnow
from tasks.accounting import campaign_accounting, ensure_campaign
from tasks.render import plan_messages
from tasks.policy import always_open
from smsflow.templates import MessageTemplate
from tasks.segment import ALL, build_membership
from tests.helpers import load_csv
from tests.pipeline import TPL, _base, _planned, q


def test_plan_renders_skips_no_consent_and_quarantines_failures(engine, tmp_path):
    tpl = MessageTemplate(name="t", variants={"ru": "Привет, {{ first_name }}! Баллы: {{ orders_count }}"})
    cid, stats = _planned(engine, tmp_path, 20, template=tpl,
                          over={0: {"sms_consent": "false"}, 1: {"sms_consent": "нет"}, 2: {"first_name": ""}})
    assert stats.no_consent == 2
    assert stats.render_failed == 1
    assert stats.planned == 17
    assert q(engine, "SELECT reason FROM quarantine WHERE step='render'").count("first_name") == 1
    text_ = q(engine, "SELECT text FROM outbox o JOIN contacts c ON c.id=o.contact_id WHERE c.crm_id='C00004'")
    assert text_.startswith("Привет, Анна!") and "СТОП" in text_
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE encoding='UCS-2' AND segments >= 1 AND cost = segments * 2.0") == 17
    acc = campaign_accounting(engine, cid)
    assert acc == {"contacts": 20, "quarantined": 1, "duplicates": 0, "no_consent": 2, "planned": 17,
                   "parts": acc["parts"], "cost_planned": acc["cost_planned"], "currency": "RUB"}
    assert acc["parts"] >= 17 and acc["cost_planned"] == pytest.approx(acc["parts"] * 2.0)


def test_plan_rerun_creates_nothing_twice(engine, tmp_path):
    cid, first = _planned(engine, tmp_path, 25)
    again = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=2.0,
                          gateway="sandbox")
    assert first.planned == 25 and again.planned == 0
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 25


def test_pages_cover_each_candidate_once_in_bounded_id_ranges(engine, tmp_path):
    """Pages close at every page_size-th segment member: gaps in the membership, contacts already planned,
    a page size that does not divide the segment and a shard's id range leave no candidate out or twice."""
    from tasks.render import PlanStats, _pages

    load_csv(engine, _base(tmp_path, 40))
    build_membership(engine, "test", ALL, utcnow())
    with engine.begin() as conn:
        ids = [int(i) for i in conn.execute(text("SELECT id FROM contacts WHERE status = 'valid' ORDER BY id")).scalars()]
    with engine.begin() as conn:  # a segment with gaps: every third contact is not a member
        conn.execute(text("DELETE FROM segment_memberships WHERE contact_id IN :ids")
                     .bindparams(bindparam("ids", expanding=True)), {"ids": ids[::3]})
    cid = ensure_campaign(engine, name="camp", source="test", segment="all", template_name=TPL.name,
                          kind=TPL.kind, gateway="sandbox", price_per_segment=2.0,
                          policy=always_open().model_dump(mode="json"))
    members = [i for i in ids if i not in ids[::3]]
    for size in (1, 4, 7, len(members), 1000):
        stats = PlanStats()
        pages = [[r["contact_id"] for r in p] for p in _pages(engine, cid, "test", "all", size, stats)]
        flat = [i for p in pages for i in p]
        assert flat == members and all(len(p) <= size for p in pages), size
        assert stats.candidates == len(members)
    part = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=2.0,
                         gateway="sandbox", batch_size=4)
    assert part.planned == len(members)
    with engine.begin() as conn:  # the gaps join the segment; a shard renders only its own id range
        conn.execute(text("INSERT INTO segment_memberships (segment, contact_id) SELECT 'all', id FROM contacts "
                          "WHERE id IN :ids").bindparams(bindparam("ids", expanding=True)), {"ids": ids[::3]})
    lo, hi = ids[5], ids[29]
    stats = PlanStats()
    pages = [[r["contact_id"] for r in p] for p in _pages(engine, cid, "test", "all", 3, stats, ids=(lo, hi))]
    assert [i for p in pages for i in p] == [i for i in ids[::3] if lo <= i <= hi]


def test_worker_processes_read_render_and_write_their_pages_with_the_same_result(engine, tmp_path, monkeypatch):
    """processes > 1: each worker reads, renders and writes whole pages (id ranges) itself, and the campaign
    ends up with the same messages, quarantine and counts as rendered in one process."""
    import tasks.render as render

    tpl = MessageTemplate(name="t", variants={"ru": "Привет, {{ first_name }}! Баллы: {{ orders_count }}"})
    load_csv(engine, _base(tmp_path, 60, {0: {"sms_consent": "false"}, 1: {"sms_consent": "нет"},
                                          2: {"first_name": ""}, 41: {"first_name": ""}}))
    build_membership(engine, "test", ALL, utcnow())
    runs = {}
    for name, processes in (("one", 1), ("pool", 2)):
        cid = ensure_campaign(engine, name=name, source="test", segment="all", template_name=tpl.name, kind=tpl.kind,
                              gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))
        seen = []
        if processes > 1:
            monkeypatch.setattr(render, "_POOL_FROM", 10)  # a pool from 10 members on (20,000 by default)

            def not_here(*a, **k):
                raise AssertionError("the pool's pages are written by the workers, not by this process")

            monkeypatch.setattr(render, "_store_chunk", not_here)
        stats = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=tpl,
                              price_per_segment=2.0, gateway="sandbox", batch_size=7, processes=processes,
                              on_batch=lambda s: seen.append(s.planned + s.render_failed))
        with engine.begin() as conn:
            rows = sorted(tuple(r) for r in conn.execute(text(
                "SELECT contact_id, text, encoding, segments, cost, state FROM outbox WHERE campaign_id = :c"), {"c": cid}))
            failed = sorted(conn.execute(text("SELECT contact_id FROM quarantine WHERE step = 'render' "
                                              "AND campaign_id = :c"), {"c": cid}).scalars())
        runs[name] = (stats, rows, failed, seen)
    one, pool = runs["one"], runs["pool"]
    assert (pool[0].candidates, pool[0].no_consent, pool[0].planned, pool[0].render_failed) == (60, 2, 56, 2)
    for f in ("candidates", "no_consent", "planned", "render_failed", "segments"):
        assert getattr(pool[0], f) == getattr(one[0], f), f
    assert pool[0].cost == pytest.approx(one[0].cost)
    assert pool[1] == one[1] and len(pool[1]) == 56  # the same messages, each once
    assert pool[2] == one[2] and len(pool[2]) == 2
    assert len(pool[0].failures) == 2
    # progress after every page (60 members, 7 a page: 9 pages), ending at the total
    assert len(pool[3]) == 9 and pool[3] == sorted(pool[3]) and pool[3][-1] == 58


def test_the_page_query_reads_crm_attributes_only_for_templates_that_can_use_them(engine, tmp_path, monkeypatch):
    """A template that reads only contact columns is rendered without the contacts' CRM attributes (their JSON
    is neither sent nor parsed); one that may read an attribute gets them, and renders the attribute's value."""
    import tasks.render as render
    from tasks.render import needs_attributes

    def tpl(name: str, body: str) -> MessageTemplate:
        return MessageTemplate(name=name, variants={"ru": body})

    assert not needs_attributes(tpl("a", "{{ first_name | default('Клиент') }} {{ last_name }} {{ link('x') }}"))
    for body in ("{{ orders_count }}", "{{ attributes.city }}", "{% for i in range(2) %}{{ i }}{% endfor %}",
                 "{{ opted_out_at }}", "{% set x = 1 %}{{ x }}{{ city }}"):
        assert needs_attributes(tpl("b", body)), body
    assert needs_attributes(tpl("a", "{{ first_name }}"), tpl("b", "{{ city }}"))

    queries = []
    real = render.read_frame
    monkeypatch.setattr(render, "read_frame", lambda conn, sql, *a, **k: queries.append(sql) or real(conn, sql, *a, **k))
    _, stats = _planned(engine, tmp_path, 12, template=tpl("plain", "{{ first_name | default('Клиент') }}, скидка 20%"))
    assert stats.planned == 12 and queries and all("NULL AS attributes" in s for s in queries)
    assert q(engine, "SELECT text FROM outbox o JOIN contacts c ON c.id = o.contact_id WHERE c.crm_id = 'C00004'"
             ).startswith("Анна, скидка 20%")

    queries.clear()
    body = "{{ first_name }}: баллы {{ orders_count }}"
    cid = ensure_campaign(engine, name="camp2", source="test", segment="all", template_name="attr", kind="marketing",
                          gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))
    stats = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=tpl("attr", body),
                          price_per_segment=2.0, gateway="sandbox")
    assert stats.planned == 12 and queries and all("c.attributes AS attributes" in s for s in queries)
    with engine.connect() as c:
        attrs, got = c.execute(text("SELECT c.attributes, o.text FROM outbox o JOIN contacts c ON c.id = o.contact_id "
                                    "WHERE o.campaign_id = :c AND c.crm_id = 'C00004'"), {"c": cid}).one()
    attrs = attrs if isinstance(attrs, dict) else json.loads(attrs)
    assert got.startswith(f"Анна: баллы {attrs['orders_count']}")
