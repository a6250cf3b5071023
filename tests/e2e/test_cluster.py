"""Distributed mode on the cluster users start: `scripts/cluster.sh start` (a PostgreSQL-backed Prefect
server, the deployments and automations, 3 process workers, a Dask scheduler and 2 Dask workers), then
`smsflow campaign` on a 200,000-contact export, cut into 8 render shards, while the chaos thread kills -9
one render-shard flow-run process, one Prefect worker and one Dask worker at random moments.

The campaign must complete with outbox rows = eligible contacts, every shard done exactly once, no message
twice at the gateway, no flow run left Running or Pending, no Prefect concurrency slot and no store lease
left held. The seed of the random moments is printed (SMSFLOW_CHAOS_SEED reruns one).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from store.db import get_engine
from tests.helpers import descendants, free_ports

pytestmark = [pytest.mark.postgres, pytest.mark.prefect_server]

REPO = Path(__file__).resolve().parents[2]
CONTACTS = 200_000
SHARD_SIZE = 22_000  # ~168,000 valid contacts of the demo export -> 8 shards
HEARTBEAT_S = 30
NOW = "2026-12-08T09:00:00+00:00"  # a Tuesday, 12:00 in Moscow: inside the marketing window


def _pg_problem() -> str | None:
    from tests.conftest import _pg_available

    return _pg_available()


def _env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SMSFLOW_", "CLUSTER_"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", SMSFLOW_DATA_DIR=str(base / "data"),
               PREFECT_HOME=str(base / "client-home"), **extra)
    return env


def _drop(db: str) -> None:
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class Cluster:
    def __init__(self, base: Path, env: dict[str, str], client: dict[str, str]):
        self.base, self.env, self.client = base, env, client
        self.api = client["PREFECT_API_URL"]
        self.dir = base / "cluster"

    def pid(self, name: str) -> int:
        return int((self.dir / f"{name}.pid").read_text())

    def flow_runs(self, **body) -> list[dict]:
        return httpx.post(f"{self.api}/flow_runs/filter", json=body, timeout=30).json()

    def flow_names(self) -> dict[str, str]:
        return {f["id"]: f["name"] for f in httpx.post(f"{self.api}/flows/filter", json={}, timeout=30).json()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    problem = _pg_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI and is not reachable: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    base = tmp_path_factory.mktemp("cluster")
    pport, dport = free_ports(2)
    tag = f"smsflow_chaos_{os.getpid()}_{pport}"
    store = f"postgresql+psycopg://postgres@127.0.0.1:5432/{tag}_store"
    env = _env(base, CLUSTER_DIR=str(base / "cluster"), CLUSTER_PREFECT_PORT=str(pport),
               CLUSTER_DASK_PORT=str(dport), CLUSTER_PREFECT_DB=f"{tag}_prefect", SMSFLOW_DATABASE_URL=store,
               CLUSTER_HEARTBEAT_S=str(HEARTBEAT_S),
               # no scheduled runs of the deployments' schedules: only what the campaign starts
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    try:
        res = subprocess.run(["bash", "scripts/cluster.sh", "start"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, f"cluster.sh start failed:\n{res.stdout}\n{res.stderr[-4000:]}"
        client = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines()
                      if line.startswith("export "))
        assert client["SMSFLOW_MODE"] == "distributed" and client["SMSFLOW_DATABASE_URL"] == store
        yield Cluster(base, env, client)
    finally:
        subprocess.run(["bash", "scripts/cluster.sh", "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)
        for db in (f"{tag}_store", f"{tag}_prefect"):
            _drop(db)


def _flow_run_processes(names: dict[str, str], c: Cluster, flow: str) -> dict[int, str]:
    """pid -> flow run id of live flow-run processes running ``flow`` (their environment names the run)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ids = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PREFECT__FLOW_RUN_ID=")]
        if ids:
            out[int(p.name)] = ids[0]
    if not out:
        return {}
    runs = {r["id"]: r for r in c.flow_runs(flow_runs={"id": {"any_": list(set(out.values()))}})}
    return {pid: fr for pid, fr in out.items()
            if fr in runs and names.get(runs[fr]["flow_id"]) == flow and runs[fr]["state_type"] == "RUNNING"}


