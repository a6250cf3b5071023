"""Benchmark: the send path against the project's own Kannel + SMPP simulator stack, on loopback.

This is a benchmark, not a test: it prints numbers.

    . .venv/bin/activate
    python bench/send.py                      # 2,000 messages per phase, throttle checks on the sandbox gateway
    python bench/send.py --n 5000 --concurrency 32 --profile
    python bench/send.py --throttle-gateway kannel --smpp

What one run does (everything in a fresh temp dir, always torn down):

* starts ``gateway_stack/kannel/start.sh STATE`` on free ports (same env as tests/e2e/test_kannel.py's
  ``kannel`` fixture: KANNEL_*_PORT, SIM_SMPP_PORT/SIM_CTL_PORT, SIM_DLR_DELAY, KANNEL_SENDSMS_USER/PASSWORD,
  SMSFLOW_GATEWAY_PYTHON) and stops it with ``stop.sh`` at the end, whatever happened;
* starts the callback service (``service.app.create_app(store_url, emit_events=False)``, uvicorn in a
  child process, as ``smsflow serve`` runs beside a sender in production; ``--service-thread``: in a thread
  of this process, sharing the GIL with the sender and the raw client, which made both slower and the
  ratio swing 60..99 % between rounds) writing receipts into the store; Kannel calls its
  ``/callbacks/kannel/dlr`` for every receipt (dlr-mask 31).

Phases, all against the same Kannel, with receipts on:

(a) raw: ``--concurrency`` threads, each with ONE persistent HTTP/1.1 keep-alive socket and a
    hand-written ``GET /cgi-bin/sendsms`` (port of shared/reference/kannel/bench.py's raw client, threads
    instead of asyncio) -> accepted msg/s.  Then it waits until every final receipt of the raw run is
    stored by the service (so phase (b) does not share the machine with (a)'s receipt traffic).
(b) project: N outbox rows planned in the store (campaign policy = ``always_open()``), then
    ``tasks.send.send_messages(engine, gateway=KannelGateway(dlr_url=<service>), bucket=TokenBucket(100_000),
    claimer="bench", max_messages=N)`` -> submitted msg/s including the claim / record bookkeeping; then
    ``tasks.reconcile.apply_receipts`` every 0.25 s until every message is final -> msg/s end to end with
    receipts reconciled (time from the start of send_messages).  The ratio (b)/(a) is printed (target >= 80%).
    A wall-clock breakdown of (b) is always printed. send_messages is pipelined (tasks.send._SendLoop: the
    main thread takes tokens and calls gateway.submit; one store thread claims the next batch and records the
    previous results meanwhile), so it shows the main thread's gateway.submit and bucket time, the rest of
    its time (= waiting for the store thread: the first claim, the last record), and, separately, the
    store thread's claim (incl. the policy check) and record_results time overlapped with the submits
    (tasks.send's module functions wrapped in this process; no file is changed).
    Also printed per round: the time the sender (main and store thread) spent in store.db's ``BEGIN IMMEDIATE``
    (waiting for SQLite's write lock, which the callback service takes for each batch of receipts), and (b0) the same
    send_messages through a no-op gateway (the store bookkeeping alone, no receipt traffic).
    (a), (b0), (b) run --rounds times (default 3), interleaved; the table shows medians and min..max,
    since one round on a busy 2-core machine swings by +-30%.
    --profile runs send_messages twice more under cProfile (fresh rows): through the no-op gateway and
    through Kannel, and prints the top functions (main thread only: the gateway's socket threads show up
    as ``thread.join`` inside ``submit``).
    Diagnostics: --service-thread (callback service in a thread of this process: the GIL shared with the sender),
    --switch-interval S (sys.setswitchinterval), --batch-size B (KannelGateway.batch_size).

Throttle accuracy: ``send_messages`` with TokenBucket(50) over ~10 s and TokenBucket(500) over ~6 s
(rate x seconds messages) through the sandbox gateway (``SandboxGateway(min/max delay 0, rejected_rate 0)``,
or Kannel with ``--throttle-gateway kannel``).  The moment every ``bucket.acquire`` returns (= a part is
released to ``gateway.submit``) is recorded with its size.  Achieved rate = messages released after the
first part / (time of the last release - time of the first release): the first part is paid from the
bucket's initial (full) capacity, every later one from elapsed time.  Also printed: min / max count over
the full 1-second windows from the first release (sliding window, step 0.1 s).  Target: within 2%.

(c) --smpp: every round, after (b), ``SmppGateway.submit`` of all N messages in one call directly to the
simulator (no Kannel, no store; receipts on): accepted msg/s = accepted / (start of submit -> last
submit_sm_resp, binds included), comparable to (a)'s accepted; and, separately, the time from the start until
every final receipt is spooled (the gateway keeps its binds open up to ``--receipt-timeout`` and stops as soon
as the last receipt is in). The table shows medians and (c)/(b).

Receipts at scale (1M): ``python bench/reconcile.py --n 1000000`` (separate script).

A Markdown table for the README is printed at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import os
import pstats
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
STACK_DIR = ROOT / "gateway_stack" / "kannel"

from bench.stores import fresh_store, store_label  # noqa: E402 - after the path
from smsflow.processes import free_ports  # noqa: E402
FINAL = ("delivered", "undelivered", "expired", "rejected", "failed")
PASSWORD = "kannel-bench-" + uuid.uuid4().hex[:8]
USER = "smsflow"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)




def wait_for(pred, what: str, timeout: float, interval: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        res = pred()
        if res:
            return res
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def text_for(i: int, ref: str, ucs2: bool) -> str:
    # the simulator finds our reference in the text ([ref:...]); GSM-7 unless --ucs2
    return f"Скидка 10% на заказ {i} [ref:{ref}]" if ucs2 else f"Your order {i} is ready [ref:{ref}]"


def phone_for(i: int) -> str:
    return f"+7916{i % 100000:05d}12"  # never ends in the simulator's 97/98/99 (reject/expire/fail)


# --------------------------------------------------------------------------- stack + service
class Stack:
    def __init__(self, state: Path, dlr_delay: float):
        self.state = state
        admin, smsbox, sendsms, smpp, ctl = free_ports(5)
        self.sendsms_port, self.smpp_port, self.ctl_port = sendsms, smpp, ctl
        self.env = dict(os.environ, KANNEL_ADMIN_PORT=str(admin), KANNEL_SMSBOX_PORT=str(smsbox),
                        KANNEL_SENDSMS_PORT=str(sendsms), SIM_SMPP_PORT=str(smpp), SIM_CTL_PORT=str(ctl),
                        SIM_DLR_DELAY=str(dlr_delay), KANNEL_SENDSMS_USER=USER, KANNEL_SENDSMS_PASSWORD=PASSWORD,
                        KANNEL_MO_URL="http://127.0.0.1:9/inbound/kannel?from=%p&to=%P&text=%a&id=%I",
                        SMSFLOW_GATEWAY_PYTHON=sys.executable)

    def run(self, script: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK_DIR / script), str(self.state)], env=self.env, capture_output=True,
                              text=True, timeout=120)

    @property
    def sendsms_url(self) -> str:
        return f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms"


class Service:
    def __init__(self, store_url: str):
        import logging

        import uvicorn

        from service.app import create_app

        logging.getLogger("smsflow.service").setLevel(logging.WARNING)  # one INFO line per receipt otherwise
        self.port = free_ports(1)[0]
        self.server = uvicorn.Server(uvicorn.Config(create_app(store_url, emit_events=False), host="127.0.0.1",
                                                    port=self.port, log_level="warning", access_log=False,
                                                    backlog=1024))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="callback-service")
        self.thread.start()
        wait_for(lambda: self.server.started, "callback service", 30)
        self.url = f"http://127.0.0.1:{self.port}/callbacks/kannel/dlr"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ServiceProcess:
    """The same app under uvicorn in a child process (its own GIL), stopped by its pid (the default)."""

    def __init__(self, store_url: str):
        from urllib.request import urlopen

        self.port = free_ports(1)[0]
        code = ("import logging, sys, uvicorn; sys.path.insert(0, %r); from service.app import create_app; "
                "logging.getLogger('smsflow.service').setLevel(logging.WARNING); "
                "uvicorn.run(create_app(%r, emit_events=False), host='127.0.0.1', port=%d, log_level='warning', "
                "access_log=False, backlog=1024)") % (str(ROOT), store_url, self.port)
        self.proc = subprocess.Popen([sys.executable, "-c", code])

        def up():
            try:
                with urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return True
            except OSError:
                return self.proc.poll() is not None and (_ for _ in ()).throw(RuntimeError("service exited"))

        wait_for(up, "callback service process", 30, 0.2)
        self.url = f"http://127.0.0.1:{self.port}/callbacks/kannel/dlr"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- (a) raw keep-alive client
class RawConn:
    """One persistent HTTP/1.1 connection; hand-written GET, minimal Content-Length parser."""

    def __init__(self, port: int):
        self.port = port
        self.sock = None
        self.buf = b""

    def get(self, request: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        self.sock.sendall(request)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed before the answer")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status = int(head[9:12])
        length, close = 0, head.startswith("HTTP/1.0")
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection":
                close = "close" in v.lower()
        start = end + 4
        while len(buf) - start < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed inside the answer")
            buf += chunk
        body = buf[start : start + length]
        self.buf = buf[start + length :]
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""


# the callback service authenticates every receipt (SMSFLOW_CALLBACK_SECRET_<GATEWAY>): the raw client's
# "bench-raw" and the project's unsaved KannelGateway ("kannelgateway") get one
BENCH_CALLBACK_SECRET = "bench-secret-0123456789"
for _gw in ("BENCH_RAW", "KANNELGATEWAY"):
    os.environ.setdefault(f"SMSFLOW_CALLBACK_SECRET_{_gw}", BENCH_CALLBACK_SECRET)


def raw_requests(stack: Stack, dlr_base: str, n: int, run: str, ucs2: bool) -> list[bytes]:
    pattern = dlr_base + f"?ref={{ref}}&type=%d&answer=%A&msgid=%F&smsc=%i&ts=%T&gw=bench-raw&key={BENCH_CALLBACK_SECRET}"
    common = (f"username={USER}&password={quote(PASSWORD, safe='')}&from=SMSFLOW&dlr-mask=31&charset=UTF-8"
              + ("&coding=2" if ucs2 else ""))
    out = []
    for i in range(n):
        ref = f"{run}-{i}"
        q = (f"{common}&to={quote(phone_for(i), safe='')}&text={quote(text_for(i, ref, ucs2), safe='')}"
             f"&dlr-url={quote(pattern.replace('{ref}', ref), safe='')}")
        out.append(f"GET /cgi-bin/sendsms?{q} HTTP/1.1\r\nHost: 127.0.0.1:{stack.sendsms_port}\r\n\r\n".encode("ascii"))
    return out


def run_raw(stack: Stack, requests: list[bytes], concurrency: int) -> tuple[int, list, float]:
    counter = itertools.count()
    lock = threading.Lock()
    ok = [0]
    bad: list = []
    n = len(requests)

    # smsbox listens with a backlog of 10: a burst of 32 connects drops SYNs (1 s stall each), so at most
    # 4 connections may be "opened, not answered yet" at once (as KannelGateway's CONNECT_BURST)
    connecting = threading.BoundedSemaphore(4)

    def worker():
        conn = RawConn(stack.sendsms_port)
        good = 0
        try:
            with lock:
                i = next(counter)
            if i < n:
                with connecting:
                    try:
                        status, body = conn.get(requests[i])
                        good += status == 202 and body.startswith(b"0:")
                        if not (status == 202 and body.startswith(b"0:")):
                            bad.append((status, body[:80]))
                    except OSError as exc:
                        conn.close()
                        bad.append(("error", repr(exc)))
            while True:
                with lock:
                    i = next(counter)
                if i >= n:
                    break
                try:
                    status, body = conn.get(requests[i])
                except OSError as exc:
                    conn.close()
                    bad.append(("error", repr(exc)))
                    continue
                if status == 202 and body.startswith(b"0:"):
                    good += 1
                else:
                    bad.append((status, body[:80]))
        finally:
            conn.close()
            with lock:
                ok[0] += good

    threads = [threading.Thread(target=worker, daemon=True, name=f"raw-{k}") for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ok[0], bad, time.perf_counter() - t0


class CpuByProcess:
    """CPU seconds (user + sys) each kind of process on this machine spent between two snapshots: where the
    two cores went during a phase (this bench process, PostgreSQL, Kannel, the simulator, the callback service)."""

    KINDS = (("create_app", "service"), ("smsflow serve", "service"), ("postgres:", "PostgreSQL"),
             ("bearerbox", "Kannel"), ("smsbox", "Kannel"), ("smsc_sim", "simulator"))

    @classmethod
    def kind(cls, proc) -> str:
        if proc.pid == os.getpid():
            return "bench"
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except Exception:  # noqa: BLE001 - gone or not ours
            return "other"
        for needle, kind in cls.KINDS:
            if needle in text:
                return kind
        return "other"

    @staticmethod
    def snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for proc in psutil.process_iter():
            try:
                t = proc.cpu_times()
                out[proc.pid] = (CpuByProcess.kind(proc), t.user + t.system)
            except Exception:  # noqa: BLE001 - exited meanwhile
                continue
        return out

    @staticmethod
    def between(before: dict, after: dict) -> dict[str, float]:
        by: dict[str, float] = {}
        for pid, (kind, cpu) in after.items():
            used = cpu - (before[pid][1] if pid in before else 0.0)
            by[kind] = by.get(kind, 0.0) + max(0.0, used)
        return by

    @staticmethod
    def line(by: dict[str, float], seconds: float, n: int) -> str:
        total = sum(by.values())
        parts = " | ".join(f"{k} {v:.2f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v >= 0.005)
        return (f"CPU s by process: {parts} | all {total:.2f} s = {total / seconds:.2f} cores busy, "
                f"{total / max(1, n) * 1e6:.0f} us/msg")


# --------------------------------------------------------------------------- store helpers
def seed_campaign(engine, name: str, n: int, ucs2: bool) -> int:
    from sqlalchemy import text

    from store.db import bulk_insert, utcnow
    from tasks.policy import always_open

    now = utcnow()
    with engine.begin() as c:
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES (:n, 'bench', 'all', 't', 'marketing', 0, 'running', :p)"),
                  {"n": name, "p": always_open().model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": name}).scalar()
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                    [(f"bench-{cid}", str(i), phone_for(i), True, "valid") for i in range(n)])
        ids = [r[0] for r in c.execute(text("SELECT id FROM contacts WHERE source = :s ORDER BY id"), {"s": f"bench-{cid}"})]
        enc = "UCS-2" if ucs2 else "GSM-7"
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"c{cid}-{i}", cid, ct, "main", phone_for(i), text_for(i, f"c{cid}-{i}", ucs2), enc, 1, 0,
                      "planned", 0, now, now) for i, ct in enumerate(ids)])
    return cid


def maintenance_runs(engine) -> int:
    """PostgreSQL: autovacuum + autoanalyze runs on the store's tables so far (0 on SQLite)."""
    from sqlalchemy import text

    from store.db import is_postgres

    with engine.begin() as c:
        if not is_postgres(c):
            return 0
        c.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(c.execute(text("SELECT COALESCE(SUM(autovacuum_count + autoanalyze_count), 0) "
                                  "FROM pg_stat_user_tables")).scalar())


