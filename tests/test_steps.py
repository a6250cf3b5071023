"""Each step's logic against the store (plain function calls, no Prefect)."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from blocks.gateway import SandboxGateway, SubmitResult
from store.db import utcnow
from tasks.accounting import campaign_accounting, ensure_campaign
from tasks.render import plan_messages
from tasks.policy import always_open
from tasks.reconcile import apply_receipts, expire_stale, store_receipts
from smsflow.templates import MessageTemplate
from tasks.segment import ALL, AttributeFilter, Range, RfmRule, SegmentDefinition, build_membership, evaluate
from smsflow.ratelimit import TokenBucket
from tasks.send import claim, recover_in_flight, send_messages
from tasks.validate_store import ExtractCheckFailed, validate_new_contacts
from tests.helpers import contact, load_csv, write_csv

TPL = MessageTemplate(name="promo", variants={"ru": "{{ first_name | default('клиент') }}, скидка 10%!",
                                              "en": "{{ first_name | default('friend') }}, 10% off!"})


def q(engine, sql: str, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).scalar()


def _base(tmp_path, n=40, over=None):
    over = over or {}
    rows = [contact(i, **over.get(i, {})) for i in range(n)]
    return write_csv(tmp_path / "crm.csv", rows)


# ----------------------------------------------------------------------------- validate + dedup


def test_validate_quarantines_with_reason_and_merges_duplicates(engine, tmp_path):
    path = _base(tmp_path, 10, {
        1: {"phone": "+7 495 123-45-67"},  # Moscow landline
        2: {"phone": "abc"},
        3: {"phone": ""},
        4: {"phone": "8 (916) 100-00-05", "updated_at": "2026-03-01T00:00:00Z"},  # same number as row 5, newer
        5: {"phone": "+79161000005", "updated_at": "2026-01-01T00:00:00Z"},
    })
    _, stats = load_csv(engine, path)
    assert stats.checked == 10
    assert stats.quarantined == 3
    assert stats.duplicates == 1
    assert q(engine, "SELECT COUNT(*) FROM quarantine WHERE step='validate'") == 3
    reasons = {r: c for r, c in _rows(engine, "SELECT reason_code, COUNT(*) FROM quarantine WHERE step='validate' GROUP BY reason_code")}
    assert reasons == {"not_mobile": 1, "invalid": 1, "missing": 1}
    kept = q(engine, "SELECT id FROM contacts WHERE crm_id='C00004'")
    assert q(engine, "SELECT status FROM contacts WHERE crm_id='C00005'") == "duplicate"
    assert q(engine, "SELECT duplicate_of FROM contacts WHERE crm_id='C00005'") == kept
    assert q(engine, "SELECT phone_e164 FROM contacts WHERE crm_id='C00004'") == "+79161000005"


def _rows(engine, sql, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).fetchall()


def test_broken_extract_stops_before_anything_is_validated(sqlite_engine, tmp_path):
    path = _base(tmp_path, 20, {i: {"phone": ""} for i in range(18)})  # phone column 90% empty
    with pytest.raises(ExtractCheckFailed, match="failed its checks"):
        load_csv(sqlite_engine, path)
    assert q(sqlite_engine, "SELECT COUNT(*) FROM contacts WHERE status = 'new'") == 20


# ----------------------------------------------------------------------------- segment


def test_segment_rules():
    import pandas as pd

    now = datetime(2026, 11, 25)
    df = pd.DataFrame({
        "id": [1, 2, 3, 4],
        "language": ["ru", "en", "ru", "ru"],
        "funnel_stage": ["customer", "customer", "lead", "customer"],
        "city": ["Москва", "London", None, "Казань"],
        "last_activity_at": ["2026-11-20", "2026-01-01", "2026-11-24", None],
        "orders_count": [10, 1, 0, 5],
        "total_spent": [50000, 100, 0, 20000],
        "last_order_at": ["2026-11-01", "2025-01-01", None, "2026-10-01"],
    })
    seg = SegmentDefinition(name="s", filters=[AttributeFilter(field="language", op="eq", value="ru")],
                            funnel_stages=["customer"])
    assert evaluate(df, seg, now)[0].tolist() == [True, False, False, True]
    act = SegmentDefinition(name="a", days_since_last_activity=Range(max=30))
    assert evaluate(df, act, now)[0].tolist() == [True, False, True, False]
    num = SegmentDefinition(name="n", filters=[AttributeFilter(field="total_spent", op="gte", value=20000)])
    assert evaluate(df, num, now)[0].tolist() == [True, False, False, True]
    rfm = SegmentDefinition(name="r", rfm=RfmRule(min_total=13))  # row 3 scores 4+4+4
    mask, score = evaluate(df, rfm, now)
    assert mask.tolist() == [True, False, False, False]
    assert score.tolist()[0] == "555"
    missing = SegmentDefinition(name="m", filters=[AttributeFilter(field="city", op="missing")])
    assert evaluate(df, missing, now)[0].tolist() == [False, False, True, False]


def test_segment_membership_written(engine, tmp_path):
    path = _base(tmp_path, 12, {i: {"language": "en"} for i in range(4)})
    load_csv(engine, path)
    seg = SegmentDefinition(name="english", filters=[AttributeFilter(field="language", value="en")])
    assert build_membership(engine, "test", seg, utcnow()) == 4 + sum(1 for i in range(4, 12) if i % 4 == 3)
    assert build_membership(engine, "test", ALL, utcnow()) == 12
    assert q(engine, "SELECT size FROM segments WHERE name='all'") == 12


# ----------------------------------------------------------------------------- render into the outbox


def _planned(engine, tmp_path, n=30, template=TPL, over=None):
    path = _base(tmp_path, n, over)
    load_csv(engine, path)
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="camp", source="test", segment="all", template_name=template.name,
                          kind=template.kind, gateway="sandbox", price_per_segment=2.0,
                          policy=always_open().model_dump(mode="json"))
    stats = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=template,
                          price_per_segment=2.0, gateway="sandbox")
    return cid, stats


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


# ----------------------------------------------------------------------------- send


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.mark.parametrize("rate", [50, 500])
def test_token_bucket_rate_is_accurate(rate):
    clock = FakeClock()
    b = TokenBucket(rate, clock=clock, sleep=clock.sleep)
    n = rate * 20
    for _ in range(n // 10):
        b.acquire(10)
    achieved = n / clock.t
    assert abs(achieved - rate) / rate < 0.02


def _gw(tmp_path, **kw) -> SandboxGateway:
    kw.setdefault("min_delay_s", 0.0)
    kw.setdefault("max_delay_s", 0.0)
    return SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), **kw)


def test_send_submits_each_message_once_and_checks_optout_at_send_time(engine, tmp_path):
    cid, _ = _planned(engine, tmp_path, 40)
    with engine.begin() as c:  # opted out after planning: must not be sent
        c.execute(text("UPDATE contacts SET opted_out_at = CURRENT_TIMESTAMP WHERE crm_id IN ('C00001', 'C00002')"))
    gw = _gw(tmp_path, rejected_rate=0.1, batch_size=7)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="t", max_messages=10_000)
    assert stats.policy_blocked == 2
    assert stats.submitted + stats.rejected == 38
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='rejected' AND error_code='POLICY_OPTED_OUT'") == 2
    counts = gw.sent_count_by_reference()
    assert len(counts) == stats.submitted and set(counts.values()) == {1}
    # a second sender finds nothing left
    again = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="t2", max_messages=10_000)
    assert again.claimed == 0
    assert set(gw.sent_count_by_reference().values()) == {1}


def test_crash_between_gateway_accept_and_commit_is_resolved_without_resending(engine, tmp_path, monkeypatch):
    """The dangerous window: the gateway accepted, the process died before recording it."""
    import tasks.send as send_mod

    cid, _ = _planned(engine, tmp_path, 30)
    gw = _gw(tmp_path, rejected_rate=0.0, batch_size=10)

    class Crash(BaseException):
        pass

    calls = {"n": 0}
    real = send_mod.record_results

    def crashing_record(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash()  # second batch: submitted at the gateway, never recorded
        return real(*a, **k)

    monkeypatch.setattr(send_mod, "record_results", crashing_record)
    with pytest.raises(Crash):
        send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="run1", max_messages=100,
                      lease_s=0)
    monkeypatch.setattr(send_mod, "record_results", real)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='queued'") == 10
    recovered, replanned = recover_in_flight(engine, cid, gw, "run2")
    assert (recovered, replanned) == (10, 0)
    done = q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted'")
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="run2", max_messages=100)
    # only the third batch was left (the pipelined loop may have submitted and recorded it while
    # the second batch's record was failing: then nothing was left)
    assert stats.submitted == 30 - done and done in (20, 30)
    counts = gw.sent_count_by_reference()
    assert len(counts) == 30 and set(counts.values()) == {1}
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted' AND gateway_message_id IS NOT NULL") == 30


def test_crash_before_the_gateway_got_it_is_sent_once_after_recovery(engine, tmp_path):
    cid, _ = _planned(engine, tmp_path, 5)
    gw = _gw(tmp_path, rejected_rate=0.0)
    claim(engine, cid, 5, "dead-worker", lease_s=0)  # claimed, then the process died
    assert recover_in_flight(engine, cid, gw, "new") == (0, 5)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="new", max_messages=100)
    assert stats.submitted == 5
    assert q(engine, "SELECT MAX(attempts) FROM outbox") == 2


def test_live_claims_of_another_sender_are_not_stolen(engine, tmp_path):
    cid, _ = _planned(engine, tmp_path, 5)
    gw = _gw(tmp_path)
    claim(engine, cid, 5, "alive", lease_s=600)
    assert recover_in_flight(engine, cid, gw, "other") == (0, 0)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='queued'") == 5


def test_transient_errors_go_back_to_planned_then_fail_after_max_attempts(engine, tmp_path):
    cid, _ = _planned(engine, tmp_path, 6)
    gw = _gw(tmp_path, throttle_rate=1.0)
    s = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="a", max_messages=6,
                      max_attempts=2)
    assert s.retry_later == 6 and s.submitted == 0
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='planned' AND error_code='0x00000058'") == 6
    s2 = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="b", max_messages=6,
                       max_attempts=2)
    assert s2.failed == 6
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='failed'") == 6
    assert gw.sent_count_by_reference() == {}


# ----------------------------------------------------------------------------- reconcile


def _submitted(engine, tmp_path, n=20, **gw_kw):
    cid, _ = _planned(engine, tmp_path, n)
    gw = _gw(tmp_path, rejected_rate=0.0, **gw_kw)
    send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="a", max_messages=10_000)
    return cid, gw


def test_receipts_out_of_order_and_twice_end_in_the_right_state(engine, tmp_path):
    cid, gw = _submitted(engine, tmp_path, 30, duplicate_receipt_rate=1.0, late_intermediate_rate=1.0,
                         undelivered_rate=0.3)
    receipts = gw.fetch_receipts()
    assert len(receipts) == 90  # final + duplicate + late 'enroute' for each
    store_receipts(engine, "sandbox", list(reversed(receipts)))
    s = apply_receipts(engine)
    assert s.applied == 30
    again = apply_receipts(engine)
    assert again.applied == 0
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state IN ('delivered','undelivered','expired')") == 30
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='undelivered' AND error_code IS NOT NULL") >= 1
    # a late intermediate receipt after everything: still final
    store_receipts(engine, "sandbox", [r for r in receipts if r.status == "enroute"])
    apply_receipts(engine)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted'") == 0


def test_receipt_before_submit_is_recorded(engine, tmp_path):
    from blocks.gateway import Receipt

    cid, _ = _planned(engine, tmp_path, 3)
    df = claim(engine, cid, 3, "x")
    ref = df["idempotency_key"].iloc[0]
    store_receipts(engine, "sandbox", [Receipt("gw-1", ref, "delivered", "000", utcnow(), {})])
    assert apply_receipts(engine).applied == 1
    from tasks.send import SendStats, record_results

    ids = dict(zip(df["idempotency_key"], df["id"].astype(int)))
    record_results(engine, ids, [SubmitResult(k, True, f"gw-{i}") for i, k in enumerate(df["idempotency_key"], 1)],
                   5, {}, SendStats())
    assert q(engine, "SELECT state FROM outbox WHERE idempotency_key=:k", k=ref) == "delivered"
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='submitted'") == 2


def test_unknown_receipt_waits_then_applies(engine, tmp_path):
    from blocks.gateway import Receipt

    cid, gw = _submitted(engine, tmp_path, 2)
    store_receipts(engine, "sandbox", [Receipt("not-yet-known", None, "delivered", "000", utcnow(), {})])
    s = apply_receipts(engine)
    assert s.applied == 0 and s.pending == 1
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET gateway_message_id='not-yet-known' WHERE id=(SELECT MIN(id) FROM outbox)"))
    assert apply_receipts(engine).applied == 1


def test_ttl_expiry_and_a_real_receipt_still_wins(engine, tmp_path):
    cid, gw = _submitted(engine, tmp_path, 4)
    assert expire_stale(engine, timedelta(hours=1), now=utcnow() + timedelta(hours=2)) == 4
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state='expired' AND error_code='TTL'") == 4
    store_receipts(engine, "sandbox", gw.fetch_receipts())
    apply_receipts(engine)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE error_code='TTL'") == 0


# ----------------------------------------------------------------------------- report


def test_report_counts_and_html(engine, tmp_path):
    from tasks.report import collect, write_html

    cid, gw = _submitted(engine, tmp_path, 20, undelivered_rate=0.5)
    store_receipts(engine, "sandbox", gw.fetch_receipts())
    apply_receipts(engine)
    from tasks.outcomes import OUTCOMES, message_outcomes

    rep = collect(engine, "camp")
    row = rep.rows[0]
    assert row["planned"] == 20 and row["sent"] == 20
    assert sum(row[b] for b in OUTCOMES) == 20  # every planned message in exactly one bucket
    final = ("delivered", "undelivered", "expired", "rejected", "failed")
    assert sum(row[b] for b in final) == 20 and 0 < row["undelivered"] < 20
    assert row["delivered"] == q(engine, "SELECT COUNT(*) FROM outbox WHERE state='delivered'")
    assert row["delivery_rate"] == pytest.approx(row["delivered"] / 20)
    assert sum(f["count"] for f in rep.failures) == 20 - row["delivered"]
    o = message_outcomes(engine, cid)  # the CLI's summary and the report agree
    assert {b: row[b] for b in OUTCOMES} == o["outcomes"] and o["sent"] == row["sent"]
    assert o["cost_spent"] == pytest.approx(row["cost_spent"]) and row["currency"] == "RUB"
    assert rep.funnel["planned"] == 20 and rep.funnel["contacts"] == 20
    rate = f"{100 * row['delivered'] / 20:.1f} %"
    shown = rep.display_rows()[0]
    assert shown["delivery rate"] == rate and shown["spent"].endswith(" RUB")
    path = write_html(rep, tmp_path / "reports", "r")
    html = path.read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "camp" in html
    md = rep.markdown()
    assert f"| camp | all | 20 | {row['delivered']} | {row['undelivered']} |" in md
    for text_ in (md, html):  # one vocabulary: the same rate string, no raw fractions, a currency
        assert rate in text_ and "RUB" in text_ and "at most once per idempotency key" in text_
        assert f"{row['delivery_rate']:.3f}" not in text_


def test_gateway_outage_mid_campaign_loses_nothing_and_doubles_nothing(engine, tmp_path, monkeypatch):
    """The gateway is down for a while after two batches: the breaker backs off (exponentially),
    the same messages are retried after recovery, nothing is failed, nothing is sent twice."""
    from blocks.gateway import GatewayUnavailable
    from tasks.send import CircuitBreaker

    cid, _ = _planned(engine, tmp_path, 50)
    gw = _gw(tmp_path, rejected_rate=0.0, batch_size=10)
    real_submit = SandboxGateway.submit
    state = {"calls": 0}

    def flaky(self, messages):
        state["calls"] += 1
        if 3 <= state["calls"] <= 6:  # four tries fail while the gateway is down
            raise GatewayUnavailable("connection refused")
        return real_submit(self, messages)

    slept: list[float] = []
    monkeypatch.setattr(SandboxGateway, "submit", flaky)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="task-1",
                          max_messages=100, breaker=CircuitBreaker(sleep=slept.append))
    assert slept == [1.0, 2.0, 4.0, 8.0] and stats.outages == 4
    assert stats.submitted == 50
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state IN ('failed','rejected','planned','queued')") == 0
    counts = gw.sent_count_by_reference()
    assert len(counts) == 50 and set(counts.values()) == {1}


def test_breaker_gives_up_and_releases_what_was_never_tried(engine, tmp_path, monkeypatch):
    from blocks.gateway import GatewayUnavailable
    from tasks.send import CircuitBreaker

    cid, _ = _planned(engine, tmp_path, 12)
    gw = _gw(tmp_path, batch_size=5)
    monkeypatch.setattr(SandboxGateway, "submit", lambda self, m: (_ for _ in ()).throw(GatewayUnavailable("down")))
    t = {"now": 0.0}
    breaker = CircuitBreaker(max_open_s=60, clock=lambda: t["now"], sleep=lambda d: t.__setitem__("now", t["now"] + d))
    with pytest.raises(GatewayUnavailable, match="giving up"):
        send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="x", max_messages=100,
                      breaker=breaker)
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state = 'planned' AND attempts = 0") == 12
    assert q(engine, "SELECT COUNT(*) FROM outbox WHERE state IN ('failed', 'rejected', 'queued')") == 0


def test_event_log_and_masking():
    from smsflow.privacy import mask_phone, mask_phones_in

    assert mask_phone("+79161234567") == "+7916***4567"
    assert mask_phones_in("bad number +7 916 123-45-67 here") == "bad number +7916***4567 here"
    assert "1234567" not in mask_phones_in("call 89161234567")


def test_policy_at_send_time_defers_holds_and_reports(engine, tmp_path):
    """At 23:30 in Moscow nothing marketing goes out: deferred to 10:00 local, not dropped; an
    opted-out contact is held back; the report counts both by rule."""
    from tasks.report import collect
    from tasks.send import claim

    path = _base(tmp_path, 6, {5: {"timezone": "Asia/Kamchatka"}})  # 08:30 next morning there
    load_csv(engine, path)
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="camp", source="test", segment="all", template_name="promo", kind="marketing",
                          gateway="sandbox", price_per_segment=1.0)  # default policy
    plan_messages(engine, campaign_id=cid, source="test", segment="all", template=TPL, price_per_segment=1.0, gateway="sandbox")
    with engine.begin() as c:
        c.execute(text("UPDATE contacts SET opted_out_at = CURRENT_TIMESTAMP WHERE crm_id = 'C00001'"))
    night = datetime(2026, 11, 24, 20, 30, tzinfo=__import__("datetime").timezone.utc)
    gw = _gw(tmp_path, rejected_rate=0.0)
    s = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="a", max_messages=100, now=night)
    assert s.submitted == 0 and s.held == {"quiet_hours": 5, "opted_out": 1}
    assert gw.sent_count_by_reference() == {}
    with engine.begin() as c:
        rows = dict(c.execute(text("SELECT ct.crm_id, o.send_after FROM outbox o JOIN contacts ct ON ct.id = o.contact_id "
                                   "WHERE o.state = 'planned'")).fetchall())
    assert str(rows["C00000"]).startswith("2026-11-25 07:00")  # 10:00 Moscow
    assert str(rows["C00005"]).startswith("2026-11-24 22:00")  # 10:00 Kamchatka
    assert claim(engine, cid, 100, "b", now=night).empty  # deferred messages are not claimable before their time
    morning = datetime(2026, 11, 25, 7, 0, tzinfo=__import__("datetime").timezone.utc)
    s2 = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="c", max_messages=100, now=morning)
    assert s2.submitted == 5
    rep = collect(engine, "camp")
    held = {(h["rule"], h["outcome"]): h["count"] for h in rep.held}
    assert held == {("quiet_hours", "deferred, then sent"): 5, ("opted_out", "held back"): 1}
    assert "Held back by contact policy" in rep.markdown()
