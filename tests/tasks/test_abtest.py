"""A/B campaigns on both stores: arms as assigned, the holdout recorded, one decision, the roll-out never
gives a contact a second variant; per-arm send windows."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import text

from smsflow.abtest import HOLDOUT, ROLLOUT, ABTest, Variant, assign
from store.db import bulk_insert, utcnow
from tasks.abtest import ABDesignChanged, arm_outcomes, arm_sizes, look, plan_ab, start_test, ab_report
from tasks.accounting import ensure_campaign
from tasks.policy import always_open, variant_policies
from tasks.segment import ALL, build_membership
from tests.helpers import load_csv
from tests.pipeline import _base

T0 = datetime(2026, 3, 2, 9, 0)


def _templates(tmp_path) -> dict[str, str]:
    a = tmp_path / "a.yaml"
    a.write_text("name: a\nkind: marketing\nsender_name: Shop\nvariants:\n  ru: \"{{ first_name }}, скидка 20%\"\n"
                 "  en: \"{{ first_name }}, 20% off\"\n", encoding="utf-8")
    b = tmp_path / "b.yaml"
    b.write_text("name: b\nkind: marketing\nsender_name: Shop\nvariants:\n  ru: \"{{ first_name }}, только сегодня -25%\"\n"
                 "  en: \"{{ first_name }}, today only -25%\"\n", encoding="utf-8")
    return {"A": str(a), "B": str(b)}


def _setup(engine, tmp_path, n, test):
    load_csv(engine, _base(tmp_path, n))
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="ab", source="test", segment="all", template_name="a", kind="marketing",
                          gateway="sandbox", price_per_segment=2.0, policy=always_open().model_dump(mode="json"))
    templates = _templates(tmp_path)
    start_test(engine, cid, test, templates, T0)
    return cid, templates


def _plan(engine, cid, test, templates, phase, winner=None):
    return plan_ab(engine, campaign_id=cid, campaign="ab", source="test", segment="all", test=test, templates=templates,
                   price_per_segment=2.0, gateway="sandbox", sender_name="Shop", extra={}, batch_size=500, phase=phase,
                   winner=winner)


def _rows(engine, sql, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).all()


def _send_all(engine, cid, at):
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET state = 'delivered', submitted_at = :t, final_at = :t WHERE campaign_id = :c"),
                  {"t": at, "c": cid})


def _replies(engine, cid, rate_by_arm, seed, at):
    rng = np.random.default_rng(seed)
    rows = []
    for key, arm, phone in _rows(engine, "SELECT idempotency_key, variant, phone_e164 FROM outbox WHERE campaign_id = :c",
                                 c=cid):
        if rng.random() < rate_by_arm[arm]:
            rows.append(("sandbox", f"r-{key}", phone, "интересно", "reply", at))
    with engine.begin() as c:
        bulk_insert(c, "inbound_messages", ("gateway", "gateway_message_id", "from_e164", "text", "kind", "received_at"),
                    rows)


def test_arms_holdout_and_rest_follow_the_assignment(engine, tmp_path):
    test = ABTest(variants=[Variant(name="A"), Variant(name="B", template="b")], holdout=0.1, test_share=0.4)
    cid, templates = _setup(engine, tmp_path, 1500, test)
    res = _plan(engine, cid, test, templates, "test")
    contacts = _rows(engine, "SELECT id, phone_e164 FROM contacts WHERE source = 'test'")
    want = dict(zip([c[0] for c in contacts], assign(test, "ab", [c[1] for c in contacts])))
    got = {int(c): v for c, v in _rows(engine, "SELECT contact_id, variant FROM outbox WHERE campaign_id = :c", c=cid)}
    held = {int(c) for (c,) in _rows(engine, "SELECT contact_id FROM ab_members WHERE campaign_id = :c", c=cid)}
    assert got == {c: a for c, a in want.items() if a in ("A", "B")}
    assert held == {c for c, a in want.items() if a == HOLDOUT}
    assert res["arms"][ROLLOUT] == sum(1 for a in want.values() if a == ROLLOUT) > 0
    texts = dict(_rows(engine, "SELECT variant, MIN(text) FROM outbox WHERE campaign_id = :c GROUP BY variant", c=cid))
    assert "25%" in texts["B"] and "20%" in texts["A"]
    # every message of the test carries the one A/B key of its contact
    assert all(k == f"c{cid}:{c}:ab" for k, c in _rows(engine, "SELECT idempotency_key, contact_id FROM outbox"))
    # a rerun renders nothing new; a changed design is refused
    again = _plan(engine, cid, test, templates, "test")
    assert again["planned"] == 0 and len(_rows(engine, "SELECT id FROM outbox")) == len(got)
    # what a rerun reports: the arms as stored, not only what this pass rendered
    sizes = arm_sizes(engine, cid, again["arms"][ROLLOUT])
    assert sizes == {a: sum(1 for x in want.values() if x == a) for a in ("A", "B", HOLDOUT, ROLLOUT)}
    with pytest.raises(ABDesignChanged):
        start_test(engine, cid, test.model_copy(update={"holdout": 0.2}), templates, T0)


def test_decision_once_then_rollout_never_gives_a_second_variant(engine, tmp_path):
    test = ABTest(variants=[Variant(name="A"), Variant(name="B", template="b")], holdout=0.1, test_share=0.5,
                  metric="reply_rate", mde=0.02, min_per_arm=100)
    cid, templates = _setup(engine, tmp_path, 3000, test)
    _plan(engine, cid, test, templates, "test")
    _send_all(engine, cid, T0)
    _replies(engine, cid, {"A": 0.03, "B": 0.25}, 1, T0 + timedelta(hours=1))
    out = arm_outcomes(engine, cid)
    assert out["B"]["reply_rate"] > out["A"]["reply_rate"] > 0
    # two wake-up runs look at the same moment: one decision
    results = []
    threads = [threading.Thread(target=lambda: results.append(look(engine, cid, T0 + timedelta(hours=2))))
               for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r["decided"] for r in results) in ([False, True], [True, False])
    phase, winner, verdict = _rows(engine, "SELECT phase, winner, verdict FROM ab_tests WHERE campaign_id = :c", c=cid)[0]
    assert (phase, winner) == ("decided", "B") and verdict.startswith("B wins: +") and "pp replies" in verdict
    assert len(_rows(engine, "SELECT id FROM ab_looks WHERE campaign_id = :c", c=cid)) >= 1
    before = dict(_rows(engine, "SELECT contact_id, variant FROM outbox WHERE campaign_id = :c", c=cid))
    r = _plan(engine, cid, test, templates, "rollout", winner="B")
    assert r["planned"] > 0
    # twice (a crashed roll-out rerun): nothing more
    assert _plan(engine, cid, test, templates, "rollout", winner="B")["planned"] == 0
    rows = _rows(engine, "SELECT contact_id, variant, COUNT(*) FROM outbox WHERE campaign_id = :c GROUP BY contact_id, "
                         "variant", c=cid)
    per_contact: dict[int, int] = {}
    for c, v, k in rows:
        per_contact[c] = per_contact.get(c, 0) + k
    assert max(per_contact.values()) == 1  # never two messages, never two variants
    assert all(before.get(c, v) == v for c, v, _ in rows)  # the test's messages keep their arm
    held = {int(c) for (c,) in _rows(engine, "SELECT contact_id FROM ab_members WHERE campaign_id = :c", c=cid)}
    total = {int(c) for (c,) in _rows(engine, "SELECT id FROM contacts")}
    assert set(per_contact) == total - held  # everyone but the holdout got exactly one
    assert {v for c, v, _ in rows if c not in before} == {"B"}
    # a look after the decision changes nothing; the report tells the story
    assert look(engine, cid, T0 + timedelta(days=5))["winner"] == "B"
    rep = ab_report(engine, cid)
    assert rep["winner"] == "B" and rep["arms"]["B"]["sent"] == out["B"]["sent"]  # roll-out not in the test's numbers
    assert rep["fixed_horizon"]["variants"]["B"]["significant"] is True and rep["held_out"] == len(held)


def test_deadline_without_winner_falls_back(engine, tmp_path):
    test = ABTest(variants=[Variant(name="A"), Variant(name="B", template="b")], test_share=0.5, metric="reply_rate",
                  deadline_hours=24, fallback="none")
    cid, templates = _setup(engine, tmp_path, 600, test)
    _plan(engine, cid, test, templates, "test")
    _send_all(engine, cid, T0)
    assert look(engine, cid, T0 + timedelta(hours=23))["phase"] == "test"
    res = look(engine, cid, T0 + timedelta(hours=25))
    assert res["decided"] and res["winner"] is None and "the rest gets nothing" in res["verdict"]
    assert _plan(engine, cid, test, templates, "rollout", winner=None)["planned"] == 0


def test_send_window_variants_get_their_own_window(engine, tmp_path):
    """A send-time test: at 10:00 Moscow the morning arm is claimed and sent, the evening arm deferred to
    18:00 local, by the same claim."""
    from datetime import time, timezone

    from tasks.send import claim

    test = ABTest(variants=[Variant(name="morning", window="09:00-12:00"), Variant(name="evening",
                                                                                 window="18:00-21:00")])
    cid, templates = _setup(engine, tmp_path, 200, test)
    with engine.begin() as c:
        pols = variant_policies(c, cid, always_open())
    assert pols["morning"].marketing_window.start == time(9) and pols["evening"].marketing_window.end == time(21)
    _plan(engine, cid, test, {"morning": templates["A"], "evening": templates["A"]}, "test")
    arms = dict(_rows(engine, "SELECT variant, COUNT(*) FROM outbox GROUP BY variant"))
    assert arms["morning"] > 50 and arms["evening"] > 50
    at = datetime(2026, 3, 4, 7, 0, tzinfo=timezone.utc)  # a Wednesday, 10:00 in Moscow
    got = claim(engine, cid, 1000, "t", now=at)
    sent = dict(_rows(engine, "SELECT variant, COUNT(*) FROM outbox WHERE state = 'queued' GROUP BY variant"))
    assert len(got) == sent.get("morning", 0) == arms["morning"] and "evening" not in sent
    deferred = _rows(engine, "SELECT send_after FROM outbox WHERE variant = 'evening' AND state = 'planned'")
    assert len(deferred) == arms["evening"]
    assert {(v if isinstance(v, datetime) else datetime.fromisoformat(v)).hour for (v,) in deferred} == {15}  # 18:00 MSK


def test_global_holdout_is_kept_from_all_marketing_only(engine, tmp_path, monkeypatch):
    from smsflow.abtest import in_global_holdout
    from smsflow.settings import reset_settings
    from smsflow.templates import MessageTemplate
    from tasks.render import plan_messages

    monkeypatch.setenv("SMSFLOW_GLOBAL_HOLDOUT", "0.2")
    monkeypatch.setenv("SMSFLOW_GLOBAL_HOLDOUT_SALT", "g-salt")
    reset_settings()
    try:
        load_csv(engine, _base(tmp_path, 400))
        build_membership(engine, "test", ALL, utcnow())
        phones = dict(_rows(engine, "SELECT id, phone_e164 FROM contacts"))
        kept_out = {c for c, p in phones.items() if in_global_holdout(0.2, "g-salt", p)}
        assert 40 < len(kept_out) < 120
        got = {}
        for kind in ("marketing", "transactional"):
            tpl = MessageTemplate(name=f"t-{kind}", kind=kind, sender_name="Shop", variants={"ru": "Привет", "en": "Hi"})
            cid = ensure_campaign(engine, name=kind, source="test", segment="all", template_name=tpl.name, kind=kind,
                                  gateway="sandbox", price_per_segment=1.0, policy=always_open().model_dump(mode="json"))
            st = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=tpl,
                               price_per_segment=1.0, gateway="sandbox")
            got[kind] = ({int(c) for (c,) in _rows(engine, "SELECT contact_id FROM outbox WHERE campaign_id = :c", c=cid)},
                         st.global_holdout)
        assert got["marketing"] == (set(phones) - kept_out, len(kept_out))
        assert got["transactional"] == (set(phones), 0)  # an order's shipping notice still goes out
    finally:
        reset_settings()