def states(engine, cid: int) -> dict[str, int]:
    from sqlalchemy import text

    with engine.begin() as c:
        return dict(c.execute(text("SELECT state, COUNT(*) FROM outbox WHERE campaign_id = :c GROUP BY state"),
                              {"c": cid}).fetchall())


def final_receipts(engine, gateway: str, prefix: str) -> int:
    from sqlalchemy import text

    with engine.begin() as c:
        return c.execute(text("SELECT COUNT(DISTINCT reference) FROM delivery_receipts WHERE gateway = :g "
                              "AND reference LIKE :p AND status IN ('delivered','undelivered','expired','rejected')"),
                         {"g": gateway, "p": prefix + "%"}).scalar() or 0


# --------------------------------------------------------------------------- timing wrappers
class LockWait:
    """Time spent in store.db's ``BEGIN IMMEDIATE`` (= waiting for SQLite's write lock), per thread kind:
    one listener inserted before store.db's own 'begin' listener, one appended after it."""

    def __init__(self, engine):
        from sqlalchemy import event

        self.t = {"sender": 0.0, "other": 0.0}
        self.n = {"sender": 0, "other": 0}
        self.max = {"sender": 0.0, "other": 0.0}
        self._lock = threading.Lock()

        def before(conn):
            conn.info["_bench_t"] = time.perf_counter()

        def after(conn):
            t = conn.info.pop("_bench_t", None)
            if t is None:
                return
            dt = time.perf_counter() - t
            th = threading.current_thread()
            k = "sender" if th is threading.main_thread() or th.name.startswith("smsflow-send") else "other"
            with self._lock:
                self.t[k] += dt
                self.n[k] += 1
                self.max[k] = max(self.max[k], dt)

        # store.db's own listener (BEGIN IMMEDIATE) is re-registered between ours: before -> it -> after
        theirs = [fn for fn in list(engine.dispatch.begin) if getattr(fn, "__name__", "") == "_on_begin"]
        for fn in theirs:
            event.remove(engine, "begin", fn)
        event.listen(engine, "begin", before)
        for fn in theirs:
            event.listen(engine, "begin", fn)
        event.listen(engine, "begin", after)
        self.ok = bool(theirs)

    def snapshot(self) -> tuple[dict, dict, dict]:
        with self._lock:
            return dict(self.t), dict(self.n), dict(self.max)


