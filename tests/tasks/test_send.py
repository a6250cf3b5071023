"""tasks/send.py (claims, the send loop, recovery, the breaker) and smsflow/ratelimit.py."""
from __future__ import annotations

from datetime import datetime
from typing import ClassVar

import pytest
from sqlalchemy import text

from blocks.gateway import SandboxGateway
from store.db import utcnow
from tasks.accounting import ensure_campaign
from tasks.render import plan_messages
from tasks.segment import ALL, build_membership
from tests.helpers import load_csv
from tasks.policy import always_open
from smsflow.ratelimit import TokenBucket
from tasks.send import claim, recover_in_flight, send_messages
from tests.pipeline import TPL, _base, _gw, _planned, q


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


def test_claims_start_small_and_grow_to_the_batch_size(engine, tmp_path, monkeypatch):
    """The first claim cannot overlap anything, so it is small; each later one (claimed while the
    previous batch is sent) up to RAMP times larger, capped by the gateway's batch_size."""
    import tasks.send as send_mod

    monkeypatch.setattr(send_mod, "FIRST_CLAIM", 3)
    monkeypatch.setattr(send_mod, "RAMP", 2)
    limits: list[int] = []
    real = send_mod.claim_columns

    def spy(engine_, campaign_id, limit, *a, **kw):
        limits.append(limit)
        return real(engine_, campaign_id, limit, *a, **kw)

    monkeypatch.setattr(send_mod, "claim_columns", spy)
    cid, _ = _planned(engine, tmp_path, 30)
    gw = _gw(tmp_path, rejected_rate=0.0, batch_size=10)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="t", max_messages=10_000)
    assert stats.submitted == 30 and set(gw.sent_count_by_reference().values()) == {1}
    assert limits[:4] == [3, 6, 10, 10] and set(limits[4:]) == {10}, limits  # then what is left (1), then nothing


def test_claims_follow_a_cursor_and_look_again_from_the_start_before_the_run_ends(engine, tmp_path, monkeypatch):
    """Each claim of a run takes only ids past the greatest it took before (so a claim of a long campaign
    reads about its limit of rows, whatever index the database picks); what the cursor passed by (here a
    message throttled once, planned again below it) is claimed from the start before the run ends."""
    import tasks.send as send_mod
    from blocks.gateway import SubmitResult

    monkeypatch.setattr(send_mod, "FIRST_CLAIM", 10)
    monkeypatch.setattr(send_mod, "RAMP", 1)
    seen: list[tuple[int, list[int], int]] = []
    real = send_mod.claim_columns

    def spy(*a, **kw):
        df = real(*a, **kw)
        seen.append((kw.get("after", 0), sorted(int(i) for i in df["id"]), df.attrs["last_id"]))
        return df

    monkeypatch.setattr(send_mod, "claim_columns", spy)
    cid, _ = _planned(engine, tmp_path, 30)
    first = q(engine, f"SELECT MIN(id) FROM outbox WHERE campaign_id = {cid}")
    throttled: list[str] = []

    plain = SandboxGateway.submit

    def throttles_once(self, messages):
        if throttled:
            return plain(self, messages)
        throttled.append(messages[0].reference)  # the run's first message: planned again, below the cursor
        return [SubmitResult(messages[0].reference, False, None, "THROTTLED", "slow down", transient=True),
                *plain(self, messages[1:])]

    monkeypatch.setattr(SandboxGateway, "submit", throttles_once)
    gw = _gw(tmp_path, rejected_rate=0.0, batch_size=10)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="t", max_messages=10_000)
    assert stats.submitted == 30 and stats.retry_later == 1
    assert set(gw.sent_count_by_reference().values()) == {1} and len(gw.sent_count_by_reference()) == 30
    assert [after for after, _ids, _last in seen[:3]] == [0, first + 9, first + 19]
    for after, ids, last in seen:
        assert all(i > after for i in ids) and last == (max(ids) if ids else after)
    # past the last id nothing is left: the next claim starts again from 0 and takes the throttled one
    again = q(engine, f"SELECT id FROM outbox WHERE idempotency_key = '{throttled[0]}'")
    assert (seen[3][0], seen[3][1]) == (first + 29, []) and (seen[4][0], seen[4][1]) == (0, [again])
    assert seen[-1][1] == []


