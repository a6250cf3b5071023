"""KannelGateway against a REAL Kannel (bearerbox + smsbox, apt package ``kannel``) and the
SMPP 3.4 SMSC simulator of ``gateway_stack/kannel`` (PyPI ``smpp34``).

The module-scoped ``kannel`` fixture installs the packages if bearerbox is missing
(``gateway_stack/install.sh``, needs root), starts the stack with ``start.sh`` on free
ports in a temporary state dir, and always stops it with ``stop.sh``. Under ``CI`` a
stack that cannot start FAILS the tests; locally they are skipped with the reason.

A small HTTP listener stands in for the callback service: Kannel calls it with every
receipt (dlr-url), and ``KannelGateway.parse_dlr`` turns the calls into receipts.
The tests at the end, without the stack, pin the answer mapping on a fake smsbox.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit
from urllib.request import urlopen

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.gateway import GatewayUnavailable, OutgoingMessage
from blocks.kannel import NO_ANSWER, NOT_SENT, TOO_LONG, KannelGateway
from tests.helpers import free_ports, service_unavailable, wait_for

REPO = Path(__file__).resolve().parents[2]
STACK_DIR = REPO / "gateway_stack" / "kannel"
INSTALL = REPO / "gateway_stack" / "install.sh"
PASSWORD = "kannel-test-" + uuid.uuid4().hex[:8]


def _unavailable(reason: str):
    service_unavailable("the Kannel stack", reason)



class DlrListener:
    """Stand-in for the callback service: records every dlr-url call's query."""

    def __init__(self) -> None:
        calls = self.calls = []
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):  # noqa: N802
                q = parse_qs(urlsplit(self.path).query, keep_blank_values=True)
                with lock:
                    calls.append(q)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.daemon_threads = True
        ThreadingHTTPServer.request_queue_size = 1024  # default 5: Kannel's bursts get ECONNRESET
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callbacks/kannel/dlr"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def for_refs(self, refs) -> dict[str, list[dict]]:
        refs = set(refs)
        out: dict[str, list[dict]] = {r: [] for r in refs}
        with self.lock:
            for q in self.calls:
                ref = q.get("ref", [""])[0]
                if ref in refs:
                    out[ref].append(q)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    state: Path
    env: dict
    sendsms_port: int
    ctl_port: int
    dlr: DlrListener
    refs_seen: set = field(default_factory=set)

    def gateway(self, **kw) -> KannelGateway:
        opts = dict(sendsms_url=f"http://127.0.0.1:{self.sendsms_port}/cgi-bin/sendsms", username="smsflow",
                    password=PASSWORD, dlr_url=self.dlr.url, sender_id="SMSFLOW", timeout_s=5)
        opts.update(kw)
        return KannelGateway(**opts)

    def stats(self, detail: bool = False) -> dict:
        with urlopen(f"http://127.0.0.1:{self.ctl_port}/stats{'?detail=1' if detail else ''}", timeout=5) as r:
            return json.loads(r.read())

    def submits(self) -> list[dict]:
        with open(self.state / "sim_submits.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK_DIR / script), str(self.state), *args], env=self.env, capture_output=True,
                              text=True, timeout=120)


