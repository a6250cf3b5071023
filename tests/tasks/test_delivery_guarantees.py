"""Delivery guarantees against the real Kannel + SMPP simulator.

- Crash test: a 2,000-message campaign, the sending process killed with SIGKILL at 20 random
  moments and restarted each time; the SMSC simulator must count every message exactly once.
- The dangerous window (Kannel accepted, we died before recording it) is closed by our reference
  travelling in the dlr-url: the callback service stores the receipt, recovery settles the message
  from it, and a message with no trace waits ``evidence_grace_s`` before it may be sent again.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import text

from store.db import bulk_insert, get_engine, utcnow
from tasks.policy import always_open
from tests.helpers import served_in_thread, wait_for
from tests.e2e.test_kannel import PASSWORD, kannel  # noqa: F401 - the module-scoped stack fixture

N = 2000
KILLS = 20


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The callback service (uvicorn, in this process) writing receipts into the test store. The
    gateways here are unsaved Blocks (named 'kannelgateway'): their callback secret comes from the
    environment, which the sender subprocesses inherit."""
    from service.app import create_app

    monkeypatch.setenv("SMSFLOW_CALLBACK_SECRET_KANNELGATEWAY", "dg-secret")

    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    with served_in_thread(create_app(url, emit_events=False)) as base:
        yield url, f"{base}/callbacks/kannel/dlr"


def _campaign(url: str, name: str = "crash", n: int = N, phone=lambda i: f"+7916{i:05d}12",
              body=lambda ref: f"Скидка 10% [ref:{ref}]", encoding: str = "UCS-2") -> int:
    """A planned campaign of ``n`` messages whose texts carry their reference for the simulator."""
    engine = get_engine(url)
    now = utcnow()
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [(name, str(i), phone(i), True, "valid") for i in range(n)])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES (:n, :n, 'all', 't', 'marketing', 0, 'running', :p)"),
                  {"n": name, "p": always_open().model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar()
        ids = [r[0] for r in c.execute(text("SELECT id FROM contacts WHERE source = :n ORDER BY id"), {"n": name})]
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"{name}-{i}", cid, ct, "main", phone(i), body(f"{name}-{i}"), encoding, 1, 0, "planned", 0, now, now)
                     for i, ct in enumerate(ids)])
    return cid


def _states(url: str) -> dict[str, int]:
    with get_engine(url).begin() as c:
        return dict(c.execute(text("SELECT state, COUNT(*) FROM outbox GROUP BY state")).fetchall())


