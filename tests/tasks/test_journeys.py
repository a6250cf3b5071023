"""Journeys: definitions, the order chain, exits, at-most-once, quiet windows, date and inactivity
triggers (plain functions on SQLite and PostgreSQL), and the journey flow under Prefect."""
from __future__ import annotations

import itertools
import shutil
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from blocks.crm import CsvCrm
from blocks.gateway import SandboxGateway
from store.db import get_engine
from tasks.journey import exit_on_replies, plan_due_steps, process_events, record_event, scan_contact_triggers
from tasks.journey_defs import JourneyError, load_journey, load_journeys, parse_duration
from smsflow.ratelimit import TokenBucket
from tasks.send import send_messages
from tests.helpers import DAYTIME, contact, load_csv, write_csv

REPO = Path(__file__).resolve().parents[2]
UTC = timezone.utc
T0 = DAYTIME  # Wednesday 2026-11-25 09:00 UTC, 12:00 in Moscow
_seq = itertools.count()


@pytest.fixture
def journeys():
    return {j.name: j for j in load_journeys(REPO / "journeys")}


@pytest.fixture
def order(journeys):
    return journeys["order-lifecycle"]


def _contacts(engine, tmp_path, rows):
    load_csv(engine, write_csv(tmp_path / f"crm{next(_seq)}.csv", rows), source="shop")


def _event(engine, etype, entity, at, key=None, **payload):
    with engine.begin() as c:
        return record_event(c, "shop", etype, entity, {"type": etype, "entity_id": entity, **payload},
                            key or f"{etype}:{entity}:{next(_seq)}", at)


def _run(engine, journeys, now):
    """What one journey flow run does, without Prefect: events, triggers, due steps."""
    js = list(journeys) if not isinstance(journeys, dict) else list(journeys.values())
    s = process_events(engine, js, now)
    s.add(exit_on_replies(engine, js, now))
    s.add(scan_contact_triggers(engine, js, now))
    s.add(plan_due_steps(engine, js, now, "sandbox"))
    return s


def _outbox(engine, like="journey:%"):
    with engine.begin() as c:
        return [dict(r._mapping) for r in c.execute(text(
            "SELECT o.idempotency_key, o.step, o.text, o.state, o.send_after, o.error_code, o.language, c.name AS campaign "
            "FROM outbox o JOIN campaigns c ON c.id = o.campaign_id WHERE c.name LIKE :l ORDER BY o.id"), {"l": like})]


def _steps(engine, entity):
    with engine.begin() as c:
        return {r[0]: (r[1], _dt(r[2]), r[3]) for r in c.execute(text(
            "SELECT s.step, s.status, s.due_at, s.reason FROM journey_steps s JOIN journey_instances i "
            "ON i.id = s.instance_id WHERE i.entity_id = :e"), {"e": f"shop:{entity}"})}


def _instance(engine, entity, journey="order-lifecycle"):
    with engine.begin() as c:
        return c.execute(text("SELECT status, exit_reason FROM journey_instances WHERE journey = :j AND entity_id = :e"),
                         {"j": journey, "e": f"shop:{entity}"}).first()


def _send_all(engine, gw, now):
    with engine.begin() as c:
        ids = [r[0] for r in c.execute(text("SELECT id FROM campaigns WHERE source = 'journey'"))]
    for cid in ids:
        send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(100_000), claimer="t",
                      max_messages=1000, now=now)


# ----------------------------------------------------------------------------- definitions


def test_shipped_journeys_load():
    js = {j.name: j for j in load_journeys(REPO / "journeys")}
    assert {"order-lifecycle", "birthday", "winback"} <= set(js)
    o = js["order-lifecycle"]
    assert [s.name for s in o.steps] == ["confirmation", "packed", "shipped", "review"]
    assert o.step("review").delay == timedelta(days=7) and o.kind_of(o.step("review")) == "marketing"
    assert o.trigger.kind == "event" and js["birthday"].trigger.kind == "date"
    assert js["winback"].trigger.kind == "inactivity"


