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
4. ``prefect deployment run 'campaign/on-demand' --param params=... --watch`` (the
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
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.helpers import free_ports

pytestmark = pytest.mark.prefect_server

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "smsflow-pool"
SERVER_START_TIMEOUT = 60.0
CLI_TIMEOUT = 180.0
RUN_TIMEOUT = 150  # seconds for one deployment run, worker pick-up included
PREFECT = [sys.executable, "-m", "prefect"]  # the worker starts flow runs with this same interpreter

EXPECTED = {  # "flow/deployment" -> entrypoint
    "crm-extract/hourly-incremental": "flows/crm_extract.py:crm_extract",
    "reconcile/every-5-minutes": "flows/reconcile.py:reconcile",
    "report/nightly-metrics": "flows/report.py:report",
    "validate-and-dedup/on-demand": "flows/validate_and_dedup.py:validate_and_dedup",
    "segment/on-demand": "flows/segment.py:segment",
    "render/on-demand": "flows/render.py:render",
    "send/on-demand": "flows/send.py:send",
    "send/due-every-10-minutes": "flows/send.py:send",
    "campaign/on-demand": "flows/campaign.py:campaign",
    "crm-writeback/on-demand": "flows/crm_writeback.py:crm_writeback",
}
FINAL_STATES = {"delivered", "undelivered", "expired", "rejected", "failed"}
# The policy clock for the campaign run: a Wednesday, not a Russian holiday, 09:00 UTC
# (11:00 in Kaliningrad .. 20:00 in Magadan: inside the 10:00-21:00 marketing window; the demo's
# London and Kamchatka contacts stay deferred, which the test accepts).
POLICY_NOW = "2026-11-25T09:00:00Z"

TIMINGS: dict[str, float] = {}


# ----------------------------------------------------------------------------- helpers


def _clean_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment minus every PREFECT_* / SMSFLOW_* setting (no profile, API URL
    or data dir leaks in from the developer's shell), plus an isolated PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SMSFLOW_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _reset_sigint() -> None:  # runs in the child before exec
    # A child inherits an *ignored* SIGINT (e.g. pytest started in the background by a
    # non-interactive shell); Python then never installs KeyboardInterrupt and the worker
    # would not stop on SIGINT. Reset it to the default so Python installs its handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _descendants(pid: int) -> list[int]:
    """Pids of every live descendant of pid (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Proc:
    """A long-running subprocess we own, with its log in a file (no pipe to fill up)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name, self.log = name, log
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_reset_sigint,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int, grace: float) -> None:
        """Send sig, wait up to grace seconds, then SIGKILL the process group and every process
        it started (flow runs run in their own sessions)."""
        try:
            if self.alive():
                leftovers = _descendants(self.popen.pid)
                try:
                    self.popen.send_signal(sig)
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(self.popen.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.popen.wait(timeout=10)
                for pid in leftovers:  # only processes this one started
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        finally:
            self._log_fh.close()


def _cli(args: list[str], env: dict[str, str], cwd: Path = REPO_ROOT, timeout: float = CLI_TIMEOUT,
         check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"timed out after {timeout}s: {' '.join(args)}\n{exc.stdout}\n{exc.stderr}")
    if check and res.returncode != 0:
        pytest.fail(f"exit {res.returncode}: {' '.join(args)}\n--- stdout\n{res.stdout[-6000:]}\n"
                    f"--- stderr\n{res.stderr[-6000:]}")
    return res


class Server:
    def __init__(self, url: str, home: Path, proc: Proc):
        self.url, self.home, self.proc = url, home, proc
        self.api = f"{url}/api"
        self.http = httpx.Client(base_url=self.api, timeout=30)

    def env(self, **extra: str) -> dict[str, str]:
        return _clean_env(self.home, PREFECT_API_URL=self.api, **extra)

    def post(self, path: str, body: dict | None = None):
        r = self.http.post(path, json=body or {})
        r.raise_for_status()
        return r.json()

    def get(self, path: str):
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def deployments(self) -> dict[str, dict]:
        flows = {f["id"]: f["name"] for f in self.post("/flows/filter")}
        return {f"{flows[d['flow_id']]}/{d['name']}": d for d in self.post("/deployments/filter")}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` with its own PREFECT_HOME (SQLite); stopped on teardown."""
    base = tmp_path_factory.mktemp("prefect-server")
    home = base / "home"
    home.mkdir()
    (port,) = free_ports(1)
    env = _clean_env(
        home,
        # Schedules are stored and checked, but no scheduled run is created (see module doc).
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )  # and no PREFECT_API_URL for the server itself
    t0 = time.monotonic()
    proc = Proc("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env, base, base / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = t0 + SERVER_START_TIMEOUT
        while True:
            if not proc.alive():
                pytest.fail(f"prefect server exited with {proc.popen.returncode} before it was healthy:\n"
                            f"{_tail(proc.log)}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT:.0f}s:\n{_tail(proc.log)}")
            time.sleep(0.25)
        TIMINGS["server start (healthy)"] = time.monotonic() - t0
        srv = Server(url, home, proc)
        yield srv
        srv.http.close()
    finally:
        proc.stop(signal.SIGTERM, grace=20)


@pytest.fixture(scope="module")
def deployed(server):
    """The work pool and every deployment of prefect.yaml, deployed from the repository root."""
    env = server.env()  # SMSFLOW_PROJECT_DIR is not set: the pull step must record this clone
    t0 = time.monotonic()
    _cli([*PREFECT, "work-pool", "create", POOL, "--type", "process"], env)
    TIMINGS["work-pool create"] = time.monotonic() - t0
    t0 = time.monotonic()
    res = _cli([*PREFECT, "--no-prompt", "deploy", "--all"], env, cwd=REPO_ROOT)
    TIMINGS["deploy --all"] = time.monotonic() - t0
    deps = server.deployments()
    assert deps, f"no deployments after `prefect deploy --all`:\n{res.stdout[-4000:]}"
    return deps


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

    for key in EXPECTED:
        if key.endswith("/on-demand"):
            assert schedules(key) == [], key

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

    camp = deployed["campaign/on-demand"]["parameters"]["params"]
    assert camp["name"] == "demo-campaign" and camp["template"] == "templates/demo_promo.yaml", camp
    assert (REPO_ROOT / camp["template"]).is_file()


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
    params = dict(deployed["campaign/on-demand"]["parameters"]["params"], now=POLICY_NOW)
    _, took = _run(server, "campaign/on-demand", worker, "--param", f"params={json.dumps(params)}")
    TIMINGS["run campaign/on-demand (--watch)"] = took

    # every step ran as a subflow of the campaign and completed
    runs = server.post("/flow_runs/filter")
    flows = {f["id"]: f["name"] for f in server.post("/flows/filter")}
    by_flow: dict[str, set[str]] = {}
    for r in runs:
        by_flow.setdefault(flows[r["flow_id"]], set()).add(r["state_type"])
    expected_flows = {k.split("/")[0] for k in EXPECTED} - {"crm-writeback"}  # not part of a campaign
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
        for name in ("report/nightly-metrics", "reconcile/every-5-minutes")
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