class Breakdown:
    """Where send_messages' wall time goes. The loop is pipelined (tasks.send._SendLoop): the main thread
    takes tokens and calls gateway.submit; claim and record_results run in its store thread, overlapped
    with the submits. Measured: claim / record_results (wall, in whichever thread runs them; they overlap
    the submits), bucket.acquire and gateway.submit (main thread). The rest of the main thread's time is
    waiting for the store (the first claim, the last record, a store job slower than a submit)."""

    def __init__(self):
        self.t = {"claim": 0.0, "record": 0.0, "bucket": 0.0, "submit": 0.0}
        self.n = {"claim": 0, "record": 0, "bucket": 0, "submit": 0}
        self._orig = None

    def install(self):
        import tasks.send as ts

        self._orig = (ts.claim_columns, ts.record_results)
        c0, r0 = self._orig

        def claim(*a, **k):
            t = time.perf_counter()
            try:
                return c0(*a, **k)
            finally:
                self.t["claim"] += time.perf_counter() - t
                self.n["claim"] += 1

        def record(*a, **k):
            t = time.perf_counter()
            try:
                return r0(*a, **k)
            finally:
                self.t["record"] += time.perf_counter() - t
                self.n["record"] += 1

        ts.claim_columns, ts.record_results = claim, record
        return self

    def uninstall(self):
        import tasks.send as ts

        ts.claim_columns, ts.record_results = self._orig

    def store_wait(self, t_send: float) -> float:
        """Main-thread time not spent in the bucket or in gateway.submit: waiting for the store thread."""
        return max(0.0, t_send - self.t["bucket"] - self.t["submit"])