@pytest.mark.parametrize("value,expected", [("7d", timedelta(days=7)), ("2h30m", timedelta(hours=2, minutes=30)),
                                            ("15s", timedelta(seconds=15)), (0, timedelta(0)), (90, timedelta(seconds=90))])
def test_durations(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize("body,message", [
    ("steps:\n  - name: a\n    on: {event: x}\n    template: {ru: hi}\n", "wait_for"),
    ("steps:\n  - name: a\n    template: {ru: hi}\n    colour: red\n", "colour"),
    ("steps:\n  - name: a\n    condition: \"status ==\"\n    template: {ru: hi}\n", "does not compile"),
    ("steps:\n  - {name: a, template: {ru: hi}}\n  - {name: a, template: {ru: ho}}\n", "unique"),
    ("steps:\n  - {name: a, delay: soon, template: {ru: hi}}\n", "bad duration"),
    ("steps:\n  - {name: a, template: {ru: '{{ oops'}}\n", "a"),
    ("steps: []\n", "at least one step"),
])
def test_bad_journey_files_get_a_clear_error(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\ntrigger: {event: order.created}\n" + body, encoding="utf-8")
    with pytest.raises(JourneyError) as exc:
        load_journey(p)
    assert str(p) in str(exc.value) and message in str(exc.value)


def test_trigger_needs_exactly_one_kind(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("name: t\ntrigger: {event: a, inactive_days: 3}\nsteps: [{name: s, template: {ru: x}}]\n")
    with pytest.raises(JourneyError, match="exactly one"):
        load_journey(p)


# ----------------------------------------------------------------------------- the order chain


def test_order_chain_sends_each_step_once_in_order(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1"), contact(3, id="K3")])  # contact 3 speaks English
    _event(engine, "order.created", "A-1", T0, contact_id="K1", order_id="A-1", amount=2490, status="new")
    _event(engine, "order.created", "A-3", T0, contact_id="K3", order_id="A-3", status="new")
    s = _run(engine, journeys, T0)
    assert (s.events, s.started, s.planned) == (2, 2, 2)
    out = _outbox(engine)
    assert [o["step"] for o in out] == ["confirmation", "confirmation"]
    assert "A-1" in out[0]["text"] and "2490" in out[0]["text"] and out[0]["text"].startswith("Заказ")
    assert out[1]["text"].startswith("Order A-3") and out[1]["language"] == "en"

    _event(engine, "order.status_changed", "A-1", T0 + timedelta(hours=1), status="packed")
    _run(engine, journeys, T0 + timedelta(hours=1))
    _event(engine, "order.status_changed", "A-1", T0 + timedelta(hours=2), status="shipped", tracking="RA123456789RU")
    _run(engine, journeys, T0 + timedelta(hours=2))
    delivered = T0 + timedelta(days=2)
    _event(engine, "order.status_changed", "A-1", delivered, status="delivered")
    s = _run(engine, journeys, delivered)
    assert s.planned == 0 and s.scheduled == 1  # the review waits 7 days: a row with due_at, nothing sleeps
    steps = _steps(engine, "A-1")
    assert steps["review"][0] == "scheduled" and steps["review"][1] == delivered.replace(tzinfo=None) + timedelta(days=7)
    assert _run(engine, journeys, delivered + timedelta(days=7) - timedelta(seconds=1)).planned == 0
    assert _run(engine, journeys, delivered + timedelta(days=7)).planned == 1

    a1 = [o for o in _outbox(engine) if ":shop:A-1:" in o["idempotency_key"]]
    assert [o["step"] for o in a1] == ["confirmation", "packed", "shipped", "review"]
    assert "RA123456789RU" in a1[2]["text"]
    assert a1[3]["campaign"] == "journey:order-lifecycle:review" and "СТОП" in a1[3]["text"]  # marketing: opt-out footer
    assert _instance(engine, "A-1")[0] == "completed"
    assert _instance(engine, "A-3")[0] == "active"  # still waiting for its status events


def test_cancel_mid_chain_stops_every_later_step(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    _event(engine, "order.created", "B-1", T0, contact_id="K1", order_id="B-1")
    _event(engine, "order.status_changed", "B-1", T0 + timedelta(minutes=5), status="packed")
    _run(engine, journeys, T0 + timedelta(minutes=5))
    _event(engine, "order.status_changed", "B-1", T0 + timedelta(minutes=10), status="cancelled")
    s = _run(engine, journeys, T0 + timedelta(minutes=10))
    assert s.exited == 1
    status, reason = _instance(engine, "B-1")
    assert status == "exited" and "cancelled" in reason
    # the CRM keeps sending events for the entity: nothing more goes out
    _event(engine, "order.status_changed", "B-1", T0 + timedelta(hours=1), status="shipped", tracking="X")
    _event(engine, "order.status_changed", "B-1", T0 + timedelta(days=1), status="delivered")
    _run(engine, journeys, T0 + timedelta(days=30))
    assert [o["step"] for o in _outbox(engine)] == ["confirmation", "packed"]
    assert set(_steps(engine, "B-1")) == {"confirmation", "packed"}


def test_cancel_withdraws_a_message_waiting_for_the_quiet_window(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    night = datetime(2026, 11, 25, 20, 30, tzinfo=UTC)  # 23:30 in Moscow: outside 08:00-22:00 transactional
    gw = SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), rejected_rate=0, undelivered_rate=0, expired_rate=0)
    _event(engine, "order.created", "C-1", night, contact_id="K1", order_id="C-1")
    _run(engine, journeys, night)
    _send_all(engine, gw, night)
    (msg,) = _outbox(engine)
    assert msg["state"] == "planned" and _dt(msg["send_after"]) == datetime(2026, 11, 26, 5, 0)  # 08:00 Moscow
    _event(engine, "order.cancelled", "C-1", night + timedelta(hours=1))
    s = _run(engine, journeys, night + timedelta(hours=1))
    assert (s.exited, s.withdrawn) == (1, 1)
    _send_all(engine, gw, datetime(2026, 11, 26, 6, 0, tzinfo=UTC))  # the window is open: still nothing
    (msg,) = _outbox(engine)
    assert msg["state"] == "expired" and msg["error_code"] == "JOURNEY_EXITED"
    assert _steps(engine, "C-1")["confirmation"][0] == "cancelled"


def test_step_due_at_night_waits_for_the_window_then_goes(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    night = datetime(2026, 11, 25, 20, 30, tzinfo=UTC)
    gw = SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), rejected_rate=0, undelivered_rate=0, expired_rate=0)
    _event(engine, "order.created", "D-1", night, contact_id="K1", order_id="D-1")
    _run(engine, journeys, night)
    _send_all(engine, gw, night)
    assert _outbox(engine)[0]["state"] == "planned"
    _send_all(engine, gw, datetime(2026, 11, 26, 5, 0, tzinfo=UTC))
    assert _outbox(engine)[0]["state"] == "submitted"


def test_duplicate_webhooks_and_reruns_send_nothing_twice(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    assert _event(engine, "order.created", "E-1", T0, key="evt-1", contact_id="K1", order_id="E-1")
    assert not _event(engine, "order.created", "E-1", T0, key="evt-1", contact_id="K1", order_id="E-1")  # same delivery
    # the CRM fires the same change twice under different ids; the order is also "created" again
    _event(engine, "order.status_changed", "E-1", T0, key="evt-2", status="packed")
    _event(engine, "order.status_changed", "E-1", T0, key="evt-3", status="packed")
    _event(engine, "order.created", "E-1", T0, key="evt-4", contact_id="K1", order_id="E-1")
    for _ in range(3):
        _run(engine, journeys, T0 + timedelta(minutes=1))
    assert sorted(o["step"] for o in _outbox(engine)) == ["confirmation", "packed"]
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM journey_instances")).scalar() == 1
        assert c.execute(text("SELECT COUNT(*) FROM crm_events WHERE processed_at IS NULL")).scalar() == 0


def test_condition_is_checked_on_current_data_when_due(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    _event(engine, "order.created", "F-1", T0, contact_id="K1", order_id="F-1")
    _event(engine, "order.status_changed", "F-1", T0, status="delivered")
    _event(engine, "order.status_changed", "F-1", T0 + timedelta(days=1), status="disputed")
    _run(engine, journeys, T0 + timedelta(days=1))
    s = _run(engine, journeys, T0 + timedelta(days=8))
    assert s.skipped == 1 and s.planned == 0
    status, _, reason = _steps(engine, "F-1")["review"]
    assert status == "skipped" and "status == 'delivered'" in reason


def test_unknown_customer_with_a_phone_still_gets_transactional_messages(engine, journeys):
    _event(engine, "order.created", "G-1", T0, phone="8 (916) 765-43-21", order_id="G-1")
    _run(engine, journeys, T0)
    (msg,) = _outbox(engine)
    with engine.begin() as c:
        assert c.execute(text("SELECT phone_e164 FROM outbox")).scalar() == "+79167654321"
    assert "клиент" in msg["text"]  # the name's fallback


def test_a_broken_step_fails_alone_with_the_reason(engine, tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    (d / "j.yaml").write_text(textwrap.dedent("""
        name: j
        trigger: {event: order.created}
        steps:
          - {name: ok, template: {ru: "Заказ {{ order_id }}"}}
          - {name: broken, template: {ru: "{{ items[5].name }}"}}
    """), encoding="utf-8")
    js = load_journeys(d)
    _event(engine, "order.created", "H-1", T0, phone="+79161112233", order_id="H-1", items=[])
    s = _run(engine, js, T0)
    assert (s.planned, s.failed) == (1, 1)
    assert _steps(engine, "H-1")["broken"][0] == "failed"
    assert "broken" in _steps(engine, "H-1")["broken"][2] or "index" in _steps(engine, "H-1")["broken"][2]


# ----------------------------------------------------------------------------- contact triggers


def test_birthday_at_ten_local_once_a_year(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1", timezone="Asia/Kamchatka", birthday="1990-11-26"),
                                 contact(2, id="K2", birthday="1985-03-01")])
    bj = [journeys["birthday"]]
    before = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)  # 23:00 on the 25th in Kamchatka (UTC+12)
    assert _run(engine, bj, before).started == 0
    s = _run(engine, bj, datetime(2026, 11, 25, 13, 0, tzinfo=UTC))  # 01:00 on the 26th there
    assert s.started == 1 and s.planned == 0
    with engine.begin() as c:
        ent, due = c.execute(text("SELECT i.entity_id, s.due_at FROM journey_instances i JOIN journey_steps s "
                                  "ON s.instance_id = i.id")).one()
    assert ent.endswith(":birthday:2026") and _dt(due) == datetime(2026, 11, 25, 22, 0)  # 10:00 on the 26th local
    assert _run(engine, bj, datetime(2026, 11, 25, 22, 0, tzinfo=UTC)).planned == 1
    assert _run(engine, bj, datetime(2026, 11, 26, 1, 0, tzinfo=UTC)).started == 0  # same birthday: once
    assert _run(engine, bj, datetime(2027, 11, 25, 13, 0, tzinfo=UTC)).started == 1  # next year again


def test_inactivity_then_a_purchase_ends_the_winback(engine, tmp_path, journeys):
    _contacts(engine, tmp_path, [contact(1, id="K1", last_activity_at="2026-08-01T12:00:00Z"),
                                 contact(2, id="K2", last_activity_at="2026-11-20T12:00:00Z"),
                                 contact(4, id="K4", last_activity_at="01.08.2026")])  # not a date: skipped
    wj = [journeys["winback"], journeys["order-lifecycle"]]
    s = _run(engine, wj, T0)
    assert (s.started, s.planned) == (1, 1)  # only K1 is quiet for 90 days
    assert _run(engine, wj, T0 + timedelta(hours=1)).started == 0  # the same quiet spell: once
    _event(engine, "order.created", "W-1", T0 + timedelta(days=1), contact_id="K1", order_id="W-1")
    s = _run(engine, wj, T0 + timedelta(days=1))
    assert s.exited == 1 and s.cancelled == 1  # the reminder in 3 days will not go
    _run(engine, wj, T0 + timedelta(days=5))
    steps = sorted(o["step"] for o in _outbox(engine))
    assert steps == ["confirmation", "offer"]


def test_a_reply_ends_a_journey_that_asks_for_it(engine, tmp_path, journeys):
    from tasks.inbound import store_and_apply

    _contacts(engine, tmp_path, [contact(1, id="K1", last_activity_at="2026-08-01T12:00:00Z")])
    wj = [journeys["winback"]]
    _run(engine, wj, T0)
    with engine.begin() as c:
        store_and_apply(c, gateway="sandbox", gateway_message_id="mo-1", from_e164="+79161000001", to="shop",
                        body="Спасибо, уже не нужно", raw={})
    s = _run(engine, wj, T0 + timedelta(hours=1))
    assert s.exited == 1
    _run(engine, wj, T0 + timedelta(days=5))
    assert [o["step"] for o in _outbox(engine)] == ["offer"]


def test_a_persons_click_on_the_journeys_link_ends_it_a_preview_does_not(engine, tmp_path, monkeypatch):
    from smsflow.settings import reset_settings
    from store.db import bulk_insert
    from tasks.journey import exit_on_clicks

    monkeypatch.setenv("SMSFLOW_LINK_BASE_URL", "https://s.example.ru")
    reset_settings()
    d = tmp_path / "j"
    d.mkdir()
    (d / "winback_link.yaml").write_text(textwrap.dedent("""
        name: winback-link
        kind: marketing
        trigger: {inactive_days: 90, activity_field: last_activity_at}
        exit_on_click: true
        steps:
          - name: offer
            template: {ru: "Возвращайтесь: {{ link('https://shop.example/back') }}"}
          - name: reminder
            delay: 3d
            template: {ru: "Напоминаем: код BACK10 ещё 2 дня."}
        """), encoding="utf-8")
    wj = load_journeys(d)
    _contacts(engine, tmp_path, [contact(1, id="K1", last_activity_at="2026-08-01T12:00:00Z")])
    assert _run(engine, wj, T0).planned == 1
    (msg,) = _outbox(engine)
    with engine.begin() as c:
        code, key = c.execute(text("SELECT code, outbox_key FROM short_links")).one()
        c.execute(text("UPDATE outbox SET state = 'delivered', final_at = :t"), {"t": T0 + timedelta(minutes=1)})
    assert key == msg["idempotency_key"] and f"https://s.example.ru/{code}" in msg["text"]

    def click(at, bot=None, ua="phone"):
        with engine.begin() as c:
            bulk_insert(c, "clicks", ("code", "at", "method", "user_agent", "ip_hash", "bot_reason"),
                        [(code, at, "GET", ua, "h", bot)])

    click(T0 + timedelta(minutes=1, seconds=1))                   # the phone drew a preview on arrival
    click(T0 + timedelta(minutes=2), bot="crawler", ua="TelegramBot")
    assert exit_on_clicks(engine, wj, T0 + timedelta(minutes=5)).exited == 0
    click(T0 + timedelta(hours=2))                                # a person
    assert exit_on_clicks(engine, wj, T0 + timedelta(hours=3)).exited == 1
    _run(engine, wj, T0 + timedelta(days=5))
    assert [o["step"] for o in _outbox(engine)] == ["offer"]      # no reminder after the click
    reset_settings()


# ----------------------------------------------------------------------------- property: any interleaving

EVENTS = ["created", "packed", "shipped", "delivered", "cancelled", "dup"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(script=st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 3), st.booleans()), min_size=1, max_size=14))
def test_any_event_order_sends_each_step_at_most_once_and_nothing_after_cancel(tmp_path_factory, script):
    """Random orders of events about a few orders, webhooks delivered twice, flow runs at random
    moments: one outbox row per (entity, step) at most, and nothing planned once a cancel is processed."""
    tmp = tmp_path_factory.mktemp("jprop")
    engine = get_engine(f"sqlite:///{tmp / 'store.sqlite'}")
    js = load_journeys(REPO / "journeys")
    now = T0
    cancel_seen: set[str] = set()  # cancelled, not yet processed by a run
    cancel_processed: dict[str, datetime] = {}
    restarted: set[str] = set()  # created again after a cancel: a new instance is legitimate
    last = None
    for kind, order_no, run in script:
        entity = f"P-{order_no}"
        now += timedelta(hours=5)
        if kind == "dup":
            if last:
                _event(engine, last[0], last[1], now, key=last[2], **last[3])  # the same webhook delivered again
        else:
            etype, payload = (("order.created", {"phone": f"+7916555000{order_no}", "order_id": entity}) if kind == "created"
                              else ("order.cancelled", {}) if kind == "cancelled"
                              else ("order.status_changed", {"status": kind, "tracking": "T"}))
            key = f"k{next(_seq)}"
            _event(engine, etype, entity, now, key=key, **payload)
            last = (etype, entity, key, payload)
            if kind == "cancelled":
                cancel_seen.add(entity)
            if kind == "created" and (entity in cancel_seen or entity in cancel_processed):
                restarted.add(entity)
        if run:
            _run(engine, js, now)
            for e in cancel_seen:
                cancel_processed.setdefault(e, now)
            cancel_seen.clear()
    end = now + timedelta(days=30)
    _run(engine, js, end)
    for e in cancel_seen:
        cancel_processed.setdefault(e, end)
    keys = [o["idempotency_key"] for o in _outbox(engine)]
    assert len(keys) == len(set(keys))
    with engine.begin() as c:
        rows = c.execute(text("SELECT i.entity_id, i.status, s.step, s.status, s.updated_at FROM journey_steps s "
                              "JOIN journey_instances i ON i.id = s.instance_id")).all()
    for ent, inst_status, step, status, updated in rows:
        e = ent.split(":", 1)[1]
        if e in cancel_processed and e not in restarted and status == "planned":
            assert _dt(updated) < cancel_processed[e].replace(tzinfo=None), (ent, step, updated)
        if inst_status == "exited":
            assert status != "scheduled", (ent, step)


def _dt(v):
    return v if isinstance(v, datetime) else datetime.fromisoformat(str(v))


# ----------------------------------------------------------------------------- the flow (Prefect test harness)


@pytest.mark.usefixtures("prefect")
def test_journey_flow_sends_due_steps_and_reruns_send_nothing_twice(tmp_path):
    from flows.journey import journey

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    engine = get_engine(url)
    SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), min_delay_s=0, max_delay_s=0).save("sandbox", overwrite=True)
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    _event(engine, "order.created", "FL-1", T0, contact_id="K1", order_id="FL-1")
    _event(engine, "order.status_changed", "FL-1", T0, status="packed")
    first = journey(journeys_dir=str(REPO / "journeys"), database_url=url, now=T0)
    assert first["planned"] == 2 and first["submitted"] == {"journey:order-lifecycle:confirmation": 1,
                                                            "journey:order-lifecycle:packed": 1}
    assert first["wakeups_scheduled"] == 0  # a local run has no deployment to wake up
    again = journey(journeys_dir=str(REPO / "journeys"), database_url=url, now=T0 + timedelta(minutes=1))
    assert again["planned"] == 0 and again["submitted"] == {}
    assert sorted((o["step"], o["state"]) for o in _outbox(engine)) == [("confirmation", "submitted"),
                                                                         ("packed", "submitted")]