def test_kill_9_at_20_random_points_loses_nothing_and_doubles_nothing(kannel, service):  # noqa: F811
    url, dlr_url = service
    cid = _campaign(url)
    before = kannel.stats()["submit_sm"]
    gw_opts = dict(sendsms_url=f"http://127.0.0.1:{kannel.sendsms_port}/cgi-bin/sendsms", username="smsflow",
                   password=PASSWORD, dlr_url=dlr_url, sender_id="SMSFLOW", timeout_s=5, evidence_grace_s=3,
                   batch_size=50, concurrency=8)
    env = dict(os.environ, CRASH_GATEWAY=json.dumps(gw_opts))
    rnd = random.Random(20261125)
    kills = 0
    # the senders killed run 6.55 s in all (the seed's 20 waits); at 250 msg/s they can send at most ~1,640 of the
    # 2,000 messages, so every kill lands while messages are left (at 400 msg/s a fast machine sent them all
    # before the 19th kill)
    for _ in range(KILLS * 3):
        if kills == KILLS or _states(url).get("planned", 0) + _states(url).get("queued", 0) == 0:
            break
        p = subprocess.Popen([sys.executable, "-m", "tests.workers.crash_sender", url, str(cid), "250"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(rnd.uniform(0.05, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(30)
    assert kills == KILLS, f"only {kills} kills landed while sending"
    # the last run: repeat until everything is settled (in-flight messages wait for evidence first)
    deadline = time.monotonic() + 120
    while True:
        st = _states(url)
        if st.get("planned", 0) + st.get("queued", 0) == 0:
            break
        assert time.monotonic() < deadline, st
        r = subprocess.run([sys.executable, "-m", "tests.workers.crash_sender", url, str(cid), "400"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        time.sleep(1)
    # every message reached the SMSC exactly once
    refs = {f"crash-{i}" for i in range(N)}
    end = time.monotonic() + 60
    while True:
        stats = kannel.stats(detail=True)
        if refs <= set(stats["by_ref"]) or time.monotonic() > end:
            break
        time.sleep(0.5)
    counts = {r: stats["by_ref"].get(r, 0) for r in refs}
    lost = sorted(r for r, n in counts.items() if n == 0)
    doubled = {r: n for r, n in counts.items() if n > 1}
    if lost:
        with get_engine(url).begin() as c:
            rows = c.execute(text("SELECT idempotency_key, state, attempts, error_code, last_error FROM outbox "
                                  "WHERE idempotency_key IN :k").bindparams(__import__("sqlalchemy").bindparam("k", expanding=True)),
                             {"k": lost[:10]}).fetchall()
        print("LOST sample:", rows, "of", len(lost), file=sys.stderr)
    assert not lost and not doubled, (len(lost), doubled)
    assert stats["submit_sm"] - before == N
    # and the outbox agrees: nothing planned, queued or failed
    from tasks.reconcile import apply_receipts

    wait_for(lambda: apply_receipts(get_engine(url)) is not None and _states(url).get("submitted", 0) == 0, "final receipts", 60)
    st = _states(url)
    assert st.get("failed", 0) == 0 and sum(st.values()) == N, st


def test_kannel_down_for_60_s_mid_campaign(kannel, service):  # noqa: F811
    """smsbox and bearerbox stopped for 60 s while a campaign is sending: the breaker backs off,
    nothing is marked failed, every message reaches the SMSC after recovery, none twice."""
    from blocks.kannel import KannelGateway
    from tasks.reconcile import apply_receipts
    from smsflow.ratelimit import TokenBucket
    from tasks.send import CircuitBreaker, send_messages

    url, dlr_url = service
    n = 600
    engine = get_engine(url)
    cid = _campaign(url, "outage", n, phone=lambda i: f"+7917{i:05d}21", body=lambda ref: f"Hello [ref:{ref}]",
                    encoding="GSM-7")
    gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{kannel.sendsms_port}/cgi-bin/sendsms", username="smsflow",
                       password=PASSWORD, dlr_url=dlr_url, sender_id="SMSFLOW", timeout_s=5, batch_size=20,
                       evidence_grace_s=10)
    result: dict = {}

    def sender():
        try:
            result["stats"] = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(40), claimer="o",
                                            max_messages=n, breaker=CircuitBreaker(cap_s=8))
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    th = threading.Thread(target=sender)
    th.start()
    time.sleep(4)
    r = kannel.run("stop.sh", "smsbox", "bearerbox")
    assert r.returncode == 0, r.stderr
    stopped_at = time.monotonic()
    mid = _states(url)
    assert mid.get("planned", 0) > 0  # the outage really fell mid-campaign
    time.sleep(60)
    assert th.is_alive()  # still waiting on the breaker, not crashed
    assert _states(url).get("failed", 0) == 0
    r = kannel.run("start.sh")
    assert r.returncode == 0, r.stderr[-1500:]
    th.join(180)
    assert not th.is_alive() and "error" not in result, result
    stats = result["stats"]
    # requests in flight when smsbox died got no answer: in doubt, kept 'queued', never resent blindly
    # a request refused at connect time (smsbox already gone) was never sent: back to 'planned'
    # (retry_later) and sent by the next run, as max_messages counted its first claim
    assert stats.outages >= 3 and stats.submitted + stats.in_doubt + stats.retry_later == n, vars(stats)
    replanned = 0
    if stats.in_doubt or stats.retry_later:
        # the next send run: recovery settles the ones the SMSC has (their receipts name our reference)
        # and sends again only what has no trace after evidence_grace_s
        from tasks.send import recover_in_flight

        time.sleep(3)  # receipts of the in-doubt ones that did reach the SMSC
        settled, replanned = recover_in_flight(engine, cid, gw, "o-rerun")
        assert settled + replanned == stats.in_doubt, (settled, replanned, vars(stats))
        again = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(40), claimer="o-rerun",
                              max_messages=n)
        assert again.submitted == replanned + stats.retry_later, vars(again)
    refs = {f"outage-{i}" for i in range(n)}
    end = time.monotonic() + 60
    while True:
        st = kannel.stats(detail=True)
        if refs <= set(st["by_ref"]) or time.monotonic() > end:
            break
        time.sleep(0.5)
    counts = {r: st["by_ref"].get(r, 0) for r in refs}
    assert [r for r, c in counts.items() if c == 0] == []  # none lost
    # None twice, except what the design allows: a request in flight when smsbox died that bearerbox did
    # forward, whose receipt then died with bearerbox's in-memory dlr-storage, leaves no trace, so after
    # evidence_grace_s recovery sends it again (at most `replanned` of them; use redis/pgsql dlr-storage
    # in production, README "Gateways"). Everything that had an answer reached the SMSC exactly once.
    twice = sorted(r for r, c in counts.items() if c > 1)
    assert len(twice) <= replanned and all(counts[r] == 2 for r in twice), (twice, replanned)
    # Receipts for the few messages in flight when bearerbox died are lost with its internal
    # dlr-storage (use redis/pgsql dlr-storage in production): those stay 'submitted' until TTL
    # expiry. Everything else gets its final receipt.
    end = time.monotonic() + 30
    while time.monotonic() < end and _states(url).get("submitted", 0) > 0:
        apply_receipts(engine)
        time.sleep(1)
    final = _states(url)
    assert final.get("failed", 0) == 0 and final.get("delivered", 0) + final.get("submitted", 0) == n, final
    assert final.get("submitted", 0) <= gw.batch_size * 2, final
    print(f"outage: {time.monotonic() - stopped_at:.0f}s from stop to done, {stats.outages} failed tries, "
          f"{final.get('submitted', 0)} receipts lost with bearerbox")


def test_pipelined_send_keeps_caps_for_contacts_in_flight_and_leaves_nothing_behind(tmp_path):
    """The send loop claims batch k+1 while batch k is being submitted and before it is recorded.
    A contact with messages in consecutive batches must still get no more than its frequency cap
    allows (the cap counts recorded submits), and the messages skipped for that reason must still
    be claimed before the loop ends."""
    from blocks.gateway import SandboxGateway
    from tasks.policy import ContactPolicy, FrequencyCap
    from smsflow.ratelimit import TokenBucket
    from tasks.send import send_messages
    from tests.helpers import DAYTIME

    engine = get_engine(f"sqlite:///{tmp_path / 'store.sqlite'}")
    policy = ContactPolicy(caps=[FrequencyCap(period="day", limit=1)])
    now = utcnow()
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [("cap", str(i), f"+79160000{i:03d}", True, "valid") for i in range(3)])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES ('cap', 'cap', 'all', 't', 'marketing', 0, 'running', :p)"),
                  {"p": policy.model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = 'cap'")).scalar()
        contacts = [r[0] for r in c.execute(text("SELECT id FROM contacts ORDER BY id"))]
        # three steps per contact, interleaved: every batch of two holds two contacts, consecutive batches share one
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"cap-{s}-{k}", cid, ct, f"s{s}", f"+79160000{k:03d}", "hi", "GSM-7", 1, 0, "planned", 0, now, now)
                     for s in range(3) for k, ct in enumerate(contacts)])
    gw = SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), rejected_rate=0, min_delay_s=0, max_delay_s=0,
                        batch_size=2)
    stats = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="p",
                          max_messages=100, now=DAYTIME)
    assert stats.submitted == 3 and stats.held == {"cap_day": 6}, vars(stats)
    with engine.begin() as c:
        per_contact = dict(c.execute(text("SELECT contact_id, COUNT(*) FROM outbox WHERE submitted_at IS NOT NULL "
                                          "GROUP BY contact_id")).fetchall())
        left = c.execute(text("SELECT COUNT(*) FROM outbox WHERE state IN ('planned', 'queued')")).scalar()
    assert per_contact == {ct: 1 for ct in contacts}
    assert left == 0
    assert set(gw.sent_count_by_reference().values()) == {1}
