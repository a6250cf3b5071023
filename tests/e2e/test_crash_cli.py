"""kill -9 of the command users run, then the same command again (embedded mode: no Prefect
server, the CLI starts its temporary API).

`smsflow campaign ... --name N` is killed with SIGKILL at random moments (while extracting,
while sending); the rerun must send again within 60 s of the kill, finish the campaign, and the
provider must count every message exactly once: the sandbox's own records, and the real Kannel
+ SMSC simulator (receipts through `smsflow serve`, also started as users start it). The
temporary Prefect API of a killed command must not outlive it.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from store.db import get_engine
from tests.helpers import alive, contact, descendants, free_ports, wait_for, write_csv
from tests.e2e.test_kannel import PASSWORD, kannel  # noqa: F401 - the module-scoped stack fixture

N = 1200


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a user's shell: no Prefect server configured, a data dir and Prefect home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(SMSFLOW_DATA_DIR=str(tmp_path / "data"), PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_LOGGING_LEVEL="WARNING", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    env.pop("SMSFLOW_DATABASE_URL", None)
    return env


def smsflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "smsflow.cli", *args]


def outbox_states(store: str) -> dict[str, int]:
    try:
        with get_engine(store).begin() as c:
            return dict(c.execute(text("SELECT state, COUNT(*) FROM outbox GROUP BY state")).fetchall())
    except Exception:  # noqa: BLE001 - not created yet
        return {}


def handed_over(store: str) -> int:
    """Messages the gateway took (submitted or already final)."""
    st = outbox_states(store)
    return sum(v for k, v in st.items() if k not in ("planned", "queued"))


def write_inputs(tmp_path: Path, n: int = N) -> tuple[Path, Path]:
    # first_name carries a unique tag, so the SMSC simulator can count each message by it
    rows = [contact(i, first_name=f"T{i:05d}", phone=f"+7 916 {2000000 + i:07d}") for i in range(n)]
    csv = write_csv(tmp_path / "crm.csv", rows)
    tpl = tmp_path / "promo.txt"
    tpl.write_text("Скидка 10% для вас [ref:{{ first_name }}]", encoding="utf-8")
    # windows open all day, every day: these tests are about crashes, and must pass at any hour (the
    # default marketing window, 10:00-21:00 Moscow, would defer everything in the evening)
    (tmp_path / "policy.yaml").write_text(
        'marketing_window: {start: "00:00:00", end: "23:59:59.999999", skip_holidays: false}\n'
        'transactional_window: {start: "00:00:00", end: "23:59:59.999999", skip_holidays: false}\n', encoding="utf-8")
    return csv, tpl


def kill_and_rerun(tmp_path: Path, env: dict, args: list[str], kills: int, seed: int) -> list[float]:
    """Run the command, SIGKILL it at ``kills`` random moments, rerun it each time; let the last run finish.
    Returns the seconds from each kill to the rerun's first new hand-over to the gateway."""
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    rnd = random.Random(seed)
    resumed = []
    for k in range(kills + 1):
        p = subprocess.Popen(smsflow(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if k == kills:  # communicate() reads both pipes while it waits
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            return resumed, json.loads(out.strip().splitlines()[-1])
        before = handed_over(store)
        # a random moment: while the command still extracts and plans (0), or once it has sent some
        target = rnd.choice([0, rnd.randint(1, max(1, (N - before) // 2))])  # never more than is left to send
        deadline = time.monotonic() + 180
        if target == 0:
            time.sleep(rnd.uniform(3, 8))
        else:
            while handed_over(store) < before + target and p.poll() is None:
                assert time.monotonic() < deadline, "the command never got that far"
                time.sleep(0.02)
        assert p.poll() is None, f"the command ended before the kill: {p.stderr.read()[-2000:]}"
        family = descendants(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        t_kill, at_kill = time.monotonic(), handed_over(store)
        wait_for(lambda: not any(alive(c) for c in family), "the killed command's children to exit", 15)
        st = outbox_states(store)
        if st and st.get("planned", 0) + st.get("queued", 0) == 0:
            continue  # it had sent everything: the final run below has nothing left to do
        # the rerun: it must hand messages to the gateway again within 60 s of the kill
        rerun = subprocess.Popen(smsflow(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: handed_over(store) > at_kill or rerun.poll() is not None, "the rerun to send", 90, 0.05)
            assert handed_over(store) > at_kill, (f"the rerun ended without sending: {outbox_states(store)} "
                                                  f"{rerun.stdout.read()[-500:]} {rerun.stderr.read()[-3000:]}")
            resumed.append(time.monotonic() - t_kill)
        finally:
            rerun.send_signal(signal.SIGKILL)  # the next round kills it or starts the final run
            rerun.wait(10)
    raise AssertionError("unreachable")


def test_kill_9_of_the_campaign_command_then_rerun_sandbox(tmp_path):
    csv, tpl = write_inputs(tmp_path)
    env = cli_env(tmp_path)
    args = ["campaign", "--source-csv", str(csv), "--template", str(tpl), "--policy", str(tmp_path / "policy.yaml"), "--name", "crash-cli", "--rate", "60",
            "--wait", "0"]
    resumed, summary = kill_and_rerun(tmp_path, env, args, kills=3, seed=int(time.time()))
    print(f"\nkill -9 -> rerun sending again (s): {[round(s, 1) for s in resumed]}", file=sys.stderr)
    assert all(s < 60 for s in resumed), resumed
    assert summary["planned"] == N
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    st = outbox_states(store)
    assert st.get("planned", 0) == st.get("queued", 0) == 0 and sum(st.values()) == N, st
    import sqlite3

    db = sqlite3.connect(tmp_path / "data" / "sandbox_gateway.sqlite")
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == N - st.get("rejected", 0)
    # the provider saw no second submit of any message
    assert db.execute("SELECT COUNT(*) FROM submit_calls WHERE outcome = 'duplicate'").fetchone()[0] == 0


def test_kill_9_of_the_campaign_command_then_rerun_kannel(tmp_path, kannel):  # noqa: F811
    csv, tpl = write_inputs(tmp_path)
    (port,) = free_ports(1)
    env = cli_env(tmp_path, SMSFLOW_GATEWAY_PASSWORD=PASSWORD, SMSFLOW_CALLBACK_SECRET_KANNEL_CRASH="s3cret-k")
    serve_log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - a pipe nobody reads would fill and block it
    serve = subprocess.Popen(smsflow("serve", "--port", str(port)), env=env, stdout=serve_log, stderr=serve_log)
    try:
        import httpx

        wait_for(lambda: _healthy(port), "smsflow serve", 90, 0.5)
        r = subprocess.run(smsflow("gateway", "save", "kannel-crash", "--kind", "kannel", "--url",
                                   f"http://127.0.0.1:{kannel.sendsms_port}/cgi-bin/sendsms", "--username", "smsflow",
                                   "--dlr-url", f"http://127.0.0.1:{port}/callbacks/kannel/dlr", "--rate", "60",
                                   "--evidence-grace", "5"),
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        before = kannel.stats(detail=True)["by_ref"]
        args = ["campaign", "--source-csv", str(csv), "--template", str(tpl), "--policy", str(tmp_path / "policy.yaml"), "--name", "crash-kannel",
                "--gateway-block", "kannel-crash", "--wait", "0"]
        resumed, summary = kill_and_rerun(tmp_path, env, args, kills=2, seed=int(time.time()) + 1)
        print(f"\nkill -9 -> rerun sending again through Kannel (s): {[round(s, 1) for s in resumed]}", file=sys.stderr)
        assert all(s < 60 for s in resumed), resumed
        # the simulator refuses some numbers (state 'rejected', counted nowhere); every other message once
        store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
        with get_engine(store).begin() as c:
            rows = c.execute(text("SELECT text, state FROM outbox")).fetchall()
        refused = {re.search(r"\[ref:(T\d+)\]", t).group(1) for t, state in rows if state == "rejected"}
        assert len(rows) == N and len(refused) < N // 20
        refs = {f"T{i:05d}" for i in range(N)} - refused
        wait_for(lambda: refs <= set(kannel.stats(detail=True)["by_ref"]), "every message at the SMSC", 60, 0.5)
        time.sleep(1)  # a late duplicate would show up here
        by_ref = kannel.stats(detail=True)["by_ref"]
        counts = {r: by_ref.get(r, 0) - before.get(r, 0) for r in refs}
        assert {r: c for r, c in counts.items() if c != 1} == {}  # 0 lost, 0 twice
        tries = [x["ref"] for x in kannel.submits() if x.get("status") == "rejected" and x.get("ref") in refused]
        assert sorted(tries) == sorted(refused)  # the refused ones were tried once each, too
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            pytest.fail("smsflow serve ignored SIGTERM")
        finally:
            serve_log.close()


def _healthy(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_stops_serve_and_without_a_prefect_server_it_starts_no_api(tmp_path):
    """systemd, Docker and Kubernetes stop services with SIGTERM: nothing of the service may stay behind.
    Without PREFECT_API_URL nothing would receive its events, so it starts no temporary Prefect API."""
    (port,) = free_ports(1)
    p = subprocess.Popen(smsflow("serve", "--port", str(port)), env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), "smsflow serve", 90, 0.5)
        family = descendants(p.pid)
        assert family == [], "no temporary Prefect API (nor anything else) under serve"
        p.send_signal(signal.SIGTERM)
        # exits by itself, promptly (uvicorn shuts down, then re-raises the signal it caught: -15)
        assert p.wait(20) in (0, 143, -signal.SIGTERM)
        wait_for(lambda: not any(alive(c) for c in family), "serve's children to exit", 15)
    finally:
        p.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_a_running_campaign_with_its_children(tmp_path, sig):
    csv, tpl = write_inputs(tmp_path, 600)
    env = cli_env(tmp_path)
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    p = subprocess.Popen(smsflow("campaign", "--source-csv", str(csv), "--template", str(tpl), "--policy", str(tmp_path / "policy.yaml"), "--name", "sig",
                                 "--rate", "20", "--wait", "0"), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: handed_over(store) > 20 or p.poll() is not None, "the campaign to send", 120, 0.05)
        assert p.poll() is None, p.stderr.read()[-2000:]
        family = descendants(p.pid)
        p.send_signal(sig)
        p.wait(30)
        assert p.returncode != 0  # interrupted, not finished
        wait_for(lambda: not any(alive(c) for c in family), "the campaign's children to exit", 15)
        # its claims were released: nothing stays 'queued' waiting for a lease to expire
        assert outbox_states(store).get("queued", 0) == 0, outbox_states(store)
    finally:
        p.kill()


def test_kill_9_of_a_journey_run_frees_the_next_run_within_the_lease(tmp_path):
    """`smsflow journey run` killed while it holds the `journey-runs` lease: the next run (the command
    again, the next scheduled or event-triggered run) goes ahead within the lease's 30 s, not after
    Prefect's 300-s deployment slot."""
    from flows.journey import JOURNEY_LEASE_S
    from smsflow.settings import PROJECT_ROOT

    env = cli_env(tmp_path)
    store = f"sqlite:///{tmp_path / 'data' / 'smsflow.sqlite'}"
    args = smsflow("journey", "run", "--dir", str(PROJECT_ROOT / "journeys"))
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kids = []
    deadline = time.monotonic() + 120
    held = None
    while held is None and p.poll() is None and time.monotonic() < deadline:
        try:
            with get_engine(store).begin() as c:
                held = c.execute(text("SELECT holder FROM leases WHERE name = 'journey-runs'")).scalar()
        except Exception:  # noqa: BLE001 - the store is created by the run
            pass
        if held is None:
            kids = descendants(p.pid) or kids
            time.sleep(0.01)
    assert held is not None, f"the journey run never took its lease (exit {p.poll()}): {p.stderr.read()[-2000:]}"
    kids = descendants(p.pid) or kids
    p.kill()
    killed_at = time.monotonic()
    p.wait(10)
    assert f":{p.pid}:journey:" in held
    t0 = time.monotonic()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["journeys"], again.stdout
    since_kill = time.monotonic() - killed_at
    print(f"\njourney run killed -> next run finished: {since_kill:.1f} s (the rerun itself: {took:.1f} s)")
    assert since_kill < JOURNEY_LEASE_S + 30  # lease + the command's own start-up, not 300 s
    wait_for(lambda: not any(alive(k) for k in kids), "the killed run's temporary Prefect API to stop", 20)