class TimedGateway:
    """The gateway as send_messages sees it (batch_size, submit), with gateway.submit timed."""

    def __init__(self, gateway, breakdown: Breakdown):
        self._gw, self._bd = gateway, breakdown

    def __getattr__(self, name):
        return getattr(self._gw, name)

    def submit(self, messages, **kw):
        t = time.perf_counter()
        try:
            return self._gw.submit(messages, **kw)
        finally:
            self._bd.t["submit"] += time.perf_counter() - t
            self._bd.n["submit"] += 1


def timed_bucket(rate: float, breakdown: Breakdown | None = None, releases: list | None = None):
    from smsflow.ratelimit import TokenBucket

    class TimedBucket(TokenBucket):
        def acquire(self, n: int = 1) -> float:
            t = time.perf_counter()
            w = super().acquire(n)
            now = time.perf_counter()
            if breakdown is not None:
                breakdown.t["bucket"] += now - t
                breakdown.n["bucket"] += 1
            if releases is not None:
                releases.append((now, n))
            return w

    return TimedBucket(rate)


# --------------------------------------------------------------------------- (b) project path
_NULL_GW = []


def null_gateway():
    """Accepts everything at once, no I/O: send_messages through it = the store bookkeeping alone."""
    if _NULL_GW:
        return _NULL_GW[0]()
    from blocks.gateway import SmsGateway, SubmitResult

    class BenchNullGateway(SmsGateway):
        def submit(self, messages):
            return [SubmitResult(m.reference, True, m.reference) for m in messages]

        def lookup(self, references):
            return {}

    _NULL_GW.append(BenchNullGateway)
    return BenchNullGateway()


def project_send(engine, cid: int, gateway, n: int) -> tuple[object, float, Breakdown]:
    from tasks.send import send_messages

    bd = Breakdown().install()
    try:
        t0 = time.perf_counter()
        stats = send_messages(engine, campaign_id=cid, gateway=TimedGateway(gateway, bd), bucket=timed_bucket(100_000, bd),
                              claimer="bench", max_messages=n)
        dt = time.perf_counter() - t0
    finally:
        bd.uninstall()
    return stats, dt, bd


def wait_reconciled(engine, cid: int, n: int, timeout: float) -> tuple[bool, dict[str, int], int]:
    from tasks.reconcile import apply_receipts

    end = time.monotonic() + timeout
    passes = 0
    while True:
        apply_receipts(engine)
        passes += 1
        st = states(engine, cid)
        if sum(v for k, v in st.items() if k in FINAL) >= n:
            return True, st, passes
        if time.monotonic() > end:
            return False, st, passes
        time.sleep(0.25)