@pytest.fixture(scope="module")
def kannel(tmp_path_factory):
    if not Path("/usr/sbin/bearerbox").exists() and not shutil.which("bearerbox"):
        can_root = os.geteuid() == 0 or (shutil.which("sudo") and subprocess.run(
            ["sudo", "-n", "true"], capture_output=True).returncode == 0)
        if not can_root:
            _unavailable("bearerbox is not installed and installing it needs root: run gateway_stack/install.sh")
        r = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            _unavailable(f"gateway_stack/install.sh failed: {r.stderr[-800:]}")
    try:
        import smpp34  # noqa: F401
    except ImportError:
        _unavailable("python package smpp34 missing (pip install smpp34==1.5.0)")

    state = tmp_path_factory.mktemp("kannel-state")
    admin, smsbox, sendsms, smpp, ctl = free_ports(5)
    dlr = DlrListener()
    env = dict(os.environ, KANNEL_ADMIN_PORT=str(admin), KANNEL_SMSBOX_PORT=str(smsbox),
               KANNEL_SENDSMS_PORT=str(sendsms), SIM_SMPP_PORT=str(smpp), SIM_CTL_PORT=str(ctl),
               SIM_DLR_DELAY="0.1", KANNEL_SENDSMS_USER="smsflow", KANNEL_SENDSMS_PASSWORD=PASSWORD,
               KANNEL_MO_URL="http://127.0.0.1:9/inbound/kannel?from=%p&to=%P&text=%a&id=%I",
               SMSFLOW_GATEWAY_PYTHON=sys.executable)
    stack = Stack(state, env, sendsms, ctl, dlr)
    try:
        r = stack.run("start.sh")
        if r.returncode != 0:
            _unavailable(f"start.sh exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
        yield stack
    finally:
        r = stack.run("stop.sh")
        if r.returncode != 0 or r.stderr:
            print(f"stop.sh exited {r.returncode}: {r.stderr[-1500:]}", file=sys.stderr)
        dlr.close()


def _msg(ref: str, phone: str, text: str) -> OutgoingMessage:
    from smsflow.sms_encoding import sms_info

    info = sms_info(text)
    return OutgoingMessage(ref, phone, text, info.encoding, info.segments)


def _final(calls: list[dict]) -> list:
    receipts = [KannelGateway.parse_dlr(q) for q in calls]
    return [r for r in receipts if r.status in ("delivered", "undelivered", "expired", "rejected")]


# --------------------------------------------------------------------------- against the real stack
def test_200_mixed_messages_counted_once_intact_with_final_receipts(kannel):
    run = uuid.uuid4().hex[:6]
    msgs = []
    for i in range(200):
        ref = f"{run}-{i:03d}"
        if i % 2:
            text = f"Заказ №{i} готов, Ёжик! Ждём вас 😀 [ref:{ref}]"
        else:
            text = f"Order {i} ready: 10€ {{ok}} [x] ~^|\\ @£$¥ è_ü [ref:{ref}]"
        msgs.append(_msg(ref, f"+7916{i:04d}001", text))
    assert {m.encoding for m in msgs} == {"GSM-7", "UCS-2"}

    t0 = time.perf_counter()
    results = kannel.gateway().submit(msgs)
    elapsed = time.perf_counter() - t0
    assert [r.reference for r in results] == [m.reference for m in msgs]
    bad = [r for r in results if not r.accepted or r.error_code]
    assert not bad, bad[:3]
    assert all(r.gateway_message_id == r.reference for r in results)  # Kannel returns no id: ours is used

    refs = [m.reference for m in msgs]
    wait_for(lambda: all(kannel.stats(detail=True)["by_ref"].get(r) for r in refs), "all 200 at the simulator", 30)
    time.sleep(0.5)  # a duplicate would show up here
    st = kannel.stats(detail=True)
    counts = {r: st["by_ref"].get(r, 0) for r in refs}
    assert set(counts.values()) == {1}, {r: c for r, c in counts.items() if c != 1}  # 0 lost, 0 duplicates
    assert not [r for r in st["duplicate_refs"] if r.startswith(run)]

    by_ref = {s["ref"]: s for s in kannel.submits() if s.get("ref", "") and s["ref"].startswith(run)}
    for m in msgs:
        sub = by_ref[m.reference]
        assert sub["text"] == m.text, (m.text, sub["text"])  # Cyrillic not '??????', GSM extension intact
        assert sub["dcs"] == (8 if m.encoding == "UCS-2" else 0)
        assert sub["dst"] == m.phone_e164.lstrip("+") and sub["dst_ton"] == 1
        assert sub["src"] == "SMSFLOW"

    # receipts: an SMSC ACK (type 8) and a final DELIVRD (type 1) per message, our ref in each
    calls = wait_for(lambda: (lambda c: c if all(_final(v) for v in c.values()) else None)(kannel.dlr.for_refs(refs)),
                     "final receipts for all 200", 60)
    for ref, qs in calls.items():
        final = _final(qs)
        assert len(final) == 1, (ref, qs)
        r = final[0]
        assert (r.reference, r.status, r.error_code) == (ref, "delivered", "000")
        assert r.gateway_message_id == by_ref[ref]["id"]  # the SMSC's id from the receipt text
        assert r.event_at is not None
        assert "accepted" in {KannelGateway.parse_dlr(q).status for q in qs}  # dlr type 8
    print(f"\n200 messages submitted in {elapsed:.3f}s ({200 / elapsed:.0f} msg/s)")


def test_receipts_become_final_statuses(kannel):
    run = uuid.uuid4().hex[:6]
    weird = f"{run} wéird/ref%2F&x=1+%d"  # '%', '&', '+', '/' and a Kannel escape must survive the dlr-url
    cases = {  # simulator: ...99 UNDELIV err 001, ...98 EXPIRED, ...97 submit_sm rejected (ESME_RINVDSTADR)
        f"{run}-ok": ("+79160000101", "delivered", "000"),
        f"{run}-undeliv": ("+79160000199", "undelivered", "001"),
        f"{run}-expired": ("+79160000198", "expired", "000"),
        f"{run}-rejected": ("+79160000197", "rejected", "0x0000000B"),
        weird: ("+79160000102", "delivered", "000"),
    }
    msgs = [_msg(ref, phone, f"Статус {ref}") for ref, (phone, _s, _e) in cases.items()]
    results = kannel.gateway().submit(msgs)
    assert all(r.accepted and not r.error_code for r in results), results  # SMSC rejects come later, as receipts

    calls = wait_for(lambda: (lambda c: c if all(_final(v) for v in c.values()) else None)(kannel.dlr.for_refs(cases)),
                     "final receipts", 30)
    for ref, (_phone, status, err) in cases.items():
        final = _final(calls[ref])
        assert len(final) == 1, (ref, calls[ref])
        r = final[0]
        assert r.reference == ref
        assert (r.status, r.error_code) == (status, err), (ref, r)
        if status != "rejected":
            assert r.gateway_message_id and r.gateway_message_id != ref  # the SMSC's message id
        else:
            assert r.gateway_message_id == ref  # rejected at submit: no SMSC id exists


def test_bad_messages_are_rejected_alone(kannel):
    run = uuid.uuid4().hex[:6]
    msgs = [
        _msg(f"{run}-a", "+79160000201", f"ok [ref:{run}-a]"),
        _msg(f"{run}-bad", "+7abc", f"bad number [ref:{run}-bad]"),
        _msg(f"{run}-long", "+79160000202", "x" * 1600 + f"[ref:{run}-long]"),  # 11 parts > max_parts 10
        _msg(f"{run}-b", "+79160000203", f"ok [ref:{run}-b]"),
    ]
    res = {r.reference: r for r in kannel.gateway().submit(msgs)}
    assert res[f"{run}-a"].accepted and res[f"{run}-b"].accepted
    bad = res[f"{run}-bad"]
    assert (bad.accepted, bad.transient, bad.error_code) == (False, False, "HTTP_400")
    assert "denied" in bad.error
    long = res[f"{run}-long"]
    assert (long.accepted, long.transient, long.error_code) == (False, False, TOO_LONG)
    wait_for(lambda: kannel.stats(detail=True)["by_ref"].get(f"{run}-b"), "the good ones at the simulator")
    by_ref = kannel.stats(detail=True)["by_ref"]
    assert f"{run}-bad" not in by_ref and f"{run}-long" not in by_ref


def test_no_password_or_phone_in_logs(kannel, caplog):
    caplog.set_level(logging.DEBUG)
    gw = kannel.gateway()
    phone = "+79161234567"
    gw.submit([_msg(uuid.uuid4().hex[:6], phone, "hello"), _msg(uuid.uuid4().hex[:6], "+7abc1234567", "bad")])
    wrong = kannel.gateway(password="wrong-" + PASSWORD)
    with pytest.raises(GatewayUnavailable) as exc:
        wrong.submit([_msg(uuid.uuid4().hex[:6], phone, "x")])
    assert "credentials" in str(exc.value)
    text = caplog.text + str(exc.value) + repr(gw) + str(gw.model_dump())
    assert PASSWORD not in text
    assert phone not in text and "79161234567" not in text
    assert "kannel submit: 2 messages" in caplog.text


def test_smsbox_down_raises_before_anything_is_sent(kannel):
    """Runs last among the stack tests: it stops smsbox, then brings it back."""
    run = uuid.uuid4().hex[:6]

    def quiet():  # earlier tests' messages may still be on their way to the simulator
        a = kannel.stats()["submit_sm"]
        time.sleep(0.3)
        return kannel.stats()["submit_sm"] == a

    wait_for(quiet, "the simulator to be quiet", 15)
    before = kannel.stats()["submit_sm"]
    r = kannel.run("stop.sh", "smsbox")
    assert r.returncode == 0, r.stderr
    try:
        msgs = [_msg(f"{run}-{i}", f"+7916{i:04d}301", f"down [ref:{run}-{i}]") for i in range(50)]
        t0 = time.monotonic()
        with pytest.raises(GatewayUnavailable):
            kannel.gateway().submit(msgs)
        assert time.monotonic() - t0 < 3
        time.sleep(1.0)
        st = kannel.stats(detail=True)
        assert st["submit_sm"] == before
        assert not [k for k in st["by_ref"] if k.startswith(run)]
        dsts = {m.phone_e164.lstrip("+") for m in msgs}
        assert not [s for s in kannel.submits() if s["dst"] in dsts]
    finally:
        r = kannel.run("start.sh")  # idempotent: starts only smsbox again
        assert r.returncode == 0, r.stderr
    ok = kannel.gateway().submit([_msg(f"{run}-back", "+79160000401", f"back [ref:{run}-back]")])
    assert ok[0].accepted and not ok[0].error_code
    wait_for(lambda: kannel.stats(detail=True)["by_ref"].get(f"{run}-back") == 1, "the stack working again")


# --------------------------------------------------------------------------- no stack needed
def test_unreachable_gateway_raises_unavailable():
    (port,) = free_ports(1)
    gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{port}/cgi-bin/sendsms", password="x", timeout_s=2)
    with pytest.raises(GatewayUnavailable):
        gw.submit([OutgoingMessage("r1", "+79160000001", "hi")])
    assert gw.submit([]) == []
    assert gw.lookup(["r1"]) == {} and gw.fetch_receipts() == []


class FakeSmsbox:
    """A socket-level stand-in for smsbox that answers by the last digits of 'to'."""

    def __init__(self, stop_listening_on_silent: bool = False):
        self.stop_listening_on_silent = stop_listening_on_silent
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                target = head.split(b" ")[1].decode()
                q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}
                with self.lock:
                    self.requests.append(q)
                to = q.get("to", "")
                if not to:
                    status, body = 400, "Missing receiver number, rejected"
                elif to.endswith("503"):
                    status, body = 503, "Temporal failure, try again later."
                elif to.endswith("403"):
                    status, body = 403, "Not routable. Do not try again."
                elif to.endswith("003"):
                    status, body = 202, "3: Queued for later delivery"
                elif to.endswith("666"):
                    if self.stop_listening_on_silent:
                        self.close()
                    return  # read the request, close without an answer
                else:
                    status, body = 202, "0: Accepted for delivery"
                data = body.encode()
                conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\nConnection: Keep-Alive\r\n\r\n"
                             .encode() + data)

    def close(self):
        try:  # shutdown wakes the thread blocked in accept(); close() alone would leave it listening
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def test_answer_mapping_on_a_fake_smsbox():
    fake = FakeSmsbox()
    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw",
                           dlr_url="http://127.0.0.1:8787/callbacks/kannel/dlr?token=a%2Fb", concurrency=4,
                           timeout_s=3)
        phones = {"ok": "+79160000001", "queued": "+79160000003", "temp": "+79160000503",
                  "noroute": "+79160000403", "silent": "+79160000666"}
        msgs = [OutgoingMessage(k, p, "Привет" if k == "ok" else "hi") for k, p in phones.items()]
        res = {r.reference: r for r in gw.submit(msgs)}
        assert res["ok"].accepted and res["ok"].gateway_message_id == "ok" and not res["ok"].error_code
        assert res["queued"].accepted and res["queued"].error.startswith("3:")
        assert (res["temp"].accepted, res["temp"].transient, res["temp"].error_code) == (False, True, "HTTP_503")
        assert (res["noroute"].accepted, res["noroute"].transient) == (False, False)
        # written but never answered: never resent (at most once), flagged for the receipt / TTL to settle
        assert res["silent"].accepted and res["silent"].error_code == NO_ANSWER and not res["silent"].transient
        assert res["silent"].in_doubt and not res["ok"].in_doubt

        reqs = {q["to"]: q for q in fake.requests if "to" in q}
        assert len(fake.requests) == len(msgs) + 1  # the probe, then each message exactly once
        ok = reqs["+79160000001"]
        assert (ok["coding"], ok["charset"], ok["text"]) == ("2", "UTF-8", "Привет")
        assert "coding" not in reqs["+79160000003"] and reqs["+79160000003"]["charset"] == "UTF-8"
        # the dlr-url arrived as ONE value: Kannel escapes intact, literal '%' doubled, our ref inside
        dlr = ok["dlr-url"]
        assert dlr.startswith("http://127.0.0.1:8787/callbacks/kannel/dlr?token=a%%2Fb&ref=ok&type=%d&answer=%A")
        assert "&msgid=%F" in dlr and "&ts=%T" in dlr and ok["dlr-mask"] == "31"
    finally:
        fake.close()
    # the fake is gone: nothing reachable -> GatewayUnavailable, not per-message failures
    with pytest.raises(GatewayUnavailable):
        gw.submit(msgs)