@pytest.mark.usefixtures("prefect")
def test_broken_journey_file_stops_the_flow_with_the_file_named(tmp_path):
    from flows.journey import journey

    d = tmp_path / "j"
    d.mkdir()
    (d / "x.yaml").write_text("name: x\ntrigger: {event: a}\nsteps: [{name: s, template: {ru: '{{ oops'}}]\n")
    with pytest.raises(JourneyError, match="x.yaml"):
        journey(journeys_dir=str(d), database_url=f"sqlite:///{tmp_path / 's.sqlite'}", now=T0)


def test_cli_journey_check(tmp_path):
    from typer.testing import CliRunner

    from smsflow.cli import app

    ok = CliRunner().invoke(app, ["journey", "check", str(REPO / "journeys")])
    assert ok.exit_code == 0 and "order-lifecycle: trigger event (order.created)" in ok.output
    (tmp_path / "b.yaml").write_text("name: b\ntrigger: {event: x}\nsteps:\n  - {name: s, condition: 'a ==', template: {ru: hi}}\n")
    bad = CliRunner().invoke(app, ["journey", "check", str(tmp_path)])
    assert bad.exit_code == 1 and "b.yaml" in bad.output and "does not compile" in bad.output


_ASKED: list = []


class _DealsCrm(CsvCrm):
    """A CRM block that knows whose deal 777 is (as AmoCrm/Bitrix24Crm/HubSpotCrm look it up)."""

    _block_type_slug = "deals-crm-journey-test"  # never shadow the real CsvCrm in Prefect's registry

    def event_customer(self, event_type, entity_id, payload):
        _ASKED.append((event_type, entity_id))
        return {"crm_id": "K1"} if entity_id == "777" else None