# --------------------------------------------------------------------------- throttle
def throttle_check(engine, rate: float, seconds: float, gateway, ucs2: bool) -> dict:
    from tasks.send import send_messages

    n = int(rate * seconds)
    cid = seed_campaign(engine, f"throttle-{rate:g}-{uuid.uuid4().hex[:6]}", n, ucs2)
    releases: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stats = send_messages(engine, campaign_id=cid, gateway=gateway, bucket=timed_bucket(rate, releases=releases),
                          claimer="bench-throttle", max_messages=n)
    wall = time.perf_counter() - t0
    first_t, first_n = releases[0]
    last_t = releases[-1][0]
    total = sum(k for _, k in releases)
    achieved = (total - first_n) / (last_t - first_t) if last_t > first_t else float("nan")
    # full 1-s windows, sliding by 0.1 s, from the first release
    counts = []
    w = first_t
    while w + 1.0 <= last_t + 1e-9:
        counts.append(sum(k for t, k in releases if w <= t < w + 1.0))
        w += 0.1
    return dict(rate=rate, n=n, submitted=stats.submitted, rejected=stats.rejected, parts=len(releases),
                part_size=first_n, wall=wall, span=last_t - first_t, achieved=achieved,
                error=(achieved - rate) / rate * 100, win_min=min(counts) if counts else None,
                win_max=max(counts) if counts else None)


# --------------------------------------------------------------------------- smpp (optional)
def smpp_gateway(stack: Stack, tmp: Path, receipt_timeout: float):
    """(gateway, None) or (None, why not)."""
    if not (ROOT / "blocks" / "smpp").is_dir():
        return None, "blocks/smpp/ does not exist"
    try:
        from blocks.smpp import SmppGateway
    except Exception as exc:  # noqa: BLE001
        return None, f"blocks.smpp does not import: {type(exc).__name__}: {exc}"
    kw = dict(host="127.0.0.1", port=stack.smpp_port, system_id="kannel", password="secret", sender_id="SMSFLOW",
              source_addr="SMSFLOW", spool_path=str(tmp / "smpp_spool.sqlite"), receipt_linger_s=receipt_timeout)
    try:
        return SmppGateway(**kw), None
    except Exception as exc:  # noqa: BLE001
        return None, f"SmppGateway({kw}) failed: {type(exc).__name__}: {exc}"