def test_claim_after_takes_only_later_ids_and_reports_the_last_one_policy_blocked_included(engine, tmp_path):
    cid, _ = _planned(engine, tmp_path, 12)
    with engine.begin() as c:
        ids = [int(r[0]) for r in c.execute(text(f"SELECT id FROM outbox WHERE campaign_id = {cid} ORDER BY id"))]
    with engine.begin() as c:  # the two last messages' contacts opted out: held back at the claim
        c.execute(text(f"UPDATE contacts SET opted_out_at = CURRENT_TIMESTAMP WHERE id IN "
                       f"(SELECT contact_id FROM outbox WHERE id IN ({ids[-1]}, {ids[-2]}))"))
    got = claim(engine, cid, 100, "t", after=ids[5])
    assert sorted(int(i) for i in got["id"]) == ids[6:-2]
    assert got.attrs["last_id"] == ids[-1] and got.attrs["policy_blocked"] == 2
    assert claim(engine, cid, 100, "t", after=ids[-1]).attrs["last_id"] == ids[-1]
    assert sorted(int(i) for i in claim(engine, cid, 100, "t")["id"]) == ids[:6]


class _StreamingSandbox(SandboxGateway):
    """A sandbox that takes more parts while it runs (as KannelGateway does), and hands a part's results
    over only after it has taken the next part: the part before is still 'in flight' meanwhile."""

    streams_results: ClassVar[bool] = True
    takes_more: ClassVar[bool] = True

    def submit(self, messages, on_results=None, more=None):
        CALLS.append(len(messages))
        out, part = [], list(messages)
        while part:
            results = super().submit(part)
            part = more() if more is not None else []
            on_results(results)
            out += results
        return out


CALLS: list[int] = []


def test_a_streaming_gateway_sends_every_batch_in_one_call_and_caps_see_messages_in_flight(engine, tmp_path, monkeypatch):
    """Parts of later batches go to the running submit call (``more``), and a claim made while earlier
    results are not yet recorded skips those contacts: with a cap of one a day, a contact's second message
    (claimed two batches after the first) is held back, not sent; each message is sent at most once."""
    import tasks.send as send_mod
    from store.db import bulk_insert
    from tasks.policy import FrequencyCap

    monkeypatch.setattr(send_mod, "FIRST_CLAIM", 2)
    monkeypatch.setattr(send_mod, "RAMP", 2)
    CALLS.clear()
    policy = always_open().model_copy(update={"caps": [FrequencyCap(period="day", limit=1)]})
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [("stream", str(i), f"+7916555{i:04d}", True, "valid") for i in range(10)])
        ids = [r[0] for r in c.execute(text("SELECT id FROM contacts WHERE source = 'stream' ORDER BY id"))]
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES ('stream', 'stream', 'all', 't', 'marketing', 0, 'running', :p)"),
                  {"p": policy.model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = 'stream'")).scalar()
        # ids 1-2: A of contacts 0-1 (batch 1); 3-6: A of contacts 2-5 (batch 2); then B of contacts 0-1
        # (batch 3, claimed while batch 1's results are still in flight), then the rest
        order = [("A", k) for k in range(6)] + [("B", 0), ("B", 1)] + [("A", k) for k in range(6, 10)]
        now = utcnow()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text",
                                  "encoding", "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"s{cid}-{step}{k}", cid, ids[k], step, f"+7916555{k:04d}", "hi", "GSM-7", 1, 0, "planned", 0,
                      now, now) for step, k in order])
    gw = _StreamingSandbox(state_path=str(tmp_path / "gw.sqlite"), min_delay_s=0.0, max_delay_s=0.0, rejected_rate=0.0,
                           batch_size=4)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="s", max_messages=100)
    assert CALLS == [2]  # one call: every later part was taken by the running call
    assert set(gw.sent_count_by_reference().values()) == {1}
    with engine.begin() as c:
        rows = c.execute(text("SELECT contact_id, state, hold_rule FROM outbox WHERE campaign_id = :c"), {"c": cid}).fetchall()
    sent = [r[0] for r in rows if r[1] == "submitted"]
    assert sorted(sent) == sorted(ids) and stats.submitted == 10  # one each: the cap held the second back
    assert sorted(r[2] for r in rows if r[1] != "submitted") == ["cap_day", "cap_day"], rows


