"""Process hygiene for long-running commands: children that die with us, signals that unwind.

- ``die_with_parent``: a ``preexec_fn`` (Linux ``PR_SET_PDEATHSIG``) so a child process gets
  SIGTERM when the process that started it dies, even by SIGKILL.
- ``exit_on_signals``: SIGTERM (systemd, Docker, Kubernetes) unwinds like Ctrl-C: ``finally``
  blocks and context managers run, so claims are released and children are stopped.
- ``embedded_prefect_api``: without a configured ``PREFECT_API_URL``, the temporary Prefect API
  that Prefect would start by itself, but as a child that dies with this process. Prefect's own
  temporary server survives a SIGTERM or SIGKILL of its parent (seen with ``smsflow serve``, 3 of
  3 times: ~190 MB uvicorn left running).
"""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1


CLI_TAG = "smsflow-cli"  # the tag of flow runs a command started against a Prefect server
CLI_HEARTBEAT_S = 30  # their heartbeat (Prefect's minimum): the automation waits for 3 missed ones


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn``: the child gets ``sig`` when its parent exits (Linux; elsewhere a no-op)."""
    parent = os.getpid()
    return lambda: die_with(parent, sig)


def die_with(parent: int, sig: int = signal.SIGTERM) -> None:
    """In a child of ``parent``: get ``sig`` when it exits (Linux; elsewhere a no-op); exit at once if it already
    has. Module level, so it can also be a spawned pool worker's initializer."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class _NoTraceback(logging.Formatter):
    """Formats like ``inner`` without the exception's traceback (the message keeps its text)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def console_without_tracebacks() -> None:
    """Console log handlers (Prefect's included) print one line per record: a command that fails
    says why in its last line, not under 200 lines of tracebacks."""
    import prefect.main  # noqa: F401 - Prefect installs its console handlers when its API is first imported

    for name in ("", "prefect"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h.formatter, _NoTraceback):
                h.setFormatter(_NoTraceback(h.formatter))


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals() -> None:
    """SIGTERM raises SystemExit(143) in the main thread, SIGINT KeyboardInterrupt, also when the
    command was started with SIGINT ignored (a background job of a non-interactive shell inherits
    that, and Python then never installs its Ctrl-C handler)."""
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (all held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _drain_prefect_workers(timeout_s: float = 3.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


@contextmanager
def embedded_prefect_api(timeout_s: float = 60.0) -> Iterator[str | None]:
    """Yields the API URL of a temporary Prefect API started for this command, or None when one is
    configured (``PREFECT_API_URL``, a profile, a test harness): then nothing is started."""
    import httpx
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        yield None
        return
    # Prefect makes its home without parents, and its API then fails to open its database there
    Path(get_current_settings().home).expanduser().mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, preexec_fn=die_with_parent(), stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the temporary Prefect API exited with code {proc.returncode}")
                try:
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect API did not answer within {timeout_s:.0f}s")
                time.sleep(0.1)
        os.environ["PREFECT_API_URL"] = url  # threads and child processes see it too
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()  # events and logs still queued go out while the API is up
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