def test_same_reference_twice_in_a_batch_is_sent_once():
    fake = FakeSmsbox()
    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw", concurrency=4)
        msgs = [OutgoingMessage("dup", "+79160000001", "hi"), OutgoingMessage("x", "+79160000002", "hi"),
                OutgoingMessage("dup", "+79160000001", "hi")]
        res = gw.submit(msgs)
    finally:
        fake.close()
    assert [r.reference for r in res] == ["dup", "x", "dup"]
    assert all(r.accepted for r in res) and res[0] == res[2]
    assert sorted(q.get("to", "") for q in fake.requests) == ["", "+79160000001", "+79160000002"]


def test_more_takes_further_messages_into_the_same_call():
    """``more``: when every message is handed out, the call asks for more (one caller at a time) until it
    gets none; every message is sent once, every result is handed to ``on_results`` once and returned
    in order, and a message of a later part may repeat an earlier reference only within its part."""
    fake = FakeSmsbox()
    parts = [[OutgoingMessage(f"p{k}-{i}", f"+791600{k:02d}{i:03d}", "hi") for i in range(n)]
             for k, n in enumerate((5, 1, 40, 3))]
    asked: list[int] = []
    handed: list[str] = []
    lock = threading.Lock()

    def more():
        asked.append(len(parts))
        return parts.pop(0) if parts else []

    def on_results(chunk):
        with lock:
            handed.extend(r.reference for r in chunk)

    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw", concurrency=4)
        first = [OutgoingMessage("first-0", "+79160000001", "hi"), OutgoingMessage("first-1", "+79160000002", "hi")]
        res = gw.submit(first, on_results=on_results, more=more)
    finally:
        fake.close()
    refs = ["first-0", "first-1"] + [f"p{k}-{i}" for k, n in enumerate((5, 1, 40, 3)) for i in range(n)]
    assert [r.reference for r in res] == refs and all(r.accepted for r in res)
    assert sorted(handed) == sorted(refs)  # each once
    assert asked == [4, 3, 2, 1, 0]  # until it got nothing, and not after
    assert sorted(q["to"] for q in fake.requests if "to" in q) == sorted(
        ["+79160000001", "+79160000002"] + [f"+791600{k:02d}{i:03d}" for k, n in enumerate((5, 1, 40, 3)) for i in range(n)])
    assert len(fake.requests) == len(refs) + 1  # the probe, then each message exactly once