def _chaos(c: Cluster, engine, rng: random.Random, log: list[str], stop: threading.Event) -> None:
    """Kill -9, at random moments of the render phase: a render-shard flow-run process, a Prefect worker,
    a Dask worker process (its nanny starts a new one)."""
    def wait(pred, timeout=240.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not stop.is_set():
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        return None

    def shards_cut():
        with engine.connect() as conn:
            return conn.execute(text("SELECT COUNT(*) FROM campaign_shards WHERE step = 'render'")).scalar()

    try:
        if not wait(shards_cut):
            log.append("render never started")
            return
        names = c.flow_names()
        kills = ["flow-run", "worker", "dask-worker"]
        rng.shuffle(kills)
        for what in kills:
            time.sleep(rng.uniform(0.5, 6.0))
            if what == "flow-run":
                procs = wait(lambda: _flow_run_processes(c.flow_names(), c, "render-shard"), 120)
                if not procs:
                    log.append("no render-shard flow run to kill")
                    continue
                pid = rng.choice(sorted(procs))
                os.kill(pid, signal.SIGKILL)
                log.append(f"killed render-shard flow-run process {pid} (flow run {procs[pid]})")
            elif what == "worker":
                i = rng.randint(1, 3)
                os.kill(c.pid(f"worker-{i}"), signal.SIGKILL)
                log.append(f"killed Prefect worker-{i} (pid {c.pid(f'worker-{i}')})")
            else:
                i = rng.randint(1, 2)
                kids = descendants(c.pid(f"dask-worker-{i}"))
                worker = [k for k in kids if b"distributed" in Path(f"/proc/{k}/cmdline").read_bytes()
                          or b"multiprocessing" in Path(f"/proc/{k}/cmdline").read_bytes()] if kids else []
                if not worker:
                    log.append(f"dask-worker-{i} has no worker process")
                    continue
                os.kill(worker[-1], signal.SIGKILL)
                log.append(f"killed Dask worker process {worker[-1]} of dask-worker-{i}")
        del names
    except Exception as exc:  # noqa: BLE001 - reported by the test
        log.append(f"chaos error: {type(exc).__name__}: {exc}")


def test_a_campaign_in_8_shards_survives_kill_9_of_a_flow_run_a_worker_and_a_dask_worker(cluster, tmp_path):
    from smsflow.demo_crm import write_crm_csv

    export = tmp_path / "crm-200k.csv"
    write_crm_csv(export, CONTACTS, seed=11)
    seed = int(os.environ.get("SMSFLOW_CHAOS_SEED", time.time_ns() % 1_000_000))
    print(f"chaos seed: {seed} (SMSFLOW_CHAOS_SEED={seed} reruns it)")
    rng = random.Random(seed)
    env = {**cluster.env, **cluster.client, "SMSFLOW_SHARD_SIZE": str(SHARD_SIZE), "PREFECT_LOGGING_LEVEL": "WARNING"}
    engine = get_engine(cluster.client["SMSFLOW_DATABASE_URL"])
    log: list[str] = []
    stop = threading.Event()
    chaos = threading.Thread(target=_chaos, args=(cluster, engine, rng, log, stop), daemon=True)
    chaos.start()
    # a provider that allows two binds: two senders (send deployment runs) share it
    subprocess.run([str(REPO / ".venv/bin/python"), "-c", "from blocks.gateway import SandboxGateway; "
                    "SandboxGateway(senders=2).save('sandbox2', overwrite=True)"], cwd=REPO, env=env, check=True,
                   timeout=120)
    t0 = time.monotonic()
    try:
        res = subprocess.run([str(REPO / ".venv/bin/smsflow"), "campaign", "--source", str(export), "--template",
                              str(REPO / "templates/demo_promo.yaml"), "--name", "chaos", "--now", NOW, "--rate",
                              "50000", "--wait", "0", "--gateway-block", "sandbox2"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1500)
    finally:
        stop.set()
        chaos.join(30)
    print(f"campaign took {time.monotonic() - t0:.1f}s; chaos: {log}")
    assert res.returncode == 0, f"{res.stderr[-6000:]}"
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    kills = [x for x in log if x.startswith("killed")]
    assert len(kills) == 3, log

    with engine.connect() as conn:
        cid = conn.execute(text("SELECT id FROM campaigns WHERE name = 'chaos'")).scalar_one()
        eligible = conn.execute(text(
            "SELECT COUNT(*) FROM contacts WHERE status = 'valid' AND sms_consent AND opted_out_at IS NULL")).scalar()
        outbox = conn.execute(text("SELECT COUNT(*), COUNT(DISTINCT contact_id) FROM outbox WHERE campaign_id = :c"),
                              {"c": cid}).one()
        shards = conn.execute(text("SELECT shard, state, contacts, stats, attempts FROM campaign_shards WHERE "
                                   "campaign_id = :c AND step = 'render' ORDER BY shard"), {"c": cid}).all()
        sent = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c AND gateway_message_id IS NOT NULL"),
                            {"c": cid}).scalar()
        senders = conn.execute(text("SELECT COUNT(*) FROM campaign_shards WHERE campaign_id = :c AND step = 'send' "
                                    "AND state = 'done'"), {"c": cid}).scalar()
    # every eligible contact has exactly one message, and the accounting says so
    assert eligible > 100_000
    assert outbox == (eligible, eligible) and summary["planned"] == eligible
    # 8 shards, each done exactly once: their own counts add up to the outbox (a shard written twice would not)
    assert len(shards) == 8 and all(s.state == "done" for s in shards)
    assert sum(s.stats["planned"] for s in shards) == eligible
    # no message twice at the gateway, and every message the outbox says was sent was sent once
    from blocks.gateway import SandboxGateway

    counts = SandboxGateway(state_path=str(cluster.base / "data" / "sandbox_gateway.sqlite")).sent_count_by_reference()
    assert counts and max(counts.values()) == 1
    assert len(counts) == sent and sent > 0.9 * eligible
    assert senders >= 2  # both senders ran (a crashed one is replaced by a new shard of the next run only)

    # no run left Running or Pending: the worker's orphans finish, zombies are crashed by the automation
    deadline = time.monotonic() + 6 * HEARTBEAT_S
    while True:
        stuck = [r for r in cluster.flow_runs() if r["state_type"] in ("RUNNING", "PENDING")]
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not stuck, [(r["name"], r["state_name"]) for r in stuck]
    limits = httpx.post(f"{cluster.api}/v2/concurrency_limits/filter", json={}, timeout=30).json()
    assert all(lim["active_slots"] == 0 for lim in limits), limits
    with engine.connect() as conn:
        held = conn.execute(text("SELECT name, holder FROM leases WHERE expires_at > :now"),
                            {"now": __import__("store.db", fromlist=["utcnow"]).utcnow()}).all()
    assert not held, held
    names = cluster.flow_names()
    runs = [r for r in cluster.flow_runs() if names.get(r["flow_id"]) == "render-shard"]
    print(f"render-shard flow runs: {len(runs)} for 8 shards; attempts {[s.attempts for s in shards]}")


def test_rerunning_a_killed_parent_starts_no_shard_twice(cluster, tmp_path):
    """kill -9 of the command (the parent) while shards run; the same command again finds the shards'
    runs by their idempotency keys: one render-shard flow run per shard, the campaign completes."""
    from smsflow.demo_crm import write_crm_csv

    export = tmp_path / "crm-40k.csv"
    write_crm_csv(export, 40_000, seed=5)
    env = {**cluster.env, **cluster.client, "SMSFLOW_SHARD_SIZE": "4000", "PREFECT_LOGGING_LEVEL": "WARNING"}
    args = [str(REPO / ".venv/bin/smsflow"), "campaign", "--source", str(export), "--template",
            str(REPO / "templates/demo_promo.yaml"), "--name", "rerun", "--now", NOW, "--rate", "50000", "--wait", "0"]
    engine = get_engine(cluster.client["SMSFLOW_DATABASE_URL"])

    def progress():
        with engine.connect() as conn:
            return conn.execute(text(
                "SELECT COUNT(*) FILTER (WHERE s.state = 'done'), COUNT(*) FROM campaign_shards s JOIN campaigns c "
                "ON c.id = s.campaign_id WHERE c.name = 'rerun' AND s.step = 'render'")).one()

    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            done, total = progress()
            if total and 1 <= done <= total - 2:
                break
            time.sleep(0.1)
        assert first.poll() is None, f"the command ended before it could be killed:\n{first.stderr.read()[-3000:]}"
        os.killpg(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    done_at_kill, total = progress()
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    with engine.connect() as conn:
        cid, source = conn.execute(text("SELECT id, source FROM campaigns WHERE name = 'rerun'")).one()
        eligible = conn.execute(text("SELECT COUNT(*) FROM contacts WHERE source = :s AND status = 'valid' AND "
                                     "sms_consent AND opted_out_at IS NULL"), {"s": source}).scalar()
        planned = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c"), {"c": cid}).scalar()
        shards = conn.execute(text("SELECT state, stats, attempts FROM campaign_shards WHERE campaign_id = :c AND "
                                   "step = 'render'"), {"c": cid}).all()
    assert planned == eligible == summary["planned"] and eligible > 20_000
    assert len(shards) == total and all(s.state == "done" and s.attempts == 0 for s in shards)
    assert sum(s.stats["planned"] for s in shards) == eligible
    runs = cluster.flow_runs(flow_runs={"tags": {"all_": [f"campaign-{cid}", "render-shard"]}})
    print(f"killed with {done_at_kill} of {total} shards done; render-shard runs: {len(runs)}")
    assert len(runs) == total, [(r["name"], r["state_name"]) for r in runs]
    assert all(r["state_type"] == "COMPLETED" for r in runs)
    # the killed command's own runs (its campaign flow run, tagged smsflow-cli, heartbeating every 30 s) are
    # marked Crashed by the automation once 3 heartbeats are missed: none is left Running in the UI
    from smsflow.processes import CLI_HEARTBEAT_S, CLI_TAG

    deadline = killed_at + 3 * CLI_HEARTBEAT_S + 120
    while True:
        mine = cluster.flow_runs(flow_runs={"tags": {"all_": [CLI_TAG]}})
        stuck = [r for r in mine if r["state_type"] in ("RUNNING", "PENDING")]
        if not stuck or time.monotonic() > deadline:
            break
        time.sleep(2)
    names = cluster.flow_names()
    assert not stuck, [(names.get(r["flow_id"]), r["name"], r["state_name"]) for r in stuck]
    campaigns = sorted((r for r in mine if names.get(r["flow_id"]) == "campaign"
                        and (r["parameters"].get("params") or {}).get("name") == "rerun"), key=lambda r: r["created"])
    assert [r["state_type"] for r in campaigns] == ["CRASHED", "COMPLETED"], [(r["name"], r["state_name"]) for r in campaigns]
    assert "smsflow command died" in (campaigns[0]["state"]["message"] or "")
