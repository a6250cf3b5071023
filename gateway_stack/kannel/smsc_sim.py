#!/usr/bin/env python3
"""SMPP 3.4 SMSC simulator for the local Kannel stack, built on PyPI ``smpp34`` (``smpp34.Server``).

SMPP server on 127.0.0.1:$SIM_SMPP_PORT (default 2775); accepts any system_id/password.

submit_sm handling
  * Every submit_sm gets a fresh decimal message id and is appended as one JSON line to
    $SIM_LOG (default ./sim_submits.jsonl): id, src, dst, dcs, esm_class, registered_delivery,
    UDH, the decoded text (dcs 0 = GSM 03.38 unpacked incl. the extension table, dcs 8 =
    UCS-2/UTF-16BE, dcs 3 = Latin-1), the raw hex and ``ref`` (see below).
  * ``ref``: our reference, if the text carries one matching $SIM_REF_RE (default
    ``\\[ref:([^\\]\\s]+)\\]``). The simulator counts logical messages (a part without UDH or
    the first part of a concatenated message) per ref and per destination, so tests can
    assert "0 lost, 0 duplicates".
  * Destination ending in $SIM_REJECT_SUFFIX (default "97") -> submit_sm rejected with
    ESME_RINVDSTADR (Kannel reports dlr type 16).
  * If registered_delivery & 1, a delivery receipt (deliver_sm, esm_class=0x04) follows after
    $SIM_DLR_DELAY seconds (default 0.2): destination ending in $SIM_FAIL_SUFFIX (default "99")
    -> stat:UNDELIV err:001, ending in $SIM_EXPIRE_SUFFIX (default "98") -> stat:EXPIRED,
    otherwise stat:DELIVRD err:000.

Control HTTP on 127.0.0.1:$SIM_CTL_PORT (default 2776):
    GET /mo?from=79990001122&to=12345&text=STOP   inject an MO deliver_sm (UCS-2 if not ASCII)
    GET /stats                                    JSON counters, duplicates, sessions
    GET /stats?detail=1                           ... plus by_ref / by_dst counts
    GET /reset                                    zero the counters (the log file is kept)
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import re
import sys
import time
from urllib.parse import parse_qs, urlsplit

import smpp34

HOST = "127.0.0.1"
SMPP_PORT = int(os.environ.get("SIM_SMPP_PORT", "2775"))
CTL_PORT = int(os.environ.get("SIM_CTL_PORT", "2776"))
DLR_DELAY = float(os.environ.get("SIM_DLR_DELAY", "0.2"))
FAIL_SUFFIX = os.environ.get("SIM_FAIL_SUFFIX", "99")
EXPIRE_SUFFIX = os.environ.get("SIM_EXPIRE_SUFFIX", "98")
REJECT_SUFFIX = os.environ.get("SIM_REJECT_SUFFIX", "97")
LOG_PATH = os.environ.get("SIM_LOG", "sim_submits.jsonl")
REF_RE = re.compile(os.environ.get("SIM_REF_RE", r"\[ref:([^\]\s]+)\]"))

# GSM 03.38 default alphabet (0x00..0x7F) and extension table (after ESC 0x1B)
GSM_BASIC = ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
             "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM_EXT = {0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\", 0x3C: "[", 0x3D: "~", 0x3E: "]",
           0x40: "|", 0x65: "€"}
assert len(GSM_BASIC) == 128

sessions: dict = {}  # session_id -> Esme
ids = itertools.count(int(time.time()) % 100000 * 100000)


def new_stats() -> dict:
    return {"binds": 0, "submit_sm": 0, "accepted": 0, "rejected": 0, "messages": 0, "ucs2": 0,
            "dlrs_sent": 0, "dlr_errors": 0, "mo_sent": 0, "since": time.time()}


stats = new_stats()
by_ref: collections.Counter = collections.Counter()
by_dst: collections.Counter = collections.Counter()
log = open(LOG_PATH, "a", encoding="utf-8", buffering=1)


def decode_gsm(raw: bytes) -> str:
    out, esc = [], False
    for b in raw:
        if esc:
            out.append(GSM_EXT.get(b, "\ufffd"))
            esc = False
        elif b == 0x1B:
            esc = True
        elif b < 0x80:
            out.append(GSM_BASIC[b])
        else:
            out.append("\ufffd")
    return "".join(out)


def decode_text(dc: int, raw: bytes) -> str:
    if dc == 8:
        return raw.decode("utf-16-be", "replace")
    if dc == 3:
        return raw.decode("latin-1")
    if dc in (0, 1):
        return decode_gsm(raw)
    return raw.hex()


def rx_session(preferred: str | None = None):
    """A session able to receive deliver_sm (TRX or RX bind)."""
    if preferred in sessions and sessions[preferred].can_receive:
        return sessions[preferred]
    for e in sessions.values():
        if e.can_receive:
            return e
    return None


async def send_dlr(ev_session: str, msg_id: str, src: str, dst: str, stat: str, err: str):
    await asyncio.sleep(DLR_DELAY)
    now = time.strftime("%y%m%d%H%M")
    text = (f"id:{msg_id} sub:001 dlvrd:{'001' if stat == 'DELIVRD' else '000'} submit date:{now} "
            f"done date:{now} stat:{stat} err:{err} text:")
    state = {"DELIVRD": 2, "EXPIRED": 3, "UNDELIV": 5, "REJECTD": 8}.get(stat, 7)
    esme = rx_session(ev_session)
    if esme is None:
        stats["dlr_errors"] += 1
        return
    try:
        # the receipt goes from the handset (original destination) back to the original source
        await esme.deliver_sm(destination_addr=src, short_message=text.encode("ascii"),
                              source_addr=dst, esm_class=0x04,
                              tlvs=[smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, msg_id.encode() + b"\0"),
                                    smpp34.Tlv(smpp34.TLV_MESSAGE_STATE, bytes([state]))])
        stats["dlrs_sent"] += 1
    except Exception as exc:  # noqa: BLE001
        stats["dlr_errors"] += 1
        print("DLR send failed:", exc, file=sys.stderr, flush=True)


def on_submit(ev) -> None:
    stats["submit_sm"] += 1
    sm, udh = ev.short_message, b""
    if ev.esm_class & 0x40 and sm:  # UDHI: concatenated part, strip the UDH
        udh, sm = sm[: sm[0] + 1], sm[sm[0] + 1:]
    part = total = 1
    if len(udh) >= 6 and udh[1] == 0x00:  # IEI 00: 8-bit reference concatenation
        total, part = udh[4], udh[5]
    elif len(udh) >= 7 and udh[1] == 0x08:  # IEI 08: 16-bit reference
        total, part = udh[5], udh[6]
    text = decode_text(ev.data_coding, sm)
    m = REF_RE.search(text)
    ref = m.group(1) if m else None
    dst = ev.destination_addr
    rec = {"ts": time.time(), "src": ev.source_addr, "dst": dst, "dst_ton": ev.dest_addr_ton,
           "dcs": ev.data_coding, "esm_class": ev.esm_class, "reg_dlr": ev.registered_delivery,
           "udh": udh.hex(), "part": part, "parts": total, "ref": ref, "text": text,
           "hex": ev.short_message.hex()}
    if REJECT_SUFFIX and dst.endswith(REJECT_SUFFIX):
        ev.reject(smpp34.ESME_RINVDSTADR)
        stats["rejected"] += 1
        rec.update(id=None, status="rejected")
        log.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return
    msg_id = str(next(ids))
    ev.accept(message_id=msg_id)
    stats["accepted"] += 1
    if part == 1:
        stats["messages"] += 1
        by_dst[dst] += 1
        if ev.data_coding == 8:
            stats["ucs2"] += 1
    if ref is not None:
        by_ref[ref] += 1
    rec.update(id=msg_id, status="accepted")
    log.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if ev.registered_delivery & 0x01:
        if FAIL_SUFFIX and dst.endswith(FAIL_SUFFIX):
            stat, err = "UNDELIV", "001"
        elif EXPIRE_SUFFIX and dst.endswith(EXPIRE_SUFFIX):
            stat, err = "EXPIRED", "000"
        else:
            stat, err = "DELIVRD", "000"
        asyncio.create_task(send_dlr(ev.session_id, msg_id, ev.source_addr, dst, stat, err))


async def smpp_loop(server):
    while True:
        ev = await server.next()
        if isinstance(ev, smpp34.SubmitSmEvent):
            try:
                on_submit(ev)
            except Exception as exc:  # noqa: BLE001 - never let one PDU stop the simulator
                print("submit_sm handling failed:", repr(exc), file=sys.stderr, flush=True)
        elif isinstance(ev, smpp34.Esme):
            sessions[ev.session_id] = ev
            stats["binds"] += 1
            print(f"bind system_id={ev.system_id} session={ev.session_id} can_receive={ev.can_receive}", flush=True)
        elif isinstance(ev, smpp34.Unbound):
            sessions.pop(ev.session_id, None)
            print(f"unbound session={ev.session_id}", flush=True)


def snapshot(detail: bool) -> dict:
    body = dict(stats, sessions=len(sessions), refs=len(by_ref), dsts=len(by_dst),
                duplicate_refs={k: v for k, v in by_ref.items() if v > 1},
                duplicate_dsts={k: v for k, v in by_dst.items() if v > 1})
    if detail:
        body.update(by_ref=dict(by_ref), by_dst=dict(by_dst))
    return body


async def ctl_handler(reader, writer):
    try:
        line = (await reader.readline()).decode("latin-1")
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        parts = line.split(" ")
        if len(parts) < 2:
            return
        url = urlsplit(parts[1])
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        code, body = 200, {}
        if url.path == "/mo":
            esme = rx_session()
            if esme is None:
                code, body = 503, {"error": "no receiver-capable ESME bound"}
            else:
                text = q.get("text", "STOP")
                try:
                    sm, dc = text.encode("ascii"), 0
                except UnicodeEncodeError:
                    sm, dc = text.encode("utf-16-be"), 8
                r = await esme.deliver_sm(destination_addr=q.get("to", "12345"), short_message=sm,
                                          source_addr=q.get("from", "79990001122"), data_coding=dc,
                                          source_addr_ton=1, source_addr_npi=1,  # international -> Kannel adds '+'
                                          dest_addr_ton=0, dest_addr_npi=0)  # short code as-is
                stats["mo_sent"] += 1
                body = {"ok": r.is_success, "command_status": r.command_status}
        elif url.path == "/stats":
            body = snapshot(q.get("detail") in ("1", "true"))
        elif url.path == "/reset":
            stats.clear()
            stats.update(new_stats())
            by_ref.clear()
            by_dst.clear()
            body = {"ok": True}
        else:
            code, body = 404, {"error": "not found"}
        data = json.dumps(body, ensure_ascii=False).encode()
        writer.write(f"HTTP/1.0 {code} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     "Connection: close\r\n\r\n".encode() + data)
        await writer.drain()
    finally:
        writer.close()


async def main():
    server = smpp34.Server(HOST, SMPP_PORT, system_id="SIMSMSC")
    await server.start()
    ctl = await asyncio.start_server(ctl_handler, HOST, CTL_PORT)
    print(f"SMSC simulator: SMPP {HOST}:{SMPP_PORT}, control http://{HOST}:{CTL_PORT}, log {LOG_PATH}", flush=True)
    async with ctl:
        await smpp_loop(server)


if __name__ == "__main__":
    asyncio.run(main())