def test_more_is_not_asked_once_smsbox_is_lost_and_its_errors_come_after_the_results():
    fake = FakeSmsbox(stop_listening_on_silent=True)
    asked: list[int] = []
    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw",
                           concurrency=1, timeout_s=2)
        msgs = [OutgoingMessage(f"m{i}", p, "hi") for i, p in enumerate(["+79160000001", "+79160000666", "+79160000002"])]
        res = gw.submit(msgs, on_results=lambda chunk: None, more=lambda: asked.append(1) or [msgs[0]])
    finally:
        fake.close()
    assert asked == []  # Kannel stopped answering: the call ends, the caller's next call probes
    assert [r.error_code for r in res] == [None, NO_ANSWER, NOT_SENT]

    fake = FakeSmsbox()
    handed: list[str] = []

    def broken():
        raise RuntimeError("the store is gone")

    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw", concurrency=3)
        msgs = [OutgoingMessage(f"e{i}", f"+7916000{i:04d}", "hi") for i in range(7)]
        with pytest.raises(RuntimeError, match="the store is gone"):
            gw.submit(msgs, on_results=lambda chunk: handed.extend(r.reference for r in chunk), more=broken)
    finally:
        fake.close()
    assert sorted(handed) == sorted(m.reference for m in msgs)  # every result handed over before the error


