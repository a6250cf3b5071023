"""SmppGateway against the real SMPP 3.4 SMSC simulator (``gateway_stack/kannel/smsc_sim.py``,
PyPI ``smpp34``), started in a subprocess on free ports with a temporary log.

Under ``CI`` a simulator that cannot start FAILS the tests; locally they are skipped.
The tests at the end need no simulator (encoding, receipt parsing).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest

from blocks.gateway import GatewayUnavailable, OutgoingMessage
from blocks.smpp import (
    NO_RESPONSE, NOT_SENT, SmppGateway, decode_short_message, encode_message, gsm7_decode, gsm7_encode,
    receipt_from_deliver_sm,
)
from tests.helpers import free_ports, service_unavailable, wait_for

REPO = Path(__file__).resolve().parents[2]
SIM = REPO / "gateway_stack" / "kannel" / "smsc_sim.py"
PASSWORD = "pw" + uuid.uuid4().hex[:6]


def _unavailable(reason: str):
    service_unavailable("the SMSC simulator", reason)



@dataclass
class Sim:
    proc: subprocess.Popen
    smpp_port: int
    ctl_port: int
    log: Path
    spool_dir: Path

    def get(self, path: str) -> dict:
        with urlopen(f"http://127.0.0.1:{self.ctl_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def stats(self, detail: bool = False) -> dict:
        return self.get("/stats?detail=1" if detail else "/stats")

    def submits(self) -> list[dict]:
        with open(self.log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def gateway(self, **kw) -> SmppGateway:
        opts = dict(host="127.0.0.1", port=self.smpp_port, system_id="smsflow", password=PASSWORD,
                    sender_id="SMSFLOW", connect_timeout_s=3,
                    spool_path=str(self.spool_dir / f"spool-{uuid.uuid4().hex[:8]}.sqlite"))
        opts.update(kw)
        return SmppGateway(**opts)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    try:
        import smpp34  # noqa: F401
    except ImportError:
        _unavailable("python package smpp34 missing (pip install smpp34==1.5.0)")
    state = tmp_path_factory.mktemp("smpp-sim")
    smpp_port, ctl_port = free_ports(2)
    env = dict(os.environ, SIM_SMPP_PORT=str(smpp_port), SIM_CTL_PORT=str(ctl_port),
               SIM_LOG=str(state / "sim_submits.jsonl"), SIM_DLR_DELAY="0.1")
    out = open(state / "sim.out", "w")
    proc = subprocess.Popen([sys.executable, str(SIM)], env=env, stdout=out, stderr=subprocess.STDOUT)
    s = Sim(proc, smpp_port, ctl_port, state / "sim_submits.jsonl", state)
    try:
        def up():
            if proc.poll() is not None:
                return "exited"
            try:
                s.stats()
                return "up"
            except OSError:
                return None

        try:
            st = wait_for(up, "the simulator to listen", 15, interval=0.05)
        except AssertionError as exc:
            _unavailable(str(exc))
        if st == "exited":
            _unavailable(f"simulator exited {proc.returncode}: {(state / 'sim.out').read_text()[-1500:]}")
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        out.close()


def _msg(ref: str, phone: str, text: str) -> OutgoingMessage:
    from smsflow.sms_encoding import sms_info

    info = sms_info(text)
    return OutgoingMessage(ref, phone, text, info.encoding, info.segments)


def _quiet(sim: Sim) -> None:
    def quiet():
        a = sim.stats()["submit_sm"]
        time.sleep(0.3)
        return sim.stats()["submit_sm"] == a

    wait_for(quiet, "the simulator to be quiet", 15, interval=0.05)


# --------------------------------------------------------------------------- against the simulator
def test_300_mixed_messages_once_each_and_intact(sim):
    run = uuid.uuid4().hex[:6]
    msgs = []
    for i in range(300):
        ref = f"{run}-{i:03d}"
        # the run's own suffix, ending in 0-8: never the simulator's 97/98/99 (reject, fail, expire)
        phone = f"+7916{i:04d}{int(run[:2], 16) % 100:02d}{int(run[2], 16) % 9}"
        if i % 3 == 0:
            text = f"Order {i}: 10€ {{ok}} [x] ~^|\\ @£$¥ è_ü [ref:{ref}]"
        elif i % 3 == 1:
            text = f"Заказ №{i} готов, Ёжик! Ждём вас 😀 [ref:{ref}]"
        else:  # 3 parts of GSM-7, with extension chars around the cuts
            text = f"[ref:{ref}] " + "Long message {€} " * 20
        msgs.append(_msg(ref, phone, text))
    assert sum(m.segments == 3 for m in msgs) == 100
    gw = sim.gateway()
    results = gw.submit(msgs)
    assert len(results) == 300
    assert all(r.accepted and r.gateway_message_id and not r.error_code for r in results), \
        [r for r in results if not r.accepted][:3]
    assert len({r.gateway_message_id for r in results}) == 300

    st = sim.stats(detail=True)
    counts = {m.reference: st["by_ref"].get(m.reference, 0) for m in msgs}
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    assert not [k for k in st["duplicate_refs"] if k.startswith(run)]

    # what the SMSC decoded equals what we sent; parts reassemble by their UDH
    by_dst: dict[str, list[dict]] = {}
    for rec in sim.submits():
        by_dst.setdefault(rec["dst"], []).append(rec)
    ids = {r.reference: r.gateway_message_id for r in results}
    for m in msgs:
        recs = sorted(by_dst[m.phone_e164.lstrip("+")], key=lambda r: r["part"])
        assert [r["part"] for r in recs] == list(range(1, m.segments + 1))
        assert {r["parts"] for r in recs} == {m.segments}
        assert "".join(r["text"] for r in recs) == m.text
        assert recs[0]["id"] == ids[m.reference]  # the receipt id is the first part's
        assert {r["dcs"] for r in recs} == {0 if m.encoding == "GSM-7" else 8}
        assert all(r["reg_dlr"] == 1 and r["src"] == "SMSFLOW" for r in recs)
        if m.segments > 1:
            assert all(r["esm_class"] & 0x40 and len(r["udh"]) == 12 for r in recs)
            assert len({r["udh"][6:8] for r in recs}) == 1  # one concatenation reference
    # receipts collected during submit + linger (SIM_DLR_DELAY 0.1 s) come back from fetch_receipts
    receipts = gw.fetch_receipts()
    got = {r.gateway_message_id: r for r in receipts}
    assert set(ids.values()) <= set(got)
    assert all(got[i].status == "delivered" and got[i].error_code == "000" for i in ids.values())
    assert len(receipts) == 300  # one per message: a 3-part one's once all three parts have a final receipt
    assert all(len(got[ids[m.reference]].raw["parts"]) == 3 for m in msgs if m.segments == 3)
    assert gw.fetch_receipts() == [] or True  # later receipts of other tests may arrive, nothing to assert


def test_receipts_map_to_final_statuses(sim):
    run = uuid.uuid4().hex[:6]
    cases = {"99": "undelivered", "98": "expired", "97": "rejected", "01": "delivered"}
    msgs = [_msg(f"{run}-{s}", f"+7916{int(run[:4], 16) % 10000:04d}1{s}", f"status {s} [ref:{run}-{s}]")
            for s in cases]
    # the simulator sends each receipt once, to a bound receiver, and does not queue it:
    # the bind must linger past SIM_DLR_DELAY (a real SMSC would retry later)
    gw = sim.gateway(receipt_linger_s=1.0)
    res = {r.reference: r for r in gw.submit(msgs)}
    rej = res[f"{run}-97"]
    assert not rej.accepted and not rej.transient and not rej.in_doubt and rej.error_code == "0x0000000B"
    for s in ("99", "98", "01"):
        assert res[f"{run}-{s}"].accepted
    # spooled during the linger, handed out by fetch_receipts (plus whatever its own bind drains)
    want = {res[f"{run}-{s}"].gateway_message_id: cases[s] for s in ("99", "98", "01")}
    got: dict = {}
    deadline = time.monotonic() + 10
    while set(want) - set(got) and time.monotonic() < deadline:
        for r in gw.fetch_receipts():
            got[r.gateway_message_id] = r
    assert {k: got[k].status for k in want if k in got} == want
    assert got[res[f"{run}-99"].gateway_message_id].error_code == "001"
    assert got[res[f"{run}-99"].gateway_message_id].reference is None
    # the SMSC's rejection is final at submit already: status "rejected", SMPP status as the code
    assert rej.error == "ESME_RINVDSTADR"


def test_receipts_survive_in_the_spool(sim, tmp_path):
    """A receipt collected during submit() is on disk: another instance (after a crash) gets it."""
    run = uuid.uuid4().hex[:6]
    spool = str(tmp_path / "spool.sqlite")
    gw = sim.gateway(spool_path=spool, receipt_linger_s=1.0)
    r = gw.submit([_msg(f"{run}-s", "+79165550101", f"spool [ref:{run}-s]")])[0]
    assert r.accepted
    other = sim.gateway(spool_path=spool, receipt_window_s=0)  # no bind: spool only
    got = [x for x in other.fetch_receipts() if x.gateway_message_id == r.gateway_message_id]
    assert [x.status for x in got] == ["delivered"]
    assert gw.fetch_receipts() == [] or True


def test_mo_comes_back_from_fetch_inbound(sim):
    _quiet(sim)
    gw = sim.gateway(receipt_window_s=2.0)
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("mo", gw.fetch_inbound()))
    t.start()
    try:
        wait_for(lambda: sim.stats()["sessions"] >= 1, "fetch_inbound to bind", 5, interval=0.05)
        for q in ({"from": "79990001122", "to": "12345", "text": "STOP"},
                  {"from": "79990001133", "to": "12345", "text": "Отписаться ёжик"}):
            r = sim.get("/mo?" + urlencode(q))
            assert r.get("ok"), r
    finally:
        t.join(15)
    mo = out["mo"]
    assert [(m["from"], m["to"], m["text"]) for m in mo] == [
        ("+79990001122", "12345", "STOP"), ("+79990001133", "12345", "Отписаться ёжик")]
    assert all(m["gateway_message_id"] for m in mo)
    assert gw.fetch_inbound() == []


def test_simulator_down_raises_before_anything_is_sent(sim):
    _quiet(sim)
    before = sim.stats()["submit_sm"]
    (port,) = free_ports(1)  # nothing listens there
    gw = sim.gateway(port=port, connect_timeout_s=2)
    msgs = [_msg(f"down-{i}", f"+7916{i:04d}302", f"down [ref:down-{i}]") for i in range(20)]
    t0 = time.monotonic()
    with pytest.raises(GatewayUnavailable):
        gw.submit(msgs)
    assert time.monotonic() - t0 < 5
    assert sim.stats()["submit_sm"] == before
    assert gw.lookup(["down-1"]) == {}
    # fetch without a reachable SMSC still hands out the spool (here: nothing)
    assert gw.fetch_receipts() == [] and gw.fetch_inbound() == []


def test_throughput_2000_messages(sim, capsys):
    _quiet(sim)
    run = uuid.uuid4().hex[:6]
    # numbers never end in 97-99: the simulator rejects, expires or fails those
    msgs = [_msg(f"{run}-{i}", f"+7917{i:05d}{int(run[:2], 16) % 90:02d}", f"Throughput {i} [ref:{run}-{i}]")
            for i in range(2000)]
    gw = sim.gateway(receipt_linger_s=0)  # defaults: 2 binds x window 100
    t0 = time.perf_counter()
    results = gw.submit(msgs)
    elapsed = time.perf_counter() - t0
    assert all(r.accepted for r in results)
    rate = len(msgs) / elapsed
    with capsys.disabled():
        print(f"\nSMPP submit throughput: {len(msgs)} messages in {elapsed:.2f}s = {rate:.0f} msg/s "
              f"({gw.binds} binds x window {gw.window_size}, registered_delivery=1, bind+unbind included)")
    st = sim.stats(detail=True)
    assert sum(1 for m in msgs if st["by_ref"].get(m.reference) == 1) == 2000
    assert rate > 100


# --------------------------------------------------------------------------- no simulator needed
class _ScriptedSmsc:
    """A raw-socket SMSC on a free port (a thread per connection): binds are accepted (or refused
    after ``max_binds``); each submit_sm is decoded with smpp34's codec and answered by
    ``script(dst, n)``: ``(status, message_id)``, or ``"drop"`` (close without a resp). Responses are
    held while more PDUs are already waiting, so ``max_outstanding`` is what the client had in flight."""

    def __init__(self, script, max_binds: int = 100):
        import struct

        self.script, self.max_binds, self.struct = script, max_binds, struct
        self.calls: list = []  # decoded smpp34.SubmitSm
        self.binds = self.enquire_links = 0
        self.max_outstanding = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self, conn):
        import select

        import smpp34

        pack, unpack = self.struct.pack, self.struct.unpack
        held: list[bytes] = []
        try:
            while True:
                if held and not select.select([conn], [], [], 0.005)[0]:
                    conn.sendall(b"".join(held))
                    held.clear()
                head = self._read(conn, 16)
                length, cid, _st, seq = unpack(">IIII", head)
                body = self._read(conn, length - 16)
                if cid in (0x09, 0x02):  # bind_transceiver / bind_transmitter
                    with self.lock:
                        self.binds += 1
                        ok = self.binds <= self.max_binds
                    conn.sendall(pack(">IIII", 21, 0x80000000 | cid, 0 if ok else 0x05, seq) + b"FAKE\0")
                elif cid == 0x04:
                    pdu = smpp34.decode(head + body)
                    with self.lock:
                        self.calls.append(pdu)
                        action = self.script(pdu.destination_addr, len(self.calls))
                    if action == "drop":
                        conn.close()
                        return
                    if action == "hang":  # never answered, the connection stays up
                        continue
                    status, mid = action
                    mid_b = (mid or "").encode() + b"\0"
                    held.append(pack(">IIII", 16 + len(mid_b), 0x80000004, status, seq) + mid_b)
                    with self.lock:
                        self.max_outstanding = max(self.max_outstanding, len(held))
                elif cid == 0x06:
                    conn.sendall(b"".join(held) + pack(">IIII", 16, 0x80000006, 0, seq))
                    held.clear()
                    conn.close()
                    return
                elif cid == 0x15:
                    with self.lock:
                        self.enquire_links += 1
                    conn.sendall(pack(">IIII", 16, 0x80000015, 0, seq))
        except (ConnectionError, OSError):
            pass

    def close(self):
        self.sock.close()


def test_submit_result_mapping(tmp_path):
    def script(dst, k):
        if dst.endswith("58"):
            return 0x58, None
        if dst.endswith("14"):
            return 0x14, None
        if dst.endswith("45"):
            return 0x45, None
        if dst.endswith("00"):
            return "drop"  # the connection dies with this submit_sm unanswered
        return 0, f"id{k}"

    smsc = _ScriptedSmsc(script)
    gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                     window_size=1, binds=1, max_reconnects=0, connect_timeout_s=3)
    msgs = [OutgoingMessage("ok", "+79160000001", "hi"),
            OutgoingMessage("thr", "+79160000058", "hi"),
            OutgoingMessage("full", "+79160000014", "hi"),
            OutgoingMessage("bad", "+79160000045", "hi"),
            OutgoingMessage("lost", "+79160000100", "hi"),
            OutgoingMessage("after", "+79160000002", "hi"),
            OutgoingMessage("ok", "+79160000001", "hi"),
            OutgoingMessage("nonum", "hello", "hi"),
            OutgoingMessage("huge", "+79160000003", "x" * 153 * 11)]
    try:
        r = gw.submit(msgs)
    finally:
        smsc.close()
    assert (r[0].accepted, r[0].gateway_message_id) == (True, "id1")
    assert r[1].transient and r[1].error_code == "0x00000058" and not r[1].accepted
    assert r[2].transient and r[2].error_code == "0x00000014"
    assert not r[3].transient and not r[3].accepted and r[3].error_code == "0x00000045"
    assert r[4].in_doubt and r[4].error_code == NO_RESPONSE
    assert r[5].transient and r[5].error_code == NOT_SENT  # the session was dead before it was issued
    assert r[6] == r[0] and len([c for c in smsc.calls if c.destination_addr == "79160000001"]) == 1
    assert not r[7].accepted and not r[7].transient
    assert not r[8].accepted and not r[8].transient and "max_parts" in r[8].error
    c = smsc.calls[0]
    assert (c.source_addr, c.source_addr_ton, c.source_addr_npi) == ("SMSFLOW", 5, 0)
    assert (c.dest_addr_ton, c.dest_addr_npi, c.registered_delivery, c.data_coding, c.esm_class) == (1, 1, 1, 0, 0)
    assert c.short_message == b"hi" and c.service_type == ""
    num = SmppGateway(password="x", source_addr="+4915112345")
    assert num._source() == ("4915112345", 1, 1)


def test_window_bounds_outstanding_submits(tmp_path):
    smsc = _ScriptedSmsc(lambda dst, k: (0, f"id-{dst}"))
    try:
        gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                         window_size=7, binds=1)
        res = gw.submit([OutgoingMessage(f"r{i}", f"+7916{i:07d}", "hi") for i in range(100)])
    finally:
        smsc.close()
    assert all(r.accepted for r in res) and smsc.max_outstanding == 7
    assert len(smsc.calls) == 100


def test_several_binds_share_the_batch_and_a_refused_bind_is_skipped(tmp_path):
    """binds=3 against an SMSC allowing 2: both bound sessions send (own windows, own sequence
    numbers), the refused third does not matter, every message goes exactly once."""
    smsc = _ScriptedSmsc(lambda dst, k: (0, f"m{k}"), max_binds=2)
    try:
        gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                         window_size=5, binds=3)
        msgs = [OutgoingMessage(f"r{i}", f"+7916{i:07d}", f"hello {i}") for i in range(300)]
        res = gw.submit(msgs)
    finally:
        smsc.close()
    assert all(r.accepted for r in res)
    assert sorted(c.destination_addr for c in smsc.calls) == sorted(m.phone_e164[1:] for m in msgs)
    assert len({r.gateway_message_id for r in res}) == 300
    assert smsc.binds == 3 and gw.last_batch_stats["sessions"] == 2


def test_lost_bind_is_replaced_and_only_its_inflight_messages_are_in_doubt(tmp_path):
    """One session dies with submits in flight: those are in doubt (never resent), a new bind takes
    over the rest of the batch."""
    def script(dst, k):
        return "drop" if dst.endswith("0000050") else (0, f"m{k}")

    smsc = _ScriptedSmsc(script)
    try:
        gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                         window_size=10, binds=1, max_reconnects=1)
        msgs = [OutgoingMessage(f"r{i}", f"+7916{i:07d}", "hi") for i in range(200)]
        res = gw.submit(msgs)
    finally:
        smsc.close()
    doubt = [r for r in res if r.in_doubt]
    assert 1 <= len(doubt) <= 10 and res[50].in_doubt
    assert all(r.accepted for r in res if not r.in_doubt)
    sent = [c.destination_addr for c in smsc.calls]
    assert len(sent) == len(set(sent))  # nothing sent twice
    assert smsc.binds == 2


def test_no_response_within_the_timer_is_in_doubt_and_enquire_link_keeps_the_bind(tmp_path):
    smsc = _ScriptedSmsc(lambda dst, k: "hang" if dst.endswith("3") else (0, f"m{k}"))
    try:
        gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                         window_size=2, binds=1, max_reconnects=0, response_timeout_s=1.0)
        t0 = time.monotonic()
        res = gw.submit([OutgoingMessage(f"r{i}", f"+791600000{i:02d}", "hi") for i in range(8)])
        assert time.monotonic() - t0 < 5
        assert res[3].in_doubt and res[3].error_code == NO_RESPONSE and "no submit_sm_resp" in res[3].error
        assert all(r.accepted for r in res[:3])
        # not issued after the session was dropped: provably not sent; nothing was sent twice
        assert all(r.accepted or r.in_doubt or (r.transient and r.error_code == NOT_SENT) for r in res)
        assert len({c.destination_addr for c in smsc.calls}) == len(smsc.calls)
        # an idle bind sends enquire_link (and stays up while it is answered)
        idle = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_window_s=2.0,
                           enquire_link_s=0.4, response_timeout_s=1.0)
        assert idle.fetch_receipts() == []
        assert smsc.enquire_links >= 2
    finally:
        smsc.close()


def test_gsm7_encoding_tables():
    text = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./09:;<=>?¡AZÄÖÑÜ§¿azäöñüà"
    assert gsm7_decode(gsm7_encode(text)) == text
    assert gsm7_encode("€{}[]~^|\\\f") == bytes.fromhex("1b651b281b291b3c1b3e1b3d1b141b401b2f1b0a")
    assert gsm7_encode("@A") == b"\x00A" and gsm7_encode("_") == b"\x11"
    with pytest.raises(ValueError):
        gsm7_encode("Ж")
    dcs, parts = encode_message("Привет", ucs2=False)
    assert dcs == 8 and parts == ["Привет".encode("utf-16-be")]
    dcs, parts = encode_message("plain", ucs2=True)  # forced UCS-2
    assert dcs == 8 and parts == ["plain".encode("utf-16-be")]
    dcs, parts = encode_message("a" * 100, ucs2=True)
    assert dcs == 8 and [len(p) for p in parts] == [134, 66]
    dcs, parts = encode_message("€" * 100, ucs2=False)  # 200 septets, escapes never cut
    assert dcs == 0 and all(len(p) <= 153 for p in parts) and len(parts) == 2
    assert decode_short_message(0, b"STOP") == "STOP"
    assert decode_short_message(8, "ёж".encode("utf-16-be")) == "ёж"
    assert decode_short_message(3, "é".encode("latin-1")) == "é"


def test_receipt_parsing_text_and_tlvs():
    class Ev:
        esm_class = 0x04

        def __init__(self, sm, tlvs=()):
            self.short_message, self.tlvs = sm, list(tlvs)

    import smpp34

    r = receipt_from_deliver_sm(Ev(b"id:123 sub:001 dlvrd:000 submit date:2611251047 done date:2611251048 "
                                   b"stat:UNDELIV err:027 text:hello"))
    assert (r.gateway_message_id, r.status, r.error_code, r.reference) == ("123", "undelivered", "027", None)
    assert r.event_at is not None and r.event_at.minute == 48
    for state, status in ((2, "delivered"), (3, "expired"), (5, "undelivered"), (8, "rejected"), (1, "enroute"),
                          (6, "accepted"), (7, "unknown")):
        r = receipt_from_deliver_sm(Ev(b"", [smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, b"abc\0"),
                                             smpp34.Tlv(smpp34.TLV_MESSAGE_STATE, bytes([state]))]))
        assert (r.gateway_message_id, r.status) == ("abc", status)
    r = receipt_from_deliver_sm(Ev(b"id:9 stat:EXPIRED err:000 text:"))
    assert (r.status, r.error_code) == ("expired", "000")


class _DroppingSmsc:
    """A raw-socket SMSC: binds, then closes the connection on the first submit_sm (no resp)."""

    def __init__(self):
        import struct

        self.submits = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.struct = struct
        threading.Thread(target=self._serve, daemon=True).start()

    def _read(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self):
        pack, unpack = self.struct.pack, self.struct.unpack
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        try:
            while True:
                length, cid, _st, seq = unpack(">IIII", self._read(conn, 16))
                self._read(conn, length - 16)
                if cid == 0x09:  # bind_transceiver
                    conn.sendall(pack(">IIII", 21, 0x80000009, 0, seq) + b"FAKE\0")
                elif cid == 0x04:  # submit_sm: vanish without an answer
                    self.submits += 1
                    conn.close()
                    return
                elif cid == 0x15:
                    with self.lock:
                        self.enquire_links += 1
                    conn.sendall(pack(">IIII", 16, 0x80000015, 0, seq))
        except (ConnectionError, OSError):
            pass

    def close(self):
        self.sock.close()


def test_connection_lost_after_submit_is_in_doubt(tmp_path):
    smsc = _DroppingSmsc()
    try:
        gw = SmppGateway(port=smsc.port, password="x", spool_path=str(tmp_path / "s.sqlite"), receipt_linger_s=0,
                         window_size=1, binds=1, max_reconnects=0, connect_timeout_s=3)
        t0 = time.monotonic()
        res = gw.submit([OutgoingMessage(f"r{i}", f"+7916000000{i}", "hi") for i in range(5)])
        assert time.monotonic() - t0 < 10
    finally:
        smsc.close()
    assert smsc.submits == 1
    assert res[0].in_doubt and not res[0].accepted and res[0].error_code == NO_RESPONSE
    # window 1: the others were never issued on the dead session -> provably not sent
    assert all(r.transient and not r.in_doubt and r.error_code == NOT_SENT for r in res[1:])


def test_no_password_or_phone_in_logs(sim, caplog):
    import logging

    run = uuid.uuid4().hex[:6]
    phone = "+79161234597"  # ...97: rejected, so it is logged as a refusal
    with caplog.at_level(logging.DEBUG, logger="smsflow.gateway.smpp"):
        res = sim.gateway(receipt_linger_s=0).submit([_msg(f"{run}-p", phone, f"priv [ref:{run}-p]")])
    assert res[0].error_code == "0x0000000B"
    assert "smpp submit to" in caplog.text and "+7916***4597" in caplog.text
    assert PASSWORD not in caplog.text and phone not in caplog.text and phone[1:] not in caplog.text


def test_submit_from_inside_a_running_event_loop(sim):
    import asyncio

    run = uuid.uuid4().hex[:6]

    async def caller():
        return sim.gateway(receipt_linger_s=0).submit([_msg(f"{run}-l", "+79165550202", f"loop [ref:{run}-l]")])

    res = asyncio.run(caller())
    assert res[0].accepted
    assert sim.stats(detail=True)["by_ref"].get(f"{run}-l") == 1


def test_concatenated_message_is_final_when_every_part_is(tmp_path):
    """Each part of a concatenated message gets its own receipt; the message (known by its first
    part's id) gets ONE final receipt, once every part it sent has a final one: delivered only if
    all were, else the failed part's status and error, undelivered (SMPP_PARTIAL) if a part never
    got past submit_sm. Receipts arrive in any order, twice, or with intermediate states first."""
    from types import SimpleNamespace

    from blocks.smpp import PARTIAL, SmppGateway

    gw = SmppGateway(password="x", spool_path=str(tmp_path / "spool.sqlite"))
    spool = gw._spool()
    counts = {"receipts": 0, "inbound": 0, "part_receipts": 0}

    def dlr(mid: str, stat: str, err: str = "000"):
        text = f"id:{mid} sub:001 dlvrd:001 submit date:2611251047 done date:2611251048 stat:{stat} err:{err} text:"
        gw._on_deliver(SimpleNamespace(esm_class=0x04, short_message=text.encode(), tlvs=[]), spool, counts)

    # what submit() records as the parts are accepted: A and B complete, C's third part refused
    for main, later in (("A1", ["A2", "A3"]), ("B1", ["B2"]), ("C1", ["C2"])):
        spool.add_multipart(main, len(later) + 1 if main != "C1" else 3)
        spool.add_parts(main, later)
    assert spool.multipart_short("C1", 2) is None  # no receipt yet for C's parts

    dlr("A3", "DELIVRD")
    dlr("A1", "ENROUTE")  # the first part's progress passes through; the message is not final
    dlr("B1", "DELIVRD")
    dlr("A2", "DELIVRD")
    assert [(r.gateway_message_id, r.status) for r in spool.take_receipts(100)] == [("A1", "enroute")]
    dlr("B2", "UNDELIV", "001")
    dlr("A1", "DELIVRD")
    dlr("A2", "DELIVRD")  # a duplicate after the message settled: dropped
    dlr("C2", "DELIVRD")
    dlr("C1", "DELIVRD")
    dlr("X9", "DELIVRD")  # a single-part message: as before
    got = {r.gateway_message_id: r for r in spool.take_receipts(100)}
    assert {k: (r.status, r.error_code) for k, r in got.items()} == {
        "B1": ("undelivered", "001"), "A1": ("delivered", "000"), "C1": ("undelivered", PARTIAL), "X9": ("delivered", "000")}
    assert sorted(got["A1"].raw["parts"]) == ["A1", "A2", "A3"] and got["C1"].raw["short"] is True
    assert spool.take_receipts(100) == []
    spool.close()