def smpp_bench(gw, n: int, ucs2: bool) -> dict:
    """ONE ``submit`` of all N messages (as phase (b) hands KannelGateway its whole batch), receipts on.
    accepted msg/s = accepted / (start of submit -> last submit_sm_resp, binds included): the same
    measure as the raw client's "accepted". Separately: start -> every final receipt spooled (the
    gateway keeps its binds open up to receipt_linger_s and stops as soon as the last one is in)."""
    from blocks.gateway import OutgoingMessage
    from smsflow.sms_encoding import sms_info

    run = "smpp" + uuid.uuid4().hex[:6]
    msgs = []
    for i in range(n):
        ref = f"{run}-{i}"
        t = text_for(i, ref, ucs2)
        info = sms_info(t)
        msgs.append(OutgoingMessage(ref, phone_for(i), t, info.encoding, info.segments))
    t0 = time.perf_counter()
    res = gw.submit(msgs)
    wall = time.perf_counter() - t0
    st = gw.last_batch_stats
    ok = sum(r.accepted for r in res)
    spooled = gw._spool()  # count what is spooled, then hand it out (and drop it)
    try:
        n_spooled = spooled.db.execute("SELECT count(*) FROM receipts").fetchone()[0]
        spooled.take_receipts(10 * n)
    finally:
        spooled.close()
    return dict(ok=ok, n=n, submit_s=st["submit_s"], rate=ok / st["submit_s"], receipts_s=st["receipts_s"],
                missing=st["receipts_missing"], spooled=n_spooled, wall=wall, sessions=st["sessions"],
                in_doubt=sum(r.in_doubt for r in res), not_accepted=[(r.error_code, r.error) for r in res if not r.accepted][:3])


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="messages per phase (raw, project)")
    ap.add_argument("--rounds", type=int, default=3, help="(a)+(b) rounds, interleaved; the table shows medians")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="HTTP connections for both clients (default: KannelGateway's default)")
    ap.add_argument("--ucs2", action="store_true", help="Cyrillic text (coding=2) instead of GSM-7")
    ap.add_argument("--dlr-delay", type=float, default=0.1, help="simulator's SIM_DLR_DELAY, seconds")
    ap.add_argument("--receipt-timeout", type=float, default=90.0, help="max seconds to wait for receipts per phase")
    ap.add_argument("--no-throttle", action="store_true", help="skip the throttle-accuracy runs")
    ap.add_argument("--throttle-gateway", choices=("sandbox", "kannel"), default="sandbox")
    ap.add_argument("--smpp", action="store_true", help="also SmppGateway straight to the simulator (blocks/smpp/)")
    ap.add_argument("--profile", action="store_true", help="cProfile a second project run and print the top functions")
    ap.add_argument("--service-thread", action="store_true",
                    help="run the callback service in a thread of this process instead of a child process (diagnostic)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="KannelGateway.batch_size for (b) (default: the gateway's default, 2000)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for this process (default Python's 0.005 s; diagnostic)")
    ap.add_argument("--gateway-alone", action="store_true",
                    help="(g) every round: KannelGateway.submit of N ready messages in batch_size calls, no store "
                         "(the gateway's own cost against (a); diagnostic)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store)")
    ap.add_argument("--database-url", default=None,
                    help="PostgreSQL server for the store (a new database for the run, dropped after); default: SQLite")
    a = ap.parse_args()

    from blocks.kannel import KannelGateway
    from store.db import get_engine

    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)
    conc = a.concurrency or KannelGateway.model_fields["concurrency"].default
    tmp = Path(tempfile.mkdtemp(prefix="smsflow-bench-send-"))
    store_cm = fresh_store(a.database_url, tmp)
    store_url = store_cm.__enter__()  # left in the finally below
    log(f"store: {store_label(a.database_url)}")
    engine = get_engine(store_url)
    lockwait = LockWait(engine)
    stack = Stack(tmp / "kannel", a.dlr_delay)
    service = None
    rows: list[tuple[str, str, str]] = []
    notes: list[str] = []
    started = False
    try:
        service = Service(store_url) if a.service_thread else ServiceProcess(store_url)
        r = stack.run("start.sh")
        if r.returncode != 0:
            print(f"start.sh exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}", file=sys.stderr)
            return 2
        started = True
        log(r.stdout.strip())
        print(f"# send path benchmark: n={a.n}, concurrency={conc}, text={'UCS-2' if a.ucs2 else 'GSM-7'}, "
              f"dlr-mask=31, SIM_DLR_DELAY={a.dlr_delay}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"service in a {'thread' if a.service_thread else 'process'}, GIL switch interval {sys.getswitchinterval()} s, "
              f"load average {os.getloadavg()[0]:.1f}")

        gw = KannelGateway(sendsms_url=stack.sendsms_url, username=USER, password=PASSWORD, dlr_url=service.url,
                           sender_id="SMSFLOW", timeout_s=10, concurrency=conc,
                           **({"batch_size": a.batch_size} if a.batch_size else {}))
        R: dict[str, list[float]] = {k: [] for k in ("raw", "raw_e2e", "null", "null_us", "send", "e2e", "ratio", "book",
                                                     "smpp", "smpp_vs_b", "smpp_rcpt")}
        smpp_gw = None
        if a.smpp:
            smpp_gw, why = smpp_gateway(stack, tmp, a.receipt_timeout)
            if smpp_gw is None:
                notes.append(f"--smpp skipped: {why}")
        all_done = True
        for rnd in range(1, a.rounds + 1):
            print(f"\n## round {rnd}/{a.rounds} (load average {os.getloadavg()[0]:.1f})")
            # (a) raw keep-alive client
            run = "raw" + uuid.uuid4().hex[:6]
            reqs = raw_requests(stack, service.url, a.n, run, a.ucs2)
            log(f"round {rnd} (a) raw client: {a.n} requests, {conc} keep-alive connections")
            t_raw0 = time.perf_counter()
            cpu0 = CpuByProcess.snapshot()
            ok, bad, t_raw = run_raw(stack, reqs, conc)
            cpu_raw = CpuByProcess.between(cpu0, CpuByProcess.snapshot())
            raw_rate = ok / t_raw
            print(f"(a) raw keep-alive client : {ok}/{a.n} accepted in {t_raw:.2f} s -> {raw_rate:,.0f} msg/s")
            if bad:
                print(f"    not accepted: {len(bad)}, first: {bad[:3]}")
            print("    " + CpuByProcess.line(cpu_raw, t_raw, a.n))
            try:
                wait_for(lambda: final_receipts(engine, "bench-raw", run) >= ok, "raw receipts", a.receipt_timeout, 0.2)
                raw_e2e = time.perf_counter() - t_raw0
            except TimeoutError:
                raw_e2e = None
            got = final_receipts(engine, "bench-raw", run)
            print(f"    final receipts stored by the service: {got}/{ok}"
                  + (f", all {raw_e2e:.2f} s after the first request -> {ok / raw_e2e:,.0f} msg/s (no reconcile)"
                     if raw_e2e else " (TIMED OUT)"))
            R["raw"].append(raw_rate)
            if raw_e2e:
                R["raw_e2e"].append(ok / raw_e2e)

            if a.gateway_alone:  # (g) the gateway alone: the same messages, no claim, no record
                from blocks.gateway import OutgoingMessage

                msgs = [OutgoingMessage(f"g{rnd}-{run}-{i}", phone_for(i), text_for(i, f"g{rnd}-{i}", a.ucs2),
                                        "UCS-2" if a.ucs2 else "GSM-7", 1) for i in range(a.n)]
                cpu0 = CpuByProcess.snapshot()
                t_g0 = time.perf_counter()
                acc = 0
                for k in range(0, a.n, gw.batch_size):
                    acc += sum(r.accepted for r in gw.submit(msgs[k : k + gw.batch_size]))
                t_g = time.perf_counter() - t_g0
                cpu_g = CpuByProcess.between(cpu0, CpuByProcess.snapshot())
                print(f"(g) KannelGateway.submit alone: {acc}/{a.n} accepted in {t_g:.2f} s -> {acc / t_g:,.0f} msg/s "
                      f"= {acc / t_g / raw_rate * 100:.0f}% of (a)")
                print("    " + CpuByProcess.line(cpu_g, t_g, a.n))
                try:
                    wait_for(lambda: final_receipts(engine, gw.gateway_name, f"g{rnd}-{run}-") >= acc, "(g) receipts",
                             a.receipt_timeout, 0.2)
                except TimeoutError:
                    print("    (g) receipts not all stored in time")

            # (b0) bookkeeping alone: the same send_messages through a no-op gateway (no receipt traffic)
            cid0 = seed_campaign(engine, f"bench-send-null-{rnd}", a.n, a.ucs2)
            st0, t0_send, bd0 = project_send(engine, cid0, null_gateway(), a.n)
            us0 = (bd0.t["claim"] + bd0.t["record"]) / max(1, st0.submitted) * 1e6
            print(f"(b0) send_messages, no-op gateway (store bookkeeping alone, quiet): {st0.submitted} in {t0_send:.2f} s -> "
                  f"{st0.submitted / t0_send:,.0f} msg/s | claim {bd0.t['claim']:.3f} s, record_results {bd0.t['record']:.3f} s "
                  f"= {us0:.0f} us/msg")
            R["null"].append(st0.submitted / t0_send)
            R["null_us"].append(us0)

            # (b) project path
            cid = seed_campaign(engine, f"bench-send-{rnd}", a.n, a.ucs2)
            log(f"round {rnd} (b) send_messages: {a.n} outbox rows, batch_size={gw.batch_size}, TokenBucket(100_000)")
            t_start = time.perf_counter()
            lw0 = lockwait.snapshot()
            av0 = maintenance_runs(engine)
            cpu0 = CpuByProcess.snapshot()
            stats, t_send, bd = project_send(engine, cid, gw, a.n)
            cpu_send = CpuByProcess.between(cpu0, CpuByProcess.snapshot())
            lw1 = lockwait.snapshot()
            av = maintenance_runs(engine) - av0  # an autovacuum worker reports each run to the shared stats as it ends
            send_rate = stats.submitted / t_send
            done, st, passes = wait_reconciled(engine, cid, a.n, a.receipt_timeout)
            all_done = all_done and done
            t_e2e = time.perf_counter() - t_start
            e2e_rate = a.n / t_e2e
            ratio = send_rate / raw_rate
            print(f"(b) send_messages          : {stats.submitted}/{a.n} submitted in {t_send:.2f} s -> {send_rate:,.0f} msg/s "
                  f"(claimed {stats.claimed}, rejected {stats.rejected}, retry {stats.retry_later}, errors {stats.errors})")
            wait = bd.store_wait(t_send)
            book = wait / t_send
            print(f"    breakdown (main thread): gateway.submit {bd.t['submit']:.3f} s ({bd.n['submit']} calls; raw took "
                  f"{t_raw:.3f} s for as many) | bucket {bd.t['bucket']:.3f} s | waiting for the store thread {wait:.3f} s "
                  f"({book * 100:.0f}% of the send time)")
            print("    " + CpuByProcess.line(cpu_send, t_send, a.n) + (f" | autovacuum/autoanalyze runs that ended meanwhile: {av}"
                                                                          if av else ""))
            print(f"    store thread, overlapped with the submits: claim {bd.t['claim']:.3f} s ({bd.n['claim']} calls) | "
                  f"record_results {bd.t['record']:.3f} s ({bd.n['record']} calls)")
            print(f"    SQLite write lock (BEGIN IMMEDIATE) during the send: sender waited {lw1[0]['sender'] - lw0[0]['sender']:.3f} s "
                  f"over {lw1[1]['sender'] - lw0[1]['sender']} transactions (longest {lw1[2]['sender']:.3f} s); the callback "
                  f"service opened {lw1[1]['other'] - lw0[1]['other']} write transactions meanwhile (one per receipt), "
                  f"waiting {lw1[0]['other'] - lw0[0]['other']:.3f} s in total")
            print(f"    end to end (send + every final receipt stored + reconciled): {t_e2e:.2f} s -> {e2e_rate:,.0f} msg/s "
                  f"({'all final' if done else 'NOT all final'}: {st}, {passes} apply_receipts passes)")
            print(f"    ratio (b)/(a) submitted vs raw accepted: {ratio * 100:.1f}% (target >= 80%: "
                  f"{'met' if ratio >= 0.8 else 'NOT met'})")
            R["send"].append(send_rate)
            R["e2e"].append(e2e_rate)
            R["ratio"].append(ratio)
            R["book"].append(book)

            # (c) SmppGateway straight to the simulator (no Kannel, no store), receipts on
            if a.smpp and smpp_gw is not None:
                log(f"round {rnd} (c) SmppGateway.submit: {a.n} messages, binds={smpp_gw.binds}, window={smpp_gw.window_size}")
                c = smpp_bench(smpp_gw, a.n, a.ucs2)
                rec = (f"every final receipt spooled {c['receipts_s']:.2f} s after the start -> {c['ok'] / c['receipts_s']:,.0f} msg/s"
                       if c["receipts_s"] else f"receipts NOT all spooled within {a.receipt_timeout:g} s ({c['missing']} missing)")
                print(f"(c) SmppGateway direct    : {c['ok']}/{a.n} accepted in {c['submit_s']:.2f} s -> {c['rate']:,.0f} msg/s "
                      f"({c['sessions']} binds, window {smpp_gw.window_size}, in doubt {c['in_doubt']}) | {rec} | "
                      f"{c['spooled']} receipts in the spool | vs (b) {c['rate'] / send_rate * 100:.0f}%, vs (a) {c['rate'] / raw_rate * 100:.0f}%")
                if c["not_accepted"]:
                    print(f"    not accepted, first: {c['not_accepted']}")
                R["smpp"].append(c["rate"])
                R["smpp_vs_b"].append(c["rate"] / send_rate)
                if c["receipts_s"]:
                    R["smpp_rcpt"].append(c["receipts_s"])

        def med(k, fmt="{:,.0f}", scale=1.0):
            v = sorted(x * scale for x in R[k])
            if not v:
                return "n/a", ""
            m = statistics.median(v)
            return fmt.format(m), (f"{fmt.format(v[0])}..{fmt.format(v[-1])}" if len(v) > 1 else "")

        rr = f"median of {a.rounds} rounds" if a.rounds > 1 else "1 round"
        m, span = med("raw")
        rows.append(("raw keep-alive HTTP/1.1 client, accepted", m, f"{conc} connections, hand-written GET; {rr} {span}"))
        m, span = med("raw_e2e")
        rows.append(("raw client, until every final receipt is stored (no reconcile)", m, f"{rr} {span}"))
        m, span = med("null")
        mu, _ = med("null_us")
        rows.append(("send_messages -> no-op gateway (claim + policy + record only)", m, f"{mu} us/msg of bookkeeping; {rr} {span}"))
        m, span = med("send")
        mr, spanr = med("ratio", "{:.0f}%", 100)
        rows.append(("send_messages -> KannelGateway, submitted (claim + record incl.)", m,
                     f"{mr} of raw (rounds {spanr}; target >= 80%); {rr} {span}"))
        m, span = med("e2e")
        rows.append(("end to end: submitted + final receipts stored + reconciled", m,
                     f"SIM_DLR_DELAY {a.dlr_delay} s; {rr} {span}" + ("" if all_done else "; SOME ROUND TIMED OUT")))
        if R["smpp"]:
            m, span = med("smpp")
            mr, spanr = med("smpp_vs_b", "{:.0f}%", 100)
            rows.append(("SmppGateway direct to the SMPP simulator (no Kannel, no store), accepted", m,
                         f"{smpp_gw.binds} binds x window {smpp_gw.window_size}; {mr} of send_messages -> Kannel "
                         f"(rounds {spanr}); {rr} {span}"))
            m, span = med("smpp_rcpt", "{:.2f} s")
            rows.append(("SmppGateway: start of submit -> every final receipt spooled", m,
                         f"{a.n} messages, SIM_DLR_DELAY {a.dlr_delay} s; {rr} {span}"))
            print(f"SMPP direct vs (b) per round: {', '.join(f'{x * 100:.0f}%' for x in R['smpp_vs_b'])}; median "
                  f"{statistics.median(R['smpp_vs_b']) * 100:.0f}% (target > 100%: "
                  f"{'met' if statistics.median(R['smpp_vs_b']) > 1 else 'NOT met'})")
        print(f"\nratio (b)/(a) per round: {', '.join(f'{x * 100:.1f}%' for x in R['ratio'])}; median "
              f"{statistics.median(R['ratio']) * 100:.1f}% (target >= 80%: "
              f"{'met' if statistics.median(R['ratio']) >= 0.8 else 'NOT met'})")

        if a.profile:
            for label, gwp in (("no-op gateway (bookkeeping alone)", null_gateway()), ("KannelGateway (live)", gw)):
                cidp = seed_campaign(engine, f"bench-profile-{uuid.uuid4().hex[:6]}", a.n, a.ucs2)
                prof = cProfile.Profile()
                t0 = time.perf_counter()
                prof.enable()
                stp, _, _ = project_send(engine, cidp, gwp, a.n)
                prof.disable()
                print(f"\n## cProfile: send_messages -> {label}: {stp.submitted} submitted in "
                      f"{time.perf_counter() - t0:.2f} s under the profiler (main thread only)")
                for key in ("cumulative", "tottime"):
                    s_ = io.StringIO()
                    pstats.Stats(prof, stream=s_).sort_stats(key).print_stats(22)
                    print(f"--- top 22 by {key}")
                    print("\n".join(ln[:160] for ln in s_.getvalue().splitlines()[6:] if ln.strip()))
                prof.dump_stats(str(tmp / f"send-{'null' if 'no-op' in label else 'kannel'}.prof"))
                if gwp is gw:
                    wait_reconciled(engine, cidp, a.n, 30)

        # throttle accuracy
        if not a.no_throttle:
            if a.throttle_gateway == "sandbox":
                from blocks.gateway import SandboxGateway

                tgw = SandboxGateway(state_path=str(tmp / "sandbox.sqlite"), min_delay_s=0, max_delay_s=0, rejected_rate=0)
            else:
                tgw = KannelGateway(sendsms_url=stack.sendsms_url, username=USER, password=PASSWORD,
                                    dlr_url=service.url, sender_id="SMSFLOW", timeout_s=10, concurrency=conc)
            for rate, secs in ((50, 10), (500, 6)):
                log(f"throttle: TokenBucket({rate}) for {rate * secs} messages via {a.throttle_gateway}")
                t = throttle_check(engine, rate, secs, tgw, a.ucs2)
                ok_ = abs(t["error"]) <= 2.0
                print(f"throttle TokenBucket({rate}) via {a.throttle_gateway}: {t['submitted']}/{t['n']} submitted in "
                      f"{t['parts']} parts of {t['part_size']}; first->last release {t['span']:.2f} s -> "
                      f"{t['achieved']:.2f} msg/s, error {t['error']:+.2f}% ({'within' if ok_ else 'OUTSIDE'} 2%); "
                      f"1-s windows {t['win_min']}..{t['win_max']} msgs; wall {t['wall']:.2f} s")
                rows.append((f"throttle TokenBucket({rate}), {a.throttle_gateway} gateway", f"{t['achieved']:.2f}",
                             f"error {t['error']:+.2f}% (target within 2%), 1-s windows {t['win_min']}..{t['win_max']}"))

    finally:
        if started or (tmp / "kannel" / "run").exists():
            r = stack.run("stop.sh")
            if r.returncode != 0 or r.stderr:
                print(f"stop.sh exited {r.returncode}: {r.stderr[-1500:]}", file=sys.stderr)
        if service is not None:
            service.stop()
        store_cm.__exit__(None, None, None)
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n| send path ({store_label(a.database_url)} store; loopback, Kannel + SMPP simulator, dlr-mask 31) | msg/s | notes |")
    print("| --- | ---: | --- |")
    for name, val, note in rows:
        print(f"| {name} | {val} | {note} |")
    print("| 1M receipts stored + applied | see `python bench/reconcile.py --n 1000000` | separate script |")
    for n in notes:
        print(f"\n{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