def test_smsbox_lost_mid_batch():
    """The probe is answered, then smsbox vanishes: the request written but unanswered is never
    resent (at most once); what was never written is transient (safe to retry)."""
    fake = FakeSmsbox(stop_listening_on_silent=True)
    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw",
                           concurrency=1, timeout_s=2)
        phones = ["+79160000001", "+79160000666", "+79160000002", "+79160000004"]
        res = gw.submit([OutgoingMessage(f"m{i}", p, "hi") for i, p in enumerate(phones)])
    finally:
        fake.close()
    assert res[0].accepted and not res[0].error_code
    assert res[1].accepted and res[1].error_code == NO_ANSWER and res[1].in_doubt
    for r in res[2:]:
        assert (r.accepted, r.transient, r.error_code) == (False, True, NOT_SENT)
    assert [q.get("to") for q in fake.requests] == [None, "+79160000001", "+79160000666"]


def test_parse_dlr_variants():
    p = KannelGateway.parse_dlr
    r = p({"ref": ["r1"], "type": ["1"], "answer": ["id:77 sub:001 dlvrd:001 submit date:2611251047 "
                                                     "done date:2611251048 stat:DELIVRD err:000 text:Hello id:9"],
           "msgid": ["77"], "ts": ["1795603645"]})
    assert (r.reference, r.gateway_message_id, r.status, r.error_code) == ("r1", "77", "delivered", "000")
    assert r.event_at is not None and r.event_at.tzinfo is None
    assert p({"ref": "r2", "type": "2", "answer": "id:5 stat:UNDELIV err:027"}).status == "undelivered"
    assert p({"ref": "r2", "type": "2", "answer": "id:5 stat:UNDELIV err:027"}).error_code == "027"
    assert p({"ref": "r3", "type": "34", "answer": "id:6 stat:EXPIRED err:000"}).status == "expired"
    assert p({"ref": "r3", "type": "34"}).status == "expired"
    assert p({"ref": "r3", "type": "2", "answer": "id:6 stat:DELETED err:000"}).status == "undelivered"
    assert p({"ref": "r3", "type": "2", "answer": "id:6 stat:REJECTD err:011"}).status == "rejected"
    assert p({"ref": "r3", "type": "4", "answer": "id:6 stat:ENROUTE err:000"}).status == "enroute"
    assert p({"ref": "r3", "type": "1", "answer": "id:6 stat:UNKNOWN err:000"}).status == "unknown"
    assert p({"ref": "r3", "type": "2"}).status == "undelivered"
    assert p({"ref": "r3", "type": "4"}).status == "enroute"
    ack = p({"ref": "r4", "type": "8", "answer": "ACK/", "msgid": "123", "ts": ""})
    assert (ack.status, ack.gateway_message_id, ack.error_code, ack.event_at) == ("accepted", "123", None, None)
    nack = p({"ref": "r5", "type": "16", "answer": "NACK/0x0000000b/Invalid Destination Address"})
    assert (nack.status, nack.error_code, nack.gateway_message_id) == ("rejected", "0x0000000B", "r5")
    assert p({"ref": "r6", "type": "0"}).status == "unknown"
    for bad in ({"type": "1"}, {"ref": "", "type": "1"}, {"ref": "x", "type": "%d"}, {"ref": "x"}):
        with pytest.raises(ValueError):
            p(bad)
    raw = p({"ref": "r7", "type": "1", "password": "leak"}).raw
    assert "password" not in raw


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_request_quoting_is_urllib_quote(value):
    from blocks.kannel import _quote

    try:
        expected = quote(value, safe="")
    except UnicodeEncodeError:  # a lone surrogate: neither can encode it
        with pytest.raises(UnicodeEncodeError):
            _quote(value)
        return
    assert _quote(value) == expected


