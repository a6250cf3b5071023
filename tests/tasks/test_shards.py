"""tasks/shards.py: render shards cut over contact ids, each done once in the transaction of its writes."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from smsflow.templates import MessageTemplate
from store.db import utcnow
from tasks import shards as sh
from tasks.accounting import campaign_accounting, ensure_campaign
from tasks.policy import always_open
from tasks.render import plan_messages
from tasks.segment import ALL, build_membership
from tests.helpers import load_csv
from tests.pipeline import TPL, _base, q


def _campaign(engine, tmp_path, n, over=None, name="camp"):
    load_csv(engine, _base(tmp_path, n, over))
    build_membership(engine, "test", ALL, utcnow())
    return ensure_campaign(engine, name=name, source="test", segment="all", template_name=TPL.name, kind=TPL.kind,
                           gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))


def _rows(engine, sql, **p):
    with engine.begin() as conn:
        return [tuple(r) for r in conn.execute(text(sql), p)]


def _render_all(engine, cid, template=TPL):
    return [sh.render_shard(engine, cid, int(r["shard"]), template, {"campaign": "camp"})
            for r in sh.shards(engine, cid, sh.RENDER)]


def test_shards_cover_every_candidate_once_and_render_like_the_embedded_path(engine, tmp_path):
    cid = _campaign(engine, tmp_path, 47, over={3: {"sms_consent": "false"}})
    cut = sh.plan_render_shards(engine, cid, "test", "all", shard_size=10)
    assert [r["contacts"] for r in cut] == [10, 10, 10, 10, 7]
    assert all(a["hi_id"] < b["lo_id"] for a, b in zip(cut, cut[1:]))
    results = _render_all(engine, cid)
    assert sum(r["planned"] for r in results) == 46 and sum(r["no_consent"] for r in results) == 1
    assert q(engine, "SELECT COUNT(*) FROM campaign_shards WHERE campaign_id = :c AND state = 'done'", c=cid) == 5
    sharded = _rows(engine, "SELECT contact_id, text, segments, cost FROM outbox ORDER BY contact_id")
    # the same contacts through the embedded render, as a second campaign: the same messages
    cid2 = ensure_campaign(engine, name="camp2", source="test", segment="all", template_name=TPL.name, kind=TPL.kind,
                           gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))
    plan_messages(engine, campaign_id=cid2, source="test", segment="all", template=TPL, price_per_segment=2.0,
                  gateway="sandbox", extra={"campaign": "camp"})
    embedded = _rows(engine, "SELECT contact_id, text, segments, cost FROM outbox WHERE campaign_id = :c "
                             "ORDER BY contact_id", c=cid2)
    assert embedded == [r for r in sharded if r in embedded] and len(embedded) == 46
    acc = campaign_accounting(engine, cid)
    assert acc["planned"] == 46 and acc["no_consent"] == 1


def test_a_done_shard_is_not_rendered_again_and_replanning_adds_no_shard(engine, tmp_path):
    cid = _campaign(engine, tmp_path, 20)
    sh.plan_render_shards(engine, cid, "test", "all", shard_size=8)
    first = _render_all(engine, cid)
    again = _render_all(engine, cid)
    assert [r["planned"] for r in first] == [8, 8, 4]
    assert all(r["already_done"] and r["planned"] == f["planned"] for r, f in zip(again, first))
    assert len(sh.plan_render_shards(engine, cid, "test", "all", shard_size=8)) == 3
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 20


def test_a_rerun_cuts_new_shards_for_contacts_that_arrived_since(engine, tmp_path):
    cid = _campaign(engine, tmp_path, 12)
    sh.plan_render_shards(engine, cid, "test", "all", shard_size=5)
    _render_all(engine, cid)
    load_csv(engine, _base(tmp_path, 18))  # six more contacts, higher ids
    build_membership(engine, "test", ALL, utcnow())
    cut = sh.plan_render_shards(engine, cid, "test", "all", shard_size=5)
    assert [(r["shard"], r["contacts"], r["state"]) for r in cut] == [
        (0, 5, "done"), (1, 5, "done"), (2, 2, "done"), (3, 5, "pending"), (4, 1, "pending")]
    _render_all(engine, cid)
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 18


def test_a_shard_that_dies_before_its_commit_leaves_nothing(engine, tmp_path, monkeypatch):
    cid = _campaign(engine, tmp_path, 30)
    sh.plan_render_shards(engine, cid, "test", "all", shard_size=30)
    real = sh.write_chunk
    calls = []

    def dies_after_writing(*a, **kw):
        real(*a, **kw)
        calls.append(1)
        raise RuntimeError("killed")

    monkeypatch.setattr(sh, "write_chunk", dies_after_writing)
    with pytest.raises(RuntimeError):
        sh.render_shard(engine, cid, 0, TPL, page_size=10)  # three pages: the first one written, then it dies
    assert calls == [1]
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 0
    assert q(engine, "SELECT state FROM campaign_shards WHERE shard = 0") == "pending"
    monkeypatch.setattr(sh, "write_chunk", real)
    assert sh.render_shard(engine, cid, 0, TPL, page_size=10)["planned"] == 30
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 30


def test_two_runs_of_one_shard_at_once_write_it_once(engine, tmp_path):
    """Dask runs a task again when its worker dies; a shard whose first run is alive after all races the second."""
    cid = _campaign(engine, tmp_path, 40)
    sh.plan_render_shards(engine, cid, "test", "all", shard_size=40)
    results, errors = [], []
    gate = threading.Barrier(2)

    def run():
        try:
            gate.wait()
            results.append(sh.render_shard(engine, cid, 0, TPL))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert q(engine, "SELECT COUNT(*) FROM outbox") == 40
    assert sorted(bool(r.get("already_done")) for r in results) == [False, True]
    assert all(r["planned"] == 40 for r in results)


def test_render_failures_are_quarantined_by_the_shard(engine, tmp_path):
    tpl = MessageTemplate(name="t", variants={"ru": "Привет, {{ first_name }}!"})
    cid = _campaign(engine, tmp_path, 10, over={2: {"first_name": ""}})
    sh.plan_render_shards(engine, cid, "test", "all", shard_size=4)
    results = _render_all(engine, cid, tpl)
    assert sum(r["render_failed"] for r in results) == 1 and sum(r["planned"] for r in results) == 9
    assert q(engine, "SELECT COUNT(*) FROM quarantine WHERE step = 'render' AND campaign_id = :c", c=cid) == 1


def test_send_shards_one_per_sender_and_pending_ones_are_reused(engine, tmp_path):
    cid = _campaign(engine, tmp_path, 3)
    assert [r["shard"] for r in sh.plan_send_shards(engine, cid, 2)] == [0, 1]
    assert [r["shard"] for r in sh.plan_send_shards(engine, cid, 2)] == [0, 1]
    assert sh.mark_done(engine, cid, sh.SEND, 0) and not sh.mark_done(engine, cid, sh.SEND, 0)
    assert [(r["shard"], r["state"]) for r in sh.plan_send_shards(engine, cid, 2)] == [
        (0, "done"), (1, "pending"), (2, "pending")]


def test_run_keys_name_campaign_step_shard_and_attempt():
    assert sh.run_key(7, "render", 3, 0) == "smsflow:7:render:3:0"
    assert sh.run_key(7, "render", 3, 1) != sh.run_key(7, "render", 3, 0)
