"""Journeys end to end: a REAL Prefect server (prefect.yaml deployed, the journey deployment's
event trigger as an automation), a process worker, the webhook service (`smsflow serve`) and
the sandbox gateway. Nothing in this process talks to Prefect; it only signs and POSTs CRM
webhooks, reads the store and asks the server's REST API about flow runs.

The worker's journeys directory is a copy of journeys/order_lifecycle.yaml with two changes a
test needs: the review waits 75 s instead of 7 days, and the contact policy is open around
the clock (CI runs at any hour; quiet windows are tested in tests/tasks/test_journeys.py).

Phases (several orders at once, so few flow runs are needed):
1. order.created for X, Y, Z (X's webhook delivered twice) -> three confirmations, one each.
2. packed for X and Y, delivered for Z -> two "packed" messages; Z's review becomes a scheduled
   wake-up run of the journey deployment (a Scheduled flow run on the server, nothing sleeps).
3. shipped (with tracking) for X, cancelled for Y, returned for Z -> X's "shipped" carries the
   tracking number; Y and Z exit; Z's wake-up run is Cancelled on the server.
4. shipped for Y (after its cancel) and delivered for X -> nothing for Y; X's review goes out
   when its wake-up run fires.
Finally: every outbox key once, exactly the expected steps per order, no crm_event unprocessed.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time

import httpx
import pytest
import yaml

from tests.helpers import contact, free_ports, load_csv, write_csv
from tests.prefect_stack import POOL, PREFECT, REPO_ROOT, TIMINGS, Proc, _cli, _tail

pytestmark = pytest.mark.prefect_server

SECRET = "e2e-webhook-secret"
WAIT = 150.0  # seconds for a phase (event -> automation -> worker -> flow run -> outbox)
REVIEW_DELAY_S = 75  # long enough that the cancel of phase 3 always lands before the wake-up


@pytest.fixture(scope="module")
def stack(server, deployed, tmp_path_factory):
    base = tmp_path_factory.mktemp("journey-e2e")
    data, jdir = base / "data", base / "journeys"
    data.mkdir()
    jdir.mkdir()
    spec = yaml.safe_load((REPO_ROOT / "journeys" / "order_lifecycle.yaml").read_text(encoding="utf-8"))
    for step in spec["steps"]:
        if step["name"] == "review":
            step["delay"] = f"{REVIEW_DELAY_S}s"
    open_all_day = {"start": "00:00:00", "end": "23:59:59.999999", "skip_holidays": False}
    spec["policy"] = {"marketing_window": open_all_day, "transactional_window": open_all_day}
    (jdir / "order_lifecycle.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")

    env = server.env(SMSFLOW_DATA_DIR=str(data), SMSFLOW_JOURNEYS_DIR=str(jdir))
    _cli([sys.executable, "-c", "from blocks.gateway import SandboxGateway\n"
          "SandboxGateway(min_delay_s=0.1, max_delay_s=1.0, rejected_rate=0, undelivered_rate=0, expired_rate=0)"
          ".save('sandbox', overwrite=True)\n"], env, cwd=base)
    from store.db import dispose_engines, get_engine

    store_url = f"sqlite:///{data / 'smsflow.sqlite'}"
    load_csv(get_engine(store_url), write_csv(base / "crm.csv", [contact(1, id="K1"), contact(3, id="K3")]),
             source="shop")  # K3 speaks English
    dispose_engines()

    (port,) = free_ports(1)
    svc = Proc("service", [sys.executable, "-c", "from smsflow.cli import main; main()", "serve", "--port", str(port)],
               dict(env, SMSFLOW_WEBHOOK_SECRET_SHOP=SECRET), base, base / "service.log")
    worker = Proc("worker", [*PREFECT, "worker", "start", "--pool", POOL],
                  dict(env, PREFECT_WORKER_QUERY_SECONDS="2"), base, base / "worker.log")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not svc.alive() or time.monotonic() > deadline:
                pytest.fail(f"webhook service did not start:\n{_tail(svc.log)}")
            time.sleep(0.3)
        yield {"url": url, "db": data / "smsflow.sqlite", "service": svc, "worker": worker}
    finally:
        svc.stop(signal.SIGTERM, grace=10)
        worker.stop(signal.SIGINT, grace=20)


def _post(stack, events: list[dict]) -> dict:
    from service.webhooks import sign

    body = json.dumps(events, ensure_ascii=False).encode()
    ts = str(int(time.time()))
    r = httpx.post(f"{stack['url']}/webhooks/generic/shop", content=body, timeout=30, headers={
        "Content-Type": "application/json", "X-Smsflow-Timestamp": ts, "X-Smsflow-Signature": sign(SECRET, ts, body)})
    assert r.status_code == 200, r.text
    return r.json()


def _q(stack, sql: str, *args):
    with sqlite3.connect(stack["db"], timeout=30) as db:
        return db.execute(sql, args).fetchall()


def _messages(stack) -> dict[tuple[str, str], dict]:
    rows = _q(stack, "SELECT idempotency_key, step, state, text FROM outbox WHERE idempotency_key LIKE 'journey:%'")
    out = {}
    for key, step, state, body in rows:
        entity = key.split(":")[3]
        out[(entity, step)] = {"state": state, "text": body, "key": key}
    return out


def _wait(stack, server, what: str, cond, timeout: float = WAIT):
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                TIMINGS[what] = time.monotonic() - t0
                return
        except sqlite3.OperationalError:  # the store is created by the first flow run
            pass
        if time.monotonic() - t0 > timeout:
            runs = server.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 10})
            states = [(r["name"], r["state_type"], r.get("state_name")) for r in runs]
            pytest.fail(f"timed out waiting for: {what}\noutbox: {_messages(stack)}\nruns: {states}\n"
                        f"--- worker log\n{_tail(stack['worker'].log, 60)}\n--- service log\n{_tail(stack['service'].log, 20)}")
        time.sleep(1)


def _sent(msgs, entity, step) -> bool:
    m = msgs.get((entity, step))
    return m is not None and m["state"] in ("submitted", "delivered")


def _all_processed(stack) -> bool:
    return _q(stack, "SELECT COUNT(*) FROM crm_events WHERE processed_at IS NULL")[0][0] == 0


def _wake_runs(server) -> list[dict]:
    return [r for r in server.post("/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["journey-wake"]}}})]


def test_order_journeys_end_to_end(server, deployed, stack):
    assert "journey/crm-events" in deployed
    ev = lambda i, t, e, **kw: {"id": i, "type": t, "entity_id": e, **kw}  # noqa: E731

    # 1. three orders; X's webhook is delivered twice (a CRM retry)
    created_x = ev("e1", "order.created", "X", contact_id="K1", order_id="X", amount=1990)
    assert _post(stack, [created_x, ev("e2", "order.created", "Y", contact_id="K1", order_id="Y"),
                         ev("e3", "order.created", "Z", contact_id="K3", order_id="Z")]) == {"received": 3, "new": 3}
    assert _post(stack, [created_x]) == {"received": 1, "new": 0}
    _wait(stack, server, "confirmations", lambda: all(_sent(_messages(stack), o, "confirmation") for o in "XYZ"))
    msgs = _messages(stack)
    assert "1990" in msgs[("X", "confirmation")]["text"] and msgs[("Z", "confirmation")]["text"].startswith("Order Z")

    # 2. packed X and Y; Z delivered at once -> its review waits as a scheduled wake-up run
    _post(stack, [ev("e4", "order.status_changed", "X", status="packed"),
                  ev("e5", "order.status_changed", "Y", status="packed"),
                  ev("e6", "order.status_changed", "Z", status="delivered")])
    _wait(stack, server, "packed", lambda: _sent(_messages(stack), "X", "packed") and _sent(_messages(stack), "Y", "packed"))
    _wait(stack, server, "Z review scheduled", lambda: _q(
        stack, "SELECT s.wake_run_id FROM journey_steps s JOIN journey_instances i ON i.id = s.instance_id "
               "WHERE i.entity_id = 'shop:Z' AND s.step = 'review' AND s.wake_run_id IS NOT NULL"), timeout=60)
    (z_wake,) = _q(stack, "SELECT s.wake_run_id FROM journey_steps s JOIN journey_instances i ON i.id = s.instance_id "
                          "WHERE i.entity_id = 'shop:Z' AND s.step = 'review'")[0]
    assert server.get(f"/flow_runs/{z_wake}")["state_type"] in ("SCHEDULED", "PENDING")

    # 3. X shipped with its tracking number; Y cancelled; Z returned before its review
    _post(stack, [ev("e7", "order.status_changed", "X", status="shipped", tracking="RA123456789RU"),
                  ev("e8", "order.cancelled", "Y"),
                  ev("e9", "order.status_changed", "Z", status="returned")])
    _wait(stack, server, "shipped + exits", lambda: _sent(_messages(stack), "X", "shipped") and _q(
        stack, "SELECT COUNT(*) FROM journey_instances WHERE status = 'exited'")[0][0] == 2)
    assert "RA123456789RU" in _messages(stack)[("X", "shipped")]["text"]
    _wait(stack, server, "Z wake-up cancelled", lambda: server.get(f"/flow_runs/{z_wake}")["state_type"] == "CANCELLED",
          timeout=30)

    # 4. a late event for the cancelled order; X delivered -> its review after REVIEW_DELAY_S
    _post(stack, [ev("e10", "order.status_changed", "Y", status="shipped", tracking="NOPE"),
                  ev("e11", "order.status_changed", "X", status="delivered")])
    _wait(stack, server, "X review (wake-up run)", lambda: _sent(_messages(stack), "X", "review"), timeout=WAIT + 120)
    assert _all_processed(stack)

    msgs = _messages(stack)
    assert sorted(msgs) == sorted([("X", "confirmation"), ("X", "packed"), ("X", "shipped"), ("X", "review"),
                                   ("Y", "confirmation"), ("Y", "packed"), ("Z", "confirmation")]), sorted(msgs)
    keys = [r[0] for r in _q(stack, "SELECT idempotency_key FROM outbox")]
    assert len(keys) == len(set(keys))
    # the sandbox gateway saw each message once
    assert _q(stack, "SELECT COUNT(*) FROM outbox WHERE idempotency_key LIKE 'journey:%' AND submitted_at IS NOT NULL")[0][0] == 7
    status = dict(_q(stack, "SELECT entity_id, status FROM journey_instances"))
    assert status == {"shop:X": "completed", "shop:Y": "exited", "shop:Z": "exited"}, status
    # X's review had its own wake-up run; it ends COMPLETED (it may find the step already planned
    # by an event-triggered run that waited for the journey-runs lease: nothing twice)
    (x_wake, due, planned), = _q(
        stack, "SELECT s.wake_run_id, s.due_at, o.planned_at FROM journey_steps s JOIN journey_instances i "
               "ON i.id = s.instance_id JOIN outbox o ON o.idempotency_key = s.outbox_key "
               "WHERE i.entity_id = 'shop:X' AND s.step = 'review'")
    assert planned >= due  # never before the delay
    assert x_wake and x_wake != z_wake
    _wait(stack, server, "X wake-up run completed",
          lambda: server.get(f"/flow_runs/{x_wake}")["state_type"] == "COMPLETED", timeout=WAIT)
    assert server.get(f"/flow_runs/{z_wake}")["state_type"] == "CANCELLED"
    assert _q(stack, "SELECT COUNT(*) FROM outbox WHERE idempotency_key LIKE 'journey:%'")[0][0] == 7
    dep = deployed["journey/crm-events"]["id"]
    runs = server.post("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep]}}})
    # the trigger started runs of the journey deployment (event-triggered, not only wake-ups)
    assert sum(1 for r in runs if r["state_type"] == "COMPLETED" and (r["parameters"] or {}).get("event")) >= 3