def test_campaigns_to_send_probes_each_campaign_instead_of_reading_the_whole_outbox(engine):
    """The scheduled send lists the campaigns with messages due (planned, window open) or left by a dead
    sender (queued, claim expired), not those with only future, live or finished ones; through the
    (campaign_id, state) index on both stores, not by reading every outbox row."""
    from datetime import timedelta

    from store.db import bulk_insert, is_postgres
    from tasks.send import campaigns_to_send
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    now = utcnow()
    kinds = {"due": ("planned", None, None), "later": ("planned", now + timedelta(hours=2), None),
             "dead": ("queued", None, now - timedelta(minutes=1)), "live": ("queued", None, now + timedelta(minutes=1)),
             "done": ("delivered", None, None)}
    with engine.begin() as c:
        pg = is_postgres(c)
        ids = {}
        for name in kinds:
            c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                           "VALUES (:n, 's', 'all', 't', 'marketing', 0, 'running')"), {"n": name})
            ids[name] = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "step", "phone_e164", "text", "encoding", "segments",
                                  "cost", "state", "attempts", "planned_at", "updated_at", "send_after", "claim_expires_at"),
                    [(f"k-{name}", ids[name], "main", "+7916", "hi", "GSM-7", 1, 0, st, 0, now, now, after, exp)
                     for name, (st, after, exp) in kinds.items()])
        c.execute(text(f"INSERT INTO outbox (idempotency_key, campaign_id, step, phone_e164, text, encoding, segments, cost, "
                       f"state, attempts, planned_at, updated_at) SELECT 'd' || n, :d, 'main', '+7916', 'hi', 'GSM-7', 1, 0, "
                       f"'delivered', 1, :t, :t FROM ({numbers_sql(pg, 20000)}) AS q"), {"d": ids["done"], "t": now})
    analyze(engine, "outbox")
    with statements_run(engine) as seen:
        got = campaigns_to_send(engine, None, now)
    assert [name for _id, name, _gw in got] == ["due", "dead"]
    (stmt, params), = [(s, p) for s, p in seen if "outbox" in s]
    plan = plan_of(engine, stmt, params)
    assert "ix_outbox_campaign_state" in plan and "Seq Scan on outbox" not in plan and "SCAN o " not in plan + " ", plan


def test_the_send_loop_keeps_the_heap_out_of_full_collections_only_while_it_sends(engine, tmp_path, monkeypatch):
    """While a send runs, the objects alive at its start are frozen (``gc.freeze``: full collections skip
    them); afterwards, also after an error, the collector sees them again. A freeze made by someone else is
    left as it was."""
    import gc

    seen: list[int] = []
    plain = SandboxGateway.submit

    def counting(self, messages):
        seen.append(gc.get_freeze_count())
        return plain(self, messages)

    monkeypatch.setattr(SandboxGateway, "submit", counting)
    cid, _ = _planned(engine, tmp_path, 5)
    assert gc.get_freeze_count() == 0
    stats = send_messages(engine, campaign_id=cid, gateway=_gw(tmp_path, rejected_rate=0.0), bucket=TokenBucket(10_000),
                          claimer="t", max_messages=10_000)
    assert stats.submitted == 5 and seen and min(seen) > 0, seen
    assert gc.get_freeze_count() == 0

    def failing(self, messages):
        seen.append(gc.get_freeze_count())
        raise RuntimeError("boom")

    def replan() -> None:
        with engine.begin() as c:
            c.execute(text("UPDATE outbox SET state = 'planned', claimed_by = NULL WHERE campaign_id = :c"), {"c": cid})

    monkeypatch.setattr(SandboxGateway, "submit", failing)
    replan()
    seen.clear()
    with pytest.raises(RuntimeError):
        send_messages(engine, campaign_id=cid, gateway=_gw(tmp_path, rejected_rate=0.0), bucket=TokenBucket(10_000),
                      claimer="t2", max_messages=10_000)
    assert seen and min(seen) > 0 and gc.get_freeze_count() == 0
    replan()
    gc.freeze()  # someone else's freeze: kept as it was
    try:
        frozen = gc.get_freeze_count()
        with pytest.raises(RuntimeError):
            send_messages(engine, campaign_id=cid, gateway=_gw(tmp_path, rejected_rate=0.0), bucket=TokenBucket(10_000),
                          claimer="t3", max_messages=10_000)
        assert frozen > 0 and gc.get_freeze_count() > 0  # (frozen objects freed meanwhile leave the count)
    finally:
        gc.unfreeze()