def test_customer_of_a_deal_event_is_looked_up_in_the_crm_block(engine, tmp_path, monkeypatch):
    """amoCRM/Bitrix24 webhooks name only the deal: the journey asks its CRM block whose deal it is."""
    import tasks.journey as tj

    asked = _ASKED
    asked.clear()
    monkeypatch.setitem(tj._BLOCKS, "deals", _DealsCrm(path=str(tmp_path / "none.csv")))
    _contacts(engine, tmp_path, [contact(1, id="K1")])
    d = tmp_path / "j"
    d.mkdir()
    (d / "deal.yaml").write_text(textwrap.dedent("""
        name: deal-won
        trigger: {event: lead.status, when: "status_id == '142'"}
        contact: {crm_block: deals}
        steps:
          - {name: thanks, template: {ru: "Спасибо за покупку, {{ first_name }}!"}}
    """), encoding="utf-8")
    js = load_journeys(d)
    _event(engine, "lead.status", "777", T0, status_id="142", pipeline_id="7")
    _event(engine, "lead.status", "778", T0, status_id="143")  # not won: no journey, no lookup
    _run(engine, js, T0)
    assert asked == [("lead.status", "777")]
    (msg,) = _outbox(engine)
    assert msg["text"] == "Спасибо за покупку, Иван!"  # contact(1)


def test_forgetting_a_person_ends_their_journeys(engine, tmp_path, journeys):
    from tasks.erasure import forget

    _contacts(engine, tmp_path, [contact(1, id="K1")])
    _event(engine, "order.created", "R-1", T0, contact_id="K1", order_id="R-1")
    _event(engine, "order.status_changed", "R-1", T0, status="delivered")
    _run(engine, journeys, T0)
    forget(engine, "+7 916 100-00-01")
    with engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM journey_instances")).scalar() == 0
        assert c.execute(text("SELECT COUNT(*) FROM journey_steps")).scalar() == 0
        assert c.execute(text("SELECT COUNT(*) FROM crm_events WHERE payload IS NOT NULL "
                              "AND entity_id = 'R-1'")).scalar() == 0
    assert _run(engine, journeys, T0 + timedelta(days=8)).planned == 0