def test_dlr_url_is_one_encoded_value():
    gw = KannelGateway(password="s3cret", dlr_url="http://h:1/cb", sender="Shop")
    fixed, probe = gw._fixed()
    req = gw._request(OutgoingMessage("a&b %d", "+79160000001", "Hi & bye 100%"), fixed).decode()
    query = req.split(" ")[1].split("?", 1)[1]
    params = dict(kv.split("=", 1) for kv in query.split("&"))  # no '&' leaks out of any value
    assert unquote(params["text"]) == "Hi & bye 100%" and unquote(params["from"]) == "Shop"
    assert unquote(params["to"]) == "+79160000001"
    dlr = unquote(params["dlr-url"])
    assert dlr.startswith("http://h:1/cb?ref=a%%26b%%20%%25d&type=%d&answer=%A&msgid=%F")  # Kannel: %% -> %
    assert b"to=" not in probe and b"s3cret" in probe  # the probe cannot send anything


def test_unanswered_request_is_settled_by_its_receipt_or_sent_again_after_the_grace(sqlite_engine):
    """smsbox read the request and vanished without answering: the message is in doubt and stays
    'queued'. The next run's recovery settles it from a receipt naming our reference (the SMSC got
    it: never resent) and sends again only what has no trace after ``evidence_grace_s``."""
    from sqlalchemy import text

    from blocks.gateway import Receipt
    from store.db import bulk_insert, utcnow
    from tasks.policy import always_open
    from tasks.reconcile import store_receipts
    from smsflow.ratelimit import TokenBucket
    from tasks.send import recover_in_flight, send_messages

    engine, now = sqlite_engine, utcnow()
    with engine.begin() as c:
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES ('doubt', 's', 'all', 't', 'transactional', 0, 'running', :p)"),
                  {"p": always_open().model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = 'doubt'")).scalar()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "step", "phone_e164", "text", "encoding", "segments",
                                  "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(k, cid, "main", p, "hi", "GSM-7", 1, 0, "planned", 0, now, now)
                     for k, p in (("k-a", "+79160000666"), ("k-b", "+79161000666"))])
    fake = FakeSmsbox()
    try:
        gw = KannelGateway(sendsms_url=f"http://127.0.0.1:{fake.port}/cgi-bin/sendsms", password="pw", concurrency=2,
                           timeout_s=1, evidence_grace_s=0)
        first = send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(1000), claimer="r1", max_messages=10)
        assert (first.in_doubt, first.submitted) == (2, 0), vars(first)
        with engine.begin() as c:
            assert c.execute(text("SELECT COUNT(*) FROM outbox WHERE state = 'queued'")).scalar() == 2
        store_receipts(engine, gw.gateway_name, [Receipt("k-a", "k-a", "delivered", None, None)])
        assert recover_in_flight(engine, cid, gw, "r2") == (1, 1)
        send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(1000), claimer="r2", max_messages=10)
    finally:
        fake.close()
    sent = [q["to"] for q in fake.requests if q.get("to")]
    assert sent.count("+79160000666") == 1  # its receipt proved it reached the SMSC: never again
    assert sent.count("+79161000666") == 2  # no trace after the grace: it never got through, sent again
