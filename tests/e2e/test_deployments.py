"""prefect.yaml against a REAL Prefect server, a process worker and the demo CRM.

What runs (all in subprocesses, nothing in this process talks to Prefect):

1. ``prefect server start`` on a free port with its own PREFECT_HOME (SQLite) in a tmp dir;
   the test FAILS (never skips) if it is not healthy within SERVER_START_TIMEOUT.
2. ``prefect work-pool create smsflow-pool --type process`` and
   ``prefect --no-prompt deploy --all`` from the repository root; every deployment, its
   schedule, work pool and pull step are checked through the REST API.
3. The demo blocks ("demo-crm", "sandbox") and a 200-contact demo CRM are saved into a tmp
   SMSFLOW_DATA_DIR; a worker is started OUTSIDE the repository (its cwd is a tmp dir: the
   pull step must find the code) with SMSFLOW_DATA_DIR in its environment, which its
   flow-run processes inherit.
4. ``prefect deployment run 'campaign/run-campaign' --param params=... --watch`` (the
   deployment's own default parameters, relative template path included, plus a pinned
   policy clock: see POLICY_NOW) must finish COMPLETED with every step's subflow COMPLETED,
   and the outbox in the tmp store must hold the campaign's messages, delivered ones among
   them, none left in flight. The two scheduled deployments that need no parameters
   (nightly report, 5-minute reconcile) are run once too, with their defaults.

The server's scheduler service is switched off (PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED
=false): the schedules are still stored and checked, but no scheduled reconcile/extract run
is created, so nothing but the runs this test starts reaches the worker.

Every subprocess is stopped in a fixture finalizer, also when the test fails: the server with
SIGTERM, the worker with SIGINT (its graceful stop), then, after a grace period,
SIGKILL for the process group and any flow-run process it left behind.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from zoneinfo import ZoneInfo

import pytest


pytestmark = pytest.mark.prefect_server

RUN_TIMEOUT = 150  # seconds for one deployment run, worker pick-up included

EXPECTED = {  # "flow/deployment" -> entrypoint
    "crm-extract/hourly-incremental": "flows/crm_extract.py:crm_extract",
    "reconcile/every-5-minutes": "flows/reconcile.py:reconcile",
    "report/nightly-metrics": "flows/report.py:report",
    "validate-and-dedup/revalidate-contacts": "flows/validate_and_dedup.py:validate_and_dedup",
    "segment/rebuild-segment": "flows/segment.py:segment",
    "render/plan-messages": "flows/render.py:render",
    "send/send-planned-now": "flows/send.py:send",
    "send/due-every-10-minutes": "flows/send.py:send",
    "campaign/run-campaign": "flows/campaign.py:campaign",
    "crm-writeback/write-back-to-crm": "flows/crm_writeback.py:crm_writeback",
    "journey/crm-events": "flows/journey.py:journey",
    "render-shard/render-shard": "flows/shards.py:render_shard",  # distributed mode (tests/e2e/test_cluster.py)
    "ab-decide/hourly": "flows/abtest.py:ab_decide",
}
FINAL_STATES = {"delivered", "undelivered", "expired", "rejected", "failed"}
# The policy clock for the campaign run: a Wednesday, not a Russian holiday, 09:00 UTC
# (11:00 in Kaliningrad .. 20:00 in Magadan: inside the 10:00-21:00 marketing window; the demo's
# London and Kamchatka contacts stay deferred, which the test accepts).
POLICY_NOW = "2026-11-25T09:00:00Z"


from tests.prefect_stack import POOL, PREFECT, REPO_ROOT, TIMINGS, Proc, _cli, _tail


@pytest.fixture(scope="module")
def data_dir(server, tmp_path_factory):
    """A tmp SMSFLOW_DATA_DIR with the demo CRM (200 contacts) and the demo blocks saved on the server."""
    d = tmp_path_factory.mktemp("smsflow-data")
    code = (
        "from blocks.crm import SqlCrm\n"
        "from blocks.gateway import SandboxGateway\n"
        "from smsflow.demo_crm import write_crm_sqlite\n"
        "from smsflow.settings import get_settings\n"
        "p = (get_settings().data_dir / 'demo_crm.sqlite').resolve()\n"
        "write_crm_sqlite(p, 200, seed=42)\n"
        "SqlCrm(url=f'sqlite:///{p}', source_name='demo-crm').save('demo-crm', overwrite=True)\n"
        "SandboxGateway(min_delay_s=0.1, max_delay_s=2.0).save('sandbox', overwrite=True)\n"
    )
    t0 = time.monotonic()
    _cli([sys.executable, "-c", code], server.env(SMSFLOW_DATA_DIR=str(d)), cwd=d)
    TIMINGS["demo CRM + blocks"] = time.monotonic() - t0
    assert (d / "demo_crm.sqlite").is_file()
    return d


@pytest.fixture(scope="module")
def worker(server, deployed, data_dir, tmp_path_factory):
    """`prefect worker start --pool smsflow-pool`, started outside the repository, with
    SMSFLOW_DATA_DIR in its environment (its flow-run processes inherit it)."""
    cwd = tmp_path_factory.mktemp("worker-cwd")
    env = server.env(SMSFLOW_DATA_DIR=str(data_dir), PREFECT_WORKER_QUERY_SECONDS="2")
    proc = Proc("worker", [*PREFECT, "worker", "start", "--pool", POOL], env, cwd, cwd / "worker.log")
    try:
        yield proc
    finally:
        proc.stop(signal.SIGINT, grace=20)


# ----------------------------------------------------------------------------- tests
def test_every_deployment_and_schedule(server, deployed):
    assert set(deployed) == set(EXPECTED), f"deployed: {sorted(deployed)}"
    # the UI served on a port other than 4200 finds its API (the README's order of commands)
    assert not server.api.startswith("http://127.0.0.1:4200")
    assert server.http.get(server.api.removesuffix("/api") + "/ui-settings").json()["api_url"] == server.api
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}]
    for key, entrypoint in EXPECTED.items():
        d = deployed[key]
        assert d["entrypoint"] == entrypoint, key
        assert d["work_pool_name"] == POOL, key
        # the pull step was resolved at deploy time to this clone's absolute path
        assert d["pull_steps"] == pull, (key, d["pull_steps"])
        assert "database_url" not in (d["parameters"] or {}), f"{key}: no store URL (secret) in prefect.yaml"
        assert not d["paused"], key

    def schedules(key):
        s = deployed[key]["schedules"]
        assert all(x["active"] for x in s), (key, s)
        return [x["schedule"] for x in s]

    on_demand = {"campaign/run-campaign", "validate-and-dedup/revalidate-contacts", "segment/rebuild-segment",
                  "render/plan-messages", "send/send-planned-now", "crm-writeback/write-back-to-crm",
                  "render-shard/render-shard"}
    for key in on_demand:
        assert schedules(key) == [], key
    assert len({k.split("/")[1] for k in EXPECTED}) == len(EXPECTED)  # names that tell the deployments apart

    (nightly,) = schedules("report/nightly-metrics")
    assert nightly.get("cron") == "0 2 * * *" and nightly.get("timezone") == "Europe/Moscow", nightly
    # a real IANA zone: 02:00 in Moscow (UTC+3, no DST) is 23:00 UTC the day before, all year
    for month in (1, 7):
        local = dt.datetime(2026, month, 15, 2, 0, tzinfo=ZoneInfo(nightly["timezone"]))
        assert local.astimezone(dt.timezone.utc).hour == 23

    (rec,) = schedules("reconcile/every-5-minutes")
    assert rec.get("interval") == 300 or rec.get("cron") == "*/5 * * * *", rec

    (due,) = schedules("send/due-every-10-minutes")
    assert due.get("interval") == 600, due

    (hourly,) = schedules("crm-extract/hourly-incremental")
    assert hourly.get("interval") == 3600 or hourly.get("cron") == "0 * * * *", hourly
    assert deployed["crm-extract/hourly-incremental"]["parameters"].get("full_refresh") in (None, False)

    (jw,) = schedules("journey/crm-events")  # catch-up for date/inactivity triggers and lost wake-ups
    assert jw.get("interval") == 600, jw
    journey = deployed["journey/crm-events"]
    automations = [a for a in server.post("/automations/filter")
                   if journey["id"] in json.dumps(a.get("actions"))]
    assert automations, "the journey deployment has no event trigger"
    trig = automations[0]["trigger"]
    assert trig.get("expect") == ["crm.*"] and trig.get("match", {}).get("prefect.resource.id") == "crm.*", trig
    assert automations[0]["enabled"]

    # journey runs take turns through a store lease: no deployment slot a killed run could keep for 300 s
    j = deployed["journey/crm-events"]
    assert not j.get("concurrency_limit") and not j.get("global_concurrency_limit"), j

    camp = deployed["campaign/run-campaign"]["parameters"]["params"]
    assert camp["name"] == "demo-campaign" and camp["template"] == "demo_promo", camp
    assert (REPO_ROOT / "templates" / f"{camp['template']}.yaml").is_file()
    # the UI's form: what a marketer fills in (templates by name, policy fields), no internal settings
    schema = deployed["campaign/run-campaign"]["parameter_openapi_schema"]
    assert list(schema["properties"]) == ["params"]  # no database_url
    form = schema["definitions"]["CampaignParams"]["properties"]
    assert {"demo_promo", "order_shipped"} <= set(form["template"]["enum"])
    assert form["policy"].get("$ref", "").endswith("/ContactPolicy") or "allOf" in form["policy"], form["policy"]


def _run(server, name: str, worker, *extra: str) -> tuple[str, float]:
    t0 = time.monotonic()
    res = _cli([*PREFECT, "deployment", "run", name, *extra, "--watch", "--watch-timeout", str(RUN_TIMEOUT)],
               server.env(), timeout=RUN_TIMEOUT + 60, check=False)
    took = time.monotonic() - t0
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout)
    assert m, f"no flow run id in:\n{res.stdout}\n{res.stderr}"
    run = server.get(f"/flow_runs/{m.group(1)}")
    state = (run.get("state") or {}).get("type")
    assert res.returncode == 0 and state == "COMPLETED", (
        f"{name} ended {state} (exit {res.returncode})\n--- cli\n{res.stdout[-4000:]}\n{res.stderr[-3000:]}\n"
        f"--- worker log\n{_tail(worker.log, 80)}")
    return m.group(1), took


def test_campaign_deployment_runs_on_a_worker(server, deployed, data_dir, worker):
    assert worker.alive(), _tail(worker.log)
    # The deployment's own default parameters (relative template path included), with one
    # addition: the policy clock. Marketing goes out 10:00-21:00 in the contact's local time and
    # not on Russian public holidays; at the real "now" (a night, a holiday) every message may
    # rightly be deferred. POLICY_NOW is inside the window for most demo time zones.
    params = dict(deployed["campaign/run-campaign"]["parameters"]["params"], now=POLICY_NOW)
    _, took = _run(server, "campaign/run-campaign", worker, "--param", f"params={json.dumps(params)}")
    TIMINGS["run campaign/run-campaign (--watch)"] = took

    # every step ran as a subflow of the campaign and completed
    runs = server.post("/flow_runs/filter")
    flows = {f["id"]: f["name"] for f in server.post("/flows/filter")}
    by_flow: dict[str, set[str]] = {}
    for r in runs:
        by_flow.setdefault(flows[r["flow_id"]], set()).add(r["state_type"])
    expected_flows = {k.split("/")[0] for k in EXPECTED} - {"crm-writeback", "journey", "render-shard",
                                                                "ab-decide"}  # not in an embedded campaign
    assert expected_flows <= set(by_flow), by_flow
    assert all(s == {"COMPLETED"} for s in by_flow.values()), by_flow

    # the outbox in the tmp store (the worker's SMSFLOW_DATA_DIR) got the campaign's messages
    store = data_dir / "smsflow.sqlite"
    assert store.is_file(), f"no store in {data_dir}: {sorted(p.name for p in data_dir.iterdir())}"
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT o.* FROM outbox o JOIN campaigns c ON c.id = o.campaign_id WHERE c.name = 'demo-campaign'")
        cols = [d[0] for d in rows.description]
        outbox = [dict(zip(cols, r)) for r in rows.fetchall()]
    states: dict[str, int] = {}
    for r in outbox:
        states[r["state"]] = states.get(r["state"], 0) + 1
    assert outbox, "no outbox rows for demo-campaign"
    assert states.get("delivered", 0) > 0, states  # submitted through the gateway, receipts reconciled
    # receipts came (the sandbox answers within 2 s, reconcile waits up to 30 s): what is not
    # final was deferred by the contact policy and is still planned, with the reason recorded
    assert set(states) <= FINAL_STATES | {"planned"}, f"messages left in flight: {states}"
    deferred = [r for r in outbox if r["state"] == "planned"]
    if deferred and "hold_rule" in cols:
        assert all(r.get("hold_rule") or r.get("send_after") for r in deferred), deferred[:3]
    assert list((data_dir / "reports").glob("report-demo-campaign-*.html"))


def test_scheduled_deployments_run_with_their_defaults(server, deployed, data_dir, worker):
    """The nightly report and the 5-minute reconcile, run once each (concurrently) as the
    scheduler would run them: no parameters given."""
    t0 = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [*PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", str(RUN_TIMEOUT)],
            env=server.env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL)
        for name in ("report/nightly-metrics", "reconcile/every-5-minutes", "ab-decide/hourly")
    }
    failures = []
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=RUN_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", out or "")
        state = server.get(f"/flow_runs/{m.group(1)}")["state_type"] if m else None
        if p.returncode != 0 or state != "COMPLETED":
            failures.append(f"{name}: exit {p.returncode}, state {state}\n{(out or '')[-3000:]}")
    TIMINGS["run nightly-metrics + every-5-minutes (parallel)"] = time.monotonic() - t0
    assert not failures, "\n".join(failures) + f"\n--- worker log\n{_tail(worker.log, 80)}"
    # the nightly report covers all campaigns: report-<timestamp>.html in the worker's data dir
    assert [p for p in (data_dir / "reports").glob("report-*.html") if re.fullmatch(r"report-\d{8}-\d{6}\.html", p.name)]


def _flow_run_pids(worker_pid: int, run_id: str) -> list[int]:
    """The processes running flow run ``run_id`` under the worker (their environment names it)."""
    from tests.helpers import descendants

    out = []
    for pid in descendants(worker_pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={run_id}".encode() in env:
            out.append(pid)
    return out


def _start_run(server, name: str, params: dict) -> str:
    res = _cli([*PREFECT, "deployment", "run", name, "--param", f"params={json.dumps(params)}"], server.env())
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout)
    assert m, res.stdout
    return m.group(1)


def _handed_over(store, campaign: str) -> int:
    try:
        with sqlite3.connect(store, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM outbox o JOIN campaigns c ON c.id = o.campaign_id WHERE c.name = ? "
                              "AND o.state NOT IN ('planned', 'queued')", (campaign,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_state(server, run_id: str, states: set[str], timeout: float) -> str:
    end = time.monotonic() + timeout
    while True:
        st = server.get(f"/flow_runs/{run_id}")["state_type"]
        if st in states or time.monotonic() > end:
            return st
        time.sleep(1)


def test_cancelling_a_running_campaign_stops_its_process_and_releases_its_claims(server, deployed, data_dir, worker):
    """Cancel from the UI: the worker stops the flow-run process with SIGTERM; the process is gone,
    and the messages it had claimed but not submitted are back to 'planned' (not left to a lease)."""
    from tests.helpers import alive, wait_for

    store = data_dir / "smsflow.sqlite"
    name = "cancel-me"
    params = dict(deployed["campaign/run-campaign"]["parameters"]["params"], now=POLICY_NOW, name=name, rate=3,
                  wait_for_receipts_s=0, policy={"marketing_window": {"start": "00:00", "end": "23:59",
                                                                        "skip_holidays": False}})
    run_id = _start_run(server, "campaign/run-campaign", params)
    wait_for(lambda: _handed_over(store, name) >= 5, "the run to send", RUN_TIMEOUT, 0.1)
    pids = _flow_run_pids(worker.popen.pid, run_id)
    assert pids
    server.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    assert _wait_state(server, run_id, {"CANCELLED", "CRASHED", "FAILED"}, 90) == "CANCELLED", _tail(worker.log, 60)
    wait_for(lambda: not any(alive(p) for p in pids), "the flow-run process to exit", 30)
    with sqlite3.connect(store) as db:
        states = dict(db.execute("SELECT o.state, COUNT(*) FROM outbox o JOIN campaigns c ON c.id = o.campaign_id "
                                 "WHERE c.name = ? GROUP BY o.state", (name,)))
    assert states.get("queued", 0) == 0 and states.get("planned", 0) > 0, states


def test_kill_9_of_a_deployment_run_and_of_the_worker_then_rerun(server, deployed, data_dir, worker,
                                                                  tmp_path_factory):
    """A campaign run by a worker is killed with SIGKILL while it sends (first its flow-run process,
    then, in a second round, the worker together with it); a new run of the same deployment (a
    retry from the UI) sends again within 60 s and the provider gets every message exactly once."""
    from tests.helpers import alive, wait_for

    store = data_dir / "smsflow.sqlite"
    resumed = []
    current = worker
    spare = []
    names = []
    try:
        for round_ in ("flow-run process", "worker and flow-run process"):
            name = f"crash-deploy-{len(names)}"  # a campaign of its own per round
            names.append(name)
            params = dict(deployed["campaign/run-campaign"]["parameters"]["params"], now=POLICY_NOW, name=name, rate=4,
                          wait_for_receipts_s=0, policy={"marketing_window": {"start": "00:00", "end": "23:59",
                                                                                "skip_holidays": False}})
            before = _handed_over(store, name)
            run_id = _start_run(server, "campaign/run-campaign", params)
            wait_for(lambda: _handed_over(store, name) >= before + 10, f"{round_}: the run to send", RUN_TIMEOUT, 0.1)
            pids = _flow_run_pids(current.popen.pid, run_id)
            assert pids, f"no process for flow run {run_id}"
            victims = pids + ([current.popen.pid] if round_.startswith("worker") else [])
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            t_kill, at_kill = time.monotonic(), _handed_over(store, name)
            wait_for(lambda: not any(alive(p) for p in victims), "the killed processes to go", 15)
            if round_.startswith("worker"):
                cwd = tmp_path_factory.mktemp("worker2-cwd")
                current = Proc("worker2", [*PREFECT, "worker", "start", "--pool", POOL],
                               server.env(SMSFLOW_DATA_DIR=str(data_dir), PREFECT_WORKER_QUERY_SECONDS="2"), cwd,
                               cwd / "worker.log")
                spare.append(current)
            else:  # the worker saw its flow-run process die
                assert _wait_state(server, run_id, {"CRASHED", "FAILED"}, 60) in {"CRASHED", "FAILED"}
            rerun = _start_run(server, "campaign/run-campaign", params)
            wait_for(lambda: _handed_over(store, name) > at_kill, f"{round_}: the rerun to send", 90, 0.2)
            resumed.append(time.monotonic() - t_kill)
            assert _wait_state(server, rerun, {"COMPLETED", "FAILED", "CRASHED"}, RUN_TIMEOUT) == "COMPLETED", \
                _tail(current.log, 80)
    finally:
        for p in spare:
            p.stop(signal.SIGINT, grace=20)
    TIMINGS["kill -9 -> rerun sending (flow-run process, worker+run)"] = max(resumed)
    print(f"\nkill -9 -> rerun sending again, deployment (s): {[round(x, 1) for x in resumed]}", file=sys.stderr)
    assert all(x < 60 for x in resumed), resumed
    for name in names:
        with sqlite3.connect(store) as db:
            cid = db.execute("SELECT id FROM campaigns WHERE name = ?", (name,)).fetchone()[0]
            states = dict(db.execute("SELECT state, COUNT(*) FROM outbox WHERE campaign_id = ? GROUP BY state", (cid,)))
            planned = sum(states.values())
        assert planned > 50 and states.get("queued", 0) == 0 and states.get("planned", 0) == 0, (name, states)
        with sqlite3.connect(data_dir / "sandbox_gateway.sqlite") as sb:
            got = sb.execute("SELECT COUNT(*) FROM messages WHERE reference LIKE ?", (f"c{cid}:%",)).fetchone()[0]
            again = sb.execute("SELECT COUNT(*) FROM submit_calls WHERE reference LIKE ? AND outcome = 'duplicate'",
                               (f"c{cid}:%",)).fetchone()[0]
        assert got == planned - states.get("rejected", 0) and again == 0, (name, got, again, states)


@pytest.fixture(scope="module", autouse=True)
def _report_timings(request):
    yield
    if not TIMINGS:
        return
    line = "\nprefect deployment timings (s): " + json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(line)
