"""A real Prefect server for tests: ``prefect server start`` in a subprocess with its own
PREFECT_HOME, the work pool and every deployment of prefect.yaml, and helpers to own
subprocesses (server, worker, webhook service) and stop them whatever happens.

Used by tests/e2e/test_deployments.py and tests/e2e/test_journeys_e2e.py (module-scoped fixtures:
each module gets its own server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import descendants as _descendants
from tests.helpers import free_ports

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "smsflow-pool"
SERVER_START_TIMEOUT = 60.0
CLI_TIMEOUT = 180.0
PREFECT = [sys.executable, "-m", "prefect"]  # the worker starts flow runs with this same interpreter
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
    (port,) = free_ports(1)  # never 4200: the README's order of commands must work on any port
    env = _clean_env(
        home,
        # Schedules are stored and checked, but no scheduled run is created (see module doc).
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        # as the README says: exported before the server starts, so the UI looks for its API here
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
    )
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


