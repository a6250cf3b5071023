"""A direct SMPP 3.4 client (ESME) as an ``SmsGateway`` Block: its own small asyncio session layer
(PDUs packed with ``struct``), PyPI ``smpp34``'s codec for decoding deliver_sm.

    smsflow --submit_sm--> SMSC          (``binds`` transceiver binds per submit() call, bind_type "trx")
    SMSC --deliver_sm (receipts, MO)--> smsflow   (on the same sessions, or on fetch_*())

Submitting
  ``submit`` is synchronous and runs its own asyncio loop (in a helper thread when the
  calling thread already runs one). It opens ``binds`` sessions at once (default 2); a bind the
  SMSC refuses (e.g. a per-account session limit) is skipped; when none can be bound,
  ``GatewayUnavailable`` is raised before anything of the batch is sent. Every session has its own
  sequence numbers and its own window of ``window_size`` submit_sm outstanding (default 100) and
  takes the next message of the batch whenever its window has room: everything the window allows is
  written with ONE ``transport.write`` (pre-packed PDUs), responses are read and matched by
  sequence number in bulk as they arrive (no task, future or semaphore per message). Why not
  ``smpp34.Client``: under load its sessions died mid-batch with ESME_RSYSERR (every submit_sm in
  the window then in doubt) and one GIL crossing + one asyncio task per message capped it at
  ~2,000 msg/s here; throttling is not this class's business (``TokenBucket`` before ``submit``).

  Encoding: GSM-7 text goes as data_coding 0, GSM 03.38 *unpacked* (one septet per byte,
  extension characters as ESC 0x1B + code); anything else (or ``encoding == "UCS-2"``) as
  data_coding 8, UTF-16-BE. Longer messages are split with ``smsflow.sms_encoding.split_parts``
  and each part carries a concatenation UDH (esm_class 0x40, ``05 00 03 ref total seq``);
  the parts of one message go one after the other on the same session (the next part once the
  previous one is accepted), and the message's id is the first part's.

  submit_sm_resp (or generic_nack), matched to its submit_sm by sequence number, per message:
    ESME_ROK                          -> accepted, gateway_message_id = the SMSC's message_id
    ESME_RTHROTTLED / ESME_RMSGQFUL   -> transient (the SMSC refused it: provably not sent)
    any other status                  -> rejected, error_code = "0x%08X" of the status
    session lost, or no resp within ``response_timeout_s`` (the session is then dropped)
                                      -> in_doubt (never resent blindly)
    never written because its session ended and no other session was left to take it
                                      -> transient (SMPP_NOT_SENT)
  A lost session is replaced (at most ``max_reconnects`` times per call) while messages of the batch
  are still waiting; only what it had in flight is in doubt. An idle session sends enquire_link after
  ``enquire_link_s``; an unanswered one drops it. The SMSC's enquire_link and unbind are answered.
  A multipart message whose first part was accepted but a later one was not is reported
  accepted (it is on its way, partly) with error_code ``SMPP_PARTIAL``.

Receipts and MO
  deliver_sm arriving while submitting and for at most ``receipt_linger_s`` after are kept (the
  linger ends as soon as every part accepted in the batch has its final receipt);
  ``fetch_receipts`` / ``fetch_inbound`` bind (trx) and drain deliver_sm for
  ``receipt_window_s``. Everything received is written to a small SQLite spool (``spool_path``;
  the deliver_sm of one read in one transaction, their deliver_sm_resp sent only after its commit),
  so a crash between submit and fetch loses nothing; ``fetch_receipts``
  hands out (and removes) the spooled receipts, ``fetch_inbound`` the spooled MO messages.
  Receipts are parsed from the SMPP receipt text (``id:... stat:DELIVRD err:000``) or the
  receipted_message_id / message_state TLVs. A concatenated message is known by its first
  part's id, but every part gets its own receipt: the spool keeps the final receipts of its
  parts and hands out ONE receipt for the message once every accepted part has a final one
  (delivered only when all parts were delivered; otherwise the failed part's status and
  error; undelivered with ``SMPP_PARTIAL`` when a part never got past submit_sm).
  Intermediate receipts of the first part pass through; those of later parts are dropped.

``lookup`` returns ``{}``: SMPP cannot be asked which references were accepted.

Logs never carry the password nor a full phone number.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import logging
import random
import sqlite3
import struct
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr, SecretStr

from blocks.gateway import GatewayUnavailable, OutgoingMessage, Receipt, SmsGateway, SubmitResult
from smsflow.privacy import mask_phone
from blocks.kannel import KannelGateway
from smsflow.settings import get_settings
from smsflow.sms_encoding import is_gsm7, split_parts, UCS2

log = logging.getLogger("smsflow.gateway.smpp")

NOT_SENT = "SMPP_NOT_SENT"
NO_RESPONSE = "SMPP_NO_RESPONSE"
PARTIAL = "SMPP_PARTIAL"
_FINAL = frozenset({"delivered", "undelivered", "expired", "rejected"})
TOO_LONG = "SMPP_TOO_LONG"
BAD_ADDRESS = "SMPP_BAD_ADDRESS"

ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
_TRANSIENT = {ESME_RMSGQFUL, ESME_RTHROTTLED}
_STATUS_NAMES = {
    0x01: "ESME_RINVMSGLEN", 0x02: "ESME_RINVCMDLEN", 0x03: "ESME_RINVCMDID", 0x04: "ESME_RINVBNDSTS",
    0x05: "ESME_RALYBND", 0x08: "ESME_RSYSERR", 0x0A: "ESME_RINVSRCADR", 0x0B: "ESME_RINVDSTADR",
    0x0C: "ESME_RINVMSGID", 0x0D: "ESME_RBINDFAIL", 0x0E: "ESME_RINVPASWD", 0x0F: "ESME_RINVSYSID",
    0x14: "ESME_RMSGQFUL", 0x15: "ESME_RINVSERTYP", 0x45: "ESME_RSUBMITFAIL", 0x48: "ESME_RINVSRCTON",
    0x49: "ESME_RINVSRCNPI", 0x50: "ESME_RINVDSTTON", 0x51: "ESME_RINVDSTNPI", 0x58: "ESME_RTHROTTLED",
    0x61: "ESME_RINVSCHED", 0x62: "ESME_RINVEXPIRY", 0xFF: "ESME_RUNKNOWNERR",
}

# GSM 03.38: the default alphabet in code order (0x1B = ESC) and the extension table.
_GSM_BASIC = ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
              "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
_GSM_EXT = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C, "~": 0x3D, "]": 0x3E,
            "|": 0x40, "€": 0x65}
assert len(_GSM_BASIC) == 128
_GSM_ENCODE: dict[str, bytes] = {c: bytes([i]) for i, c in enumerate(_GSM_BASIC) if c != "\x1b"}
_GSM_ENCODE.update({c: bytes([0x1B, v]) for c, v in _GSM_EXT.items()})
_GSM_EXT_DECODE = {v: c for c, v in _GSM_EXT.items()}

# message_state TLV -> our status; receipt "stat:" -> our status
_MESSAGE_STATE = {1: "enroute", 2: "delivered", 3: "expired", 4: "undelivered", 5: "undelivered",
                  6: "accepted", 7: "unknown", 8: "rejected"}
_STAT = {"DELIVRD": "delivered", "UNDELIV": "undelivered", "EXPIRED": "expired", "DELETED": "undelivered",
         "REJECTD": "rejected", "ACCEPTD": "accepted", "ENROUTE": "enroute", "BUFFRED": "enroute",
         "UNKNOWN": "unknown"}
TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_STATE = 0x0427
TLV_NETWORK_ERROR_CODE = 0x0423

_concat_refs = itertools.count(random.randrange(256))


def gsm7_encode(text: str) -> bytes:
    """GSM 03.38 default alphabet, unpacked (one septet per byte), extension chars as ESC + code.
    Raises ``ValueError`` for a character outside both tables."""
    try:
        return b"".join([_GSM_ENCODE[c] for c in text])
    except KeyError as exc:
        raise ValueError(f"not a GSM 03.38 character: {exc.args[0]!r}") from None


def gsm7_decode(raw: bytes) -> str:
    out, esc = [], False
    for b in raw:
        if esc:
            out.append(_GSM_EXT_DECODE.get(b, "\ufffd"))
            esc = False
        elif b == 0x1B:
            esc = True
        elif b < 0x80:
            out.append(_GSM_BASIC[b])
        else:
            out.append("\ufffd")
    return "".join(out)


def _split_ucs2(text: str, limit: int) -> list[str]:
    """Split by UTF-16 code units (``limit`` per part), never inside a surrogate pair."""
    parts, cur, units = [], [], 0
    for c in text:
        u = 2 if ord(c) > 0xFFFF else 1
        if units + u > limit:
            parts.append("".join(cur))
            cur, units = [], 0
        cur.append(c)
        units += u
    parts.append("".join(cur))
    return parts


def encode_message(text: str, ucs2: bool) -> tuple[int, list[bytes]]:
    """(data_coding, [payload of each part without UDH])."""

    if not ucs2 and is_gsm7(text):
        return 0, [gsm7_encode(p) for p in split_parts(text)]
    units = len(text.encode("utf-16-be", "surrogatepass")) // 2
    if is_gsm7(text):  # forced UCS-2: split_parts would cut by GSM-7 limits
        parts = [text] if units <= 70 else _split_ucs2(text, 67)
    else:
        parts = split_parts(text)
    return 8, [p.encode("utf-16-be", "surrogatepass") for p in parts]


def decode_short_message(data_coding: int, raw: bytes, dcs0: str = "gsm") -> str:
    if data_coding == 8:
        return raw.decode("utf-16-be", "replace")
    if data_coding in (0, 1) and dcs0 == "gsm":
        return gsm7_decode(raw)
    if data_coding in (0, 1) and dcs0 == "ascii":
        return raw.decode("ascii", "replace")
    return raw.decode("latin-1")


def parse_receipt_text(text: str) -> dict[str, str]:

    return KannelGateway.parse_receipt_text(text)


def _tlv_map(tlvs) -> dict[int, bytes]:
    return {t.tag: bytes(t.value) for t in tlvs or []}


def receipt_from_deliver_sm(ev) -> Receipt:
    """A deliver_sm with esm_class 0x04 -> ``Receipt`` (reference None: SMPP does not carry ours)."""
    text = bytes(ev.short_message).decode("latin-1", "replace")
    fields = parse_receipt_text(text) if "stat:" in text.lower() or "id:" in text.lower() else {}
    tlvs = _tlv_map(ev.tlvs)
    gmid = fields.get("id") or None
    if TLV_RECEIPTED_MESSAGE_ID in tlvs:
        tlv_id = tlvs[TLV_RECEIPTED_MESSAGE_ID].rstrip(b"\0").decode("latin-1")
        gmid = gmid or tlv_id or None
    stat = fields.get("stat", "").upper()
    if stat:
        status = _STAT.get(stat, "unknown")
    elif TLV_MESSAGE_STATE in tlvs and tlvs[TLV_MESSAGE_STATE]:
        status = _MESSAGE_STATE.get(tlvs[TLV_MESSAGE_STATE][0], "unknown")
    else:
        status = "unknown"
    error_code = fields.get("err") or None
    if error_code is None and TLV_NETWORK_ERROR_CODE in tlvs:
        error_code = tlvs[TLV_NETWORK_ERROR_CODE].hex()
    event_at = None
    done = fields.get("done date", "")
    if done.isdigit():
        try:
            event_at = datetime.strptime(done, "%y%m%d%H%M%S" if len(done) == 12 else "%y%m%d%H%M")
        except ValueError:
            event_at = None
    raw = {"smpp_receipt": text}
    if TLV_MESSAGE_STATE in tlvs and tlvs[TLV_MESSAGE_STATE]:
        raw["message_state"] = tlvs[TLV_MESSAGE_STATE][0]
    return Receipt(gateway_message_id=gmid, reference=None, status=status, error_code=error_code,
                   event_at=event_at, raw=raw)


def _run(coro_factory):
    """Run a coroutine to completion from synchronous code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smpp-loop") as ex:
        return ex.submit(asyncio.run, coro_factory()).result()


class _Spool:
    """SQLite file holding what arrived on the SMPP session until it is handed out."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS receipts (id INTEGER PRIMARY KEY, gateway_message_id TEXT,"
                        " status TEXT, error_code TEXT, event_at TEXT, raw TEXT, received_at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS inbound (id INTEGER PRIMARY KEY, gateway_message_id TEXT,"
                        " src TEXT, dst TEXT, text TEXT, received_at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS parts (part_id TEXT PRIMARY KEY, main_id TEXT, at REAL)")
        # concatenated messages: parts expected (accepted at submit), and the final receipts of parts so far
        self.db.execute("CREATE TABLE IF NOT EXISTS multipart (main_id TEXT PRIMARY KEY, expected INTEGER,"
                        " short INTEGER DEFAULT 0, done INTEGER DEFAULT 0, at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS part_receipts (part_id TEXT PRIMARY KEY, main_id TEXT,"
                        " status TEXT, error_code TEXT, event_at TEXT, raw TEXT)")

    def close(self) -> None:
        self.db.close()

    def add_parts(self, main_id: str, part_ids: list[str]) -> None:
        now = time.time()
        self.db.executemany("INSERT OR REPLACE INTO parts VALUES (?,?,?)", [(p, main_id, now) for p in part_ids])

    def is_later_part(self, gmid: str | None) -> bool:
        if not gmid:
            return False
        return self.db.execute("SELECT 1 FROM parts WHERE part_id = ?", (gmid,)).fetchone() is not None

    def add_multipart(self, main_id: str, parts: int) -> None:
        """A concatenated message of ``parts`` parts whose first part (``main_id``) was accepted."""
        self.db.execute("INSERT OR IGNORE INTO multipart (main_id, expected, at) VALUES (?,?,?)",
                        (main_id, parts, time.time()))

    def multipart_short(self, main_id: str, accepted: int) -> Receipt | None:
        """Only ``accepted`` parts got past submit_sm: expect receipts for those only; the message
        cannot end delivered. Returns the message's receipt if it is complete now."""
        self.db.execute("UPDATE multipart SET expected = ?, short = 1 WHERE main_id = ?", (accepted, main_id))
        return self._settle(main_id)

    def multipart_of(self, gmid: str | None) -> tuple[str, bool] | None:
        """(main id, settled already) when ``gmid`` is a part (the first or a later one) of a
        concatenated message this spool tracks, else None."""
        if not gmid:
            return None
        row = self.db.execute("SELECT main_id, done FROM multipart WHERE main_id = ? OR main_id = "
                              "(SELECT main_id FROM parts WHERE part_id = ?)", (gmid, gmid)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def add_part_receipt(self, main_id: str, r: Receipt) -> Receipt | None:
        """Keep a part's final receipt; returns the message's receipt once every part has one."""
        self.db.execute("INSERT OR REPLACE INTO part_receipts VALUES (?,?,?,?,?,?)",
                        (r.gateway_message_id, main_id, r.status, r.error_code,
                         r.event_at.isoformat() if r.event_at else None, json.dumps(r.raw)))
        return self._settle(main_id)

    _FAILED_FIRST = {"undelivered": 0, "rejected": 1, "expired": 2, "unknown": 3}

    def _settle(self, main_id: str) -> Receipt | None:
        """When every expected part has a final receipt: spool one receipt for the message (id of the
        first part) and mark it done, atomically, so it is handed out exactly once."""
        nested = self.db.in_transaction  # inside a batch of deliver_sm (see _Session): a savepoint
        self.db.execute("SAVEPOINT settle" if nested else "BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT expected, short, done FROM multipart WHERE main_id = ?", (main_id,)).fetchone()
            parts = self.db.execute("SELECT part_id, status, error_code, event_at, raw FROM part_receipts "
                                    "WHERE main_id = ?", (main_id,)).fetchall()
            if row is None or row[2] or len(parts) < row[0]:
                self.db.execute("RELEASE settle" if nested else "COMMIT")
                return None
            failed = sorted((p for p in parts if p[1] != "delivered"), key=lambda p: self._FAILED_FIRST.get(p[1], 9))
            if failed:
                status, error_code = failed[0][1], failed[0][2]
            elif row[1]:
                status, error_code = "undelivered", PARTIAL
            else:
                status, error_code = "delivered", parts[0][2]
            times = [datetime.fromisoformat(p[3]) for p in parts if p[3]]
            r = Receipt(main_id, None, status, error_code, max(times) if times else None,
                        {"parts": {p[0]: {"status": p[1], "error_code": p[2], **json.loads(p[4] or "{}")} for p in parts},
                         "short": bool(row[1])})
            self.add_receipt(r)
            self.db.execute("UPDATE multipart SET done = 1 WHERE main_id = ?", (main_id,))
            self.db.execute("DELETE FROM part_receipts WHERE main_id = ?", (main_id,))
            self.db.execute("RELEASE settle" if nested else "COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK TO settle" if nested else "ROLLBACK")
            if nested:
                self.db.execute("RELEASE settle")
            raise
        return r

    def add_receipt(self, r: Receipt) -> None:
        self.db.execute("INSERT INTO receipts (gateway_message_id, status, error_code, event_at, raw, received_at)"
                        " VALUES (?,?,?,?,?,?)",
                        (r.gateway_message_id, r.status, r.error_code,
                         r.event_at.isoformat() if r.event_at else None, json.dumps(r.raw), time.time()))

    def add_inbound(self, mo: dict) -> None:
        self.db.execute("INSERT INTO inbound (gateway_message_id, src, dst, text, received_at) VALUES (?,?,?,?,?)",
                        (mo["gateway_message_id"], mo["from"], mo["to"], mo["text"], time.time()))

    def take_receipts(self, limit: int) -> list[Receipt]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute("SELECT id, gateway_message_id, status, error_code, event_at, raw FROM receipts"
                                   " ORDER BY id LIMIT ?", (limit,)).fetchall()
            if rows:
                self.db.execute("DELETE FROM receipts WHERE id <= ?", (rows[-1][0],))
            self.db.execute("DELETE FROM parts WHERE at < ?", (time.time() - 7 * 86400,))
            self.db.execute("DELETE FROM multipart WHERE at < ?", (time.time() - 7 * 86400,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [Receipt(g, None, s, e, datetime.fromisoformat(at) if at else None, json.loads(raw or "{}"))
                for _id, g, s, e, at, raw in rows]

    def take_inbound(self, limit: int) -> list[dict]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute("SELECT id, gateway_message_id, src, dst, text FROM inbound ORDER BY id LIMIT ?",
                                   (limit,)).fetchall()
            if rows:
                self.db.execute("DELETE FROM inbound WHERE id <= ?", (rows[-1][0],))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [{"gateway_message_id": g, "from": s, "to": d, "text": t} for _id, g, s, d, t in rows]


# --------------------------------------------------------------------------- the SMPP session (ESME side)
_HDR = struct.Struct(">IIII")
BIND_TRANSCEIVER, BIND_TRANSMITTER, SUBMIT_SM, DELIVER_SM, UNBIND, ENQUIRE_LINK = 0x09, 0x02, 0x04, 0x05, 0x06, 0x15
ALERT_NOTIFICATION, GENERIC_NACK, RESP = 0x102, 0x80000000, 0x80000000
ESME_RSYSERR, ESME_RINVCMDID = 0x08, 0x03


def _cstr(s: str) -> bytes:
    return s.encode("latin-1", "replace") + b"\0"


class _Batch:
    """One submit() / drain: the messages, their results, the sessions (binds) working on them.

    Messages wait in ``queue`` (indices); a session takes the next one whenever its window has room.
    The parts of one concatenated message go one after the other on the session that sent the first
    part (the next part is issued when the previous one is accepted)."""

    def __init__(self, gw: "SmppGateway", messages, prepared, spool: _Spool, src: tuple[str, int, int]):
        self.gw, self.messages, self.spool = gw, messages, spool
        self.results: list[SubmitResult | None] = [None] * len(messages)
        self.parts: dict[int, tuple[int, list[bytes]]] = {}
        self.ids: dict[int, list[str]] = {}
        self.cref: dict[int, int] = {}
        s, ton, npi = src
        self.prefix = b"\0" + bytes([ton, npi]) + _cstr(s) + b"\x01\x01"  # service_type, source, dest ton/npi
        self.reg = gw.registered_delivery
        self.queue: collections.deque[int] = collections.deque()
        for i, p in enumerate(prepared):
            if isinstance(p, tuple):
                self.parts[i] = p
                self.queue.append(i)
        self.left = len(self.queue)  # messages without a result yet
        self.counts = {"receipts": 0, "inbound": 0, "part_receipts": 0}
        self.awaiting: set[str] = set()  # accepted part ids whose final receipt has not come yet
        self.sessions: list[_Session] = []
        self.binding = 0
        self.reconnects_left = gw.max_reconnects
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()  # all results known (or GatewayUnavailable)
        self.receipts_done = asyncio.Event()
        self.issued = 0
        self.bind_errors: list[str] = []
        self.t0 = time.perf_counter()
        self.t_results: float | None = None
        self.t_receipts: float | None = None
        if self.left == 0 and messages:
            self._finish()

    # -- what a session sends next
    def pdu_body(self, i: int, k: int) -> bytes:
        dcs, parts = self.parts[i]
        payload, total, esm = parts[k], len(parts), 0
        if total > 1:
            if i not in self.cref:
                self.cref[i] = next(_concat_refs) % 256
            payload = bytes([0x05, 0x00, 0x03, self.cref[i], total, k + 1]) + payload
            esm = 0x40
        dst = self.messages[i].phone_e164.lstrip("+").encode()
        return b"".join((self.prefix, dst, b"\0", bytes([esm]), b"\0\0\0\0", bytes([self.reg, 0, dcs, 0, len(payload)]),
                         payload))

    # -- outcomes
    def _set(self, i: int, r: SubmitResult) -> None:
        if self.results[i] is None:
            self.results[i] = r
            self.left -= 1
            if self.left == 0:
                self._finish()

    def _finish(self) -> None:
        self.t_results = time.perf_counter()
        if not self.done.done():
            self.done.set_result(None)
        self._check_receipts()

    def _check_receipts(self) -> None:
        if self.t_results is not None and not self.awaiting and not self.receipts_done.is_set():
            self.t_receipts = time.perf_counter()
            self.receipts_done.set()

    def _short(self, ids: list[str]) -> None:
        """A later part of a concatenated message did not get through: its receipts settle it."""
        if ids and ids[0] and self.spool.multipart_short(ids[0], len(ids)) is not None:
            self.counts["receipts"] += 1

    def on_resp(self, sess: "_Session", i: int, k: int, status: int, mid: str | None) -> None:
        m = self.messages[i]
        total = len(self.parts[i][1])
        ids = self.ids.setdefault(i, [])
        first = k == 0
        if status == 0:
            ids.append(mid or "")
            if mid and self.reg & 1:
                self.awaiting.add(mid)
            if first and total > 1 and mid:  # before any receipt can arrive: see _on_deliver
                self.spool.add_multipart(mid, total)
            if not first and mid:
                self.spool.add_parts(ids[0], [mid])
            if k + 1 < total:
                sess.local.append((i, k + 1))
            else:
                self._set(i, SubmitResult(m.reference, True, ids[0] or None))
            return
        code = f"0x{status:08X}"
        err = _STATUS_NAMES.get(status, "SMPP error")
        if not first:
            self._short(ids)
            self._set(i, SubmitResult(m.reference, True, ids[0], PARTIAL, f"part {k + 1}/{total} refused: {code} {err}"))
        elif status in _TRANSIENT:
            self._set(i, SubmitResult(m.reference, False, None, code, err, transient=True))
        else:
            self._set(i, SubmitResult(m.reference, False, None, code, err))

    def on_lost(self, i: int, k: int, why: str) -> None:
        """submit_sm written, no resp: whether the SMSC took it cannot be told -> in doubt, never resent."""
        m, total = self.messages[i], len(self.parts[i][1])
        if k == 0:
            self._set(i, SubmitResult(m.reference, False, None, NO_RESPONSE,
                                      f"submit_sm sent, no response ({why}): outcome unknown", in_doubt=True))
        else:
            ids = self.ids.get(i, [])
            self._short(ids)
            self._set(i, SubmitResult(m.reference, True, ids[0], PARTIAL, f"part {k + 1}/{total}: no response ({why})"))

    def on_not_issued(self, i: int, k: int) -> None:
        m, total = self.messages[i], len(self.parts[i][1])
        if k == 0:
            self._set(i, SubmitResult(m.reference, False, None, NOT_SENT,
                                      "not sent: the SMPP session ended during the batch", transient=True))
        else:
            ids = self.ids.get(i, [])
            self._short(ids)
            self._set(i, SubmitResult(m.reference, True, ids[0], PARTIAL,
                                      f"parts {k + 1}..{total} of {total} not sent: session ended"))

    def on_deliver(self, ev) -> None:
        r = self.gw._on_deliver(ev, self.spool, self.counts)
        if r is not None and r.status in _FINAL and r.gateway_message_id in self.awaiting:
            self.awaiting.discard(r.gateway_message_id)
            self._check_receipts()

    # -- sessions
    def live(self) -> list["_Session"]:
        return [s for s in self.sessions if s.bound and not s.dead]

    def start_bind(self) -> None:
        self.binding += 1
        self.loop.create_task(self._bind_one())

    async def _bind_one(self) -> None:
        gw = self.gw
        sess = _Session(self)
        try:
            await asyncio.wait_for(sess.open(), gw.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001 - refused, timed out, bind rejected: all "not bound"
            sess.abort()
            self.bind_errors.append(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            log.info("smpp bind to %s:%d failed: %s", gw.host, gw.port, self.bind_errors[-1])
            self.binding -= 1
            self._maybe_stuck()
            return
        self.binding -= 1
        if self.done.done() and self.messages:  # nothing left to do: leave at once
            self.sessions.append(sess)
            return
        self.sessions.append(sess)
        sess.pump()

    def session_ended(self, sess: "_Session") -> None:
        for i, k, _t in list(sess.pending.values()):
            self.on_lost(i, k, sess.why or "connection lost")
        sess.pending.clear()
        while sess.local:
            self.on_not_issued(*sess.local.popleft())
        if self.queue and not self.done.done() and self.reconnects_left > 0 and sess.was_bound:
            self.reconnects_left -= 1
            log.info("smpp session to %s:%d ended (%s): binding again", self.gw.host, self.gw.port, sess.why)
            self.start_bind()
        self._maybe_stuck()

    def _maybe_stuck(self) -> None:
        """No session left and none coming: what was never issued is provably not sent."""
        if self.done.done() or self.live() or self.binding:
            return
        if self.issued == 0 and self.left == len(self.parts) and self.messages:
            self.done.set_exception(GatewayUnavailable(
                f"SMPP bind to {self.gw.host}:{self.gw.port} as {self.gw.system_id!r} failed: "
                f"{'; '.join(self.bind_errors[-3:]) or 'session ended'}"))
            return
        while self.queue:
            self.on_not_issued(self.queue.popleft(), 0)

    def tick(self) -> None:
        """Every 0.5 s: the response timer and enquire_link."""
        now = time.monotonic()
        gw = self.gw
        for s in self.live():
            oldest = next(iter(s.pending.values()), None)
            if oldest is not None and now - oldest[2] > gw.response_timeout_s:
                s.why = f"no submit_sm_resp within {gw.response_timeout_s:g} s"
                s.abort()
            elif s.link_sent is not None and now - s.link_sent > gw.response_timeout_s:
                s.why = f"no enquire_link_resp within {gw.response_timeout_s:g} s"
                s.abort()
            elif s.link_sent is None and now - s.last_rx > gw.enquire_link_s:
                s.enquire_link()


class _Session(asyncio.Protocol):
    """One bind: an asyncio Protocol reading PDUs in bulk and writing submit_sm in batches (one
    ``transport.write`` for everything a window's worth of room allows)."""

    def __init__(self, batch: _Batch):
        self.batch = batch
        self.gw = batch.gw
        self.window = self.gw.window_size
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.seq = 0
        self.pending: dict[int, tuple[int, int, float]] = {}  # seq -> (message, part, sent at)
        self.local: collections.deque[tuple[int, int]] = collections.deque()  # next parts of started messages
        self.bound = self.was_bound = self.dead = self.closing = False
        self.why = ""
        self.bind_fut: asyncio.Future | None = None
        self.closed = batch.loop.create_future()
        self.last_rx = time.monotonic()
        self.link_sent: float | None = None
        self.unbind_seq: int | None = None

    def _next_seq(self) -> int:
        self.seq = self.seq % 0x7FFFFFFF + 1
        return self.seq

    async def open(self) -> None:
        gw, loop = self.gw, self.batch.loop
        await loop.create_connection(lambda: self, gw.host, gw.port)
        cid = BIND_TRANSCEIVER if gw.bind_type == "trx" else BIND_TRANSMITTER
        body = (_cstr(gw.system_id) + _cstr(gw.password.get_secret_value()) + _cstr(gw.system_type)
                + b"\x34\x00\x00\x00")
        self.bind_fut = loop.create_future()
        self.transport.write(_HDR.pack(16 + len(body), cid, 0, self._next_seq()) + body)
        status = await self.bind_fut
        if status != 0:
            raise ConnectionRefusedError(f"bind refused: 0x{status:08X} {_STATUS_NAMES.get(status, '')}".strip())
        self.bound = self.was_bound = True

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        try:
            import socket

            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception:  # noqa: BLE001
            pass

    def connection_lost(self, exc) -> None:
        if self.dead:
            return
        self.dead = True
        if not self.why:
            self.why = f"connection lost: {exc}" if exc else "connection closed by the SMSC"
        if self.bind_fut is not None and not self.bind_fut.done():
            self.bind_fut.set_exception(ConnectionError(self.why))
        if not self.closed.done():
            self.closed.set_result(None)
        self.batch.session_ended(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows from the loop

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        pos, n, out, delivers = 0, len(buf), [], []
        batch = self.batch
        while n - pos >= 16:
            length, cid, status, seq = _HDR.unpack_from(buf, pos)
            if length < 16 or length > 70_000:
                self.why = f"bad PDU length {length}"
                self.abort()
                return
            if n - pos < length:
                break
            if cid == RESP | SUBMIT_SM or cid == GENERIC_NACK:
                hit = self.pending.pop(seq, None)
                if hit is not None:
                    end = buf.find(b"\0", pos + 16, pos + length)
                    mid = bytes(buf[pos + 16:end if end >= 0 else pos + length]).decode("latin-1") or None
                    batch.on_resp(self, hit[0], hit[1], status, mid if status == 0 else None)
            elif cid == DELIVER_SM:
                delivers.append((seq, bytes(buf[pos:pos + length])))
            elif cid == ENQUIRE_LINK:
                out.append(_HDR.pack(16, RESP | ENQUIRE_LINK, 0, seq))
            elif cid == RESP | ENQUIRE_LINK:
                self.link_sent = None
            elif cid == UNBIND:
                out.append(_HDR.pack(16, RESP | UNBIND, 0, seq))
                self.why = "the SMSC unbound"
                self.bound = False
                self.closing = True
            elif cid == RESP | UNBIND:
                self.closing = True
            elif cid in (RESP | BIND_TRANSCEIVER, RESP | BIND_TRANSMITTER):
                if self.bind_fut is not None and not self.bind_fut.done():
                    self.bind_fut.set_result(status)
            elif cid < RESP and cid != ALERT_NOTIFICATION:
                out.append(_HDR.pack(16, GENERIC_NACK, ESME_RINVCMDID, seq))
            pos += length
        del buf[:pos]
        if delivers:
            out.extend(self._store_delivers(delivers))
        if out:
            self.transport.write(b"".join(out))
        if self.closing:
            self.transport.close()
            return
        self.pump()

    def _store_delivers(self, delivers: list[tuple[int, bytes]]) -> list[bytes]:
        """Spool the deliver_sm of one read in ONE transaction; the deliver_sm_resp go out only after
        the commit (ESME_RSYSERR for what could not be stored: the SMSC delivers it again)."""
        import smpp34

        db, batch = self.batch.spool.db, self.batch
        acks: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for _seq, raw in delivers:
                try:
                    ev = smpp34.decode(raw)
                except Exception as exc:  # noqa: BLE001 - cannot be read now or ever: ack, log
                    log.warning("smpp: undecodable deliver_sm: %s: %s", type(exc).__name__, exc)
                    acks.append(0)
                    continue
                db.execute("SAVEPOINT one")
                try:
                    batch.on_deliver(ev)
                    acks.append(0)
                except Exception as exc:  # noqa: BLE001 - not stored: let the SMSC retry it
                    db.execute("ROLLBACK TO one")
                    acks.append(ESME_RSYSERR)
                    log.warning("smpp: could not store a deliver_sm: %s: %s", type(exc).__name__, exc)
                db.execute("RELEASE one")
            db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - the commit failed: nothing of it is stored
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.warning("smpp: could not store %d deliver_sm: %s: %s", len(delivers), type(exc).__name__, exc)
            acks = [ESME_RSYSERR] * len(delivers)
        return [_HDR.pack(17, RESP | DELIVER_SM, ack, seq) + b"\0" for (seq, _raw), ack in zip(delivers, acks)]

    # -- sending
    def pump(self) -> None:
        """Fill the window: next parts of started messages first, then new messages; one write."""
        if not self.bound or self.dead or self.closing:
            return
        batch, pending, local, queue = self.batch, self.pending, self.local, self.batch.queue
        room = self.window - len(pending)
        if room <= 0:
            return
        out, now = [], time.monotonic()
        while room > 0:
            if local:
                i, k = local.popleft()
            elif queue:
                i, k = queue.popleft(), 0
            else:
                break
            body = batch.pdu_body(i, k)
            seq = self._next_seq()
            out.append(_HDR.pack(16 + len(body), SUBMIT_SM, 0, seq))
            out.append(body)
            pending[seq] = (i, k, now)
            room -= 1
        if out:
            batch.issued += len(out) // 2
            self.transport.write(b"".join(out))

    def enquire_link(self) -> None:
        self.link_sent = time.monotonic()
        self.transport.write(_HDR.pack(16, ENQUIRE_LINK, 0, self._next_seq()))

    async def unbind(self) -> None:
        if self.dead:
            return
        if self.bound:
            self.bound = False
            try:
                self.transport.write(_HDR.pack(16, UNBIND, 0, self._next_seq()))
                await asyncio.wait_for(asyncio.shield(self.closed), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass
        if not self.dead:
            self.why = self.why or "unbound"
            self.transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self.abort()


class SmppGateway(SmsGateway):
    """A direct SMPP 3.4 bind to an SMSC: submit_sm with windowing, receipts and MO via deliver_sm.

    ``lookup`` cannot be answered (``{}``, ``lookup_is_authoritative`` False): messages left
    in flight are resolved from receipts, and what has none after ``evidence_grace_s`` is
    re-planned.
    """

    _block_type_name = "SMPP SMS Gateway"
    _description = "Direct SMPP 3.4 binds: windowed submit_sm, delivery receipts and MO via deliver_sm."
    lookup_is_authoritative: ClassVar[bool] = False

    host: str = Field(default="127.0.0.1", description="SMSC host.")
    port: int = Field(default=2775, ge=1, le=65535, description="SMSC SMPP port.")
    system_id: str = Field(default="smsflow", max_length=15, description="SMPP system_id.")
    password: SecretStr = Field(description="SMPP password (at most 8 characters by SMPP 3.4).")
    system_type: str = Field(default="", max_length=12, description="SMPP system_type.")
    source_addr: str | None = Field(default=None, description="Sender address; default: sender_id.")
    source_addr_ton: int | None = Field(default=None, ge=0, le=6, description="Sender TON; default: 5 for an "
                                        "alphanumeric sender, 1 for a number.")
    source_addr_npi: int | None = Field(default=None, ge=0, le=18, description="Sender NPI; default: 0 for an "
                                        "alphanumeric sender, 1 for a number.")
    window_size: int = Field(default=100, ge=1, le=1000, description="submit_sm outstanding at once, per bind.")
    binds: int = Field(default=2, ge=1, le=16, description="Transceiver binds used in parallel by one submit() "
                       "(each with its own window and sequence numbers); a bind the SMSC refuses is skipped.")
    max_reconnects: int = Field(default=2, ge=0, le=100, description="A bind lost during submit() is replaced at "
                                "most this many times per call (what it had in flight stays in doubt).")
    response_timeout_s: float = Field(default=30.0, gt=0, description="No submit_sm_resp / enquire_link_resp "
                                      "within this: the session is dropped (its outstanding submits in doubt).")
    enquire_link_s: float = Field(default=30.0, gt=0, description="enquire_link after this long without traffic.")
    registered_delivery: int = Field(default=1, ge=0, le=255, description="1: ask the SMSC for a final receipt.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="TCP connect + bind timeout, seconds.")
    bind_type: Literal["trx", "tx"] = Field(default="trx", description="trx: receipts come back on the same bind.")
    receipt_linger_s: float = Field(default=1.0, ge=0, description="Keep the bind open at most this long after the "
                                    "last submit_sm_resp to collect receipts (ends early once every accepted part "
                                    "has its final receipt).")
    receipt_window_s: float = Field(default=2.0, ge=0, description="fetch_receipts / fetch_inbound: how long to "
                                    "drain deliver_sm.")
    spool_path: str | None = Field(default=None, description="SQLite spool of received receipts / MO "
                                   "(default: data dir / smpp_spool_<name>.sqlite).")
    max_parts: int = Field(default=10, ge=1, le=255, description="Longest message in segments; longer ones are "
                           "rejected before sending.")
    dcs0_charset: Literal["gsm", "ascii", "latin-1"] = Field(default="gsm", description="How to read inbound "
                                                             "data_coding 0 (SMSCs differ).")

    _last_stats: dict | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ helpers
    def _spool(self) -> _Spool:
        if self.spool_path:
            return _Spool(Path(self.spool_path))

        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.gateway_name)
        return _Spool(get_settings().data_dir / f"smpp_spool_{safe}.sqlite")

    def _source(self) -> tuple[str, int, int]:
        src = self.source_addr or self.sender_id
        numeric = src.lstrip("+").isdigit()
        ton = self.source_addr_ton if self.source_addr_ton is not None else (1 if numeric else 5)
        npi = self.source_addr_npi if self.source_addr_npi is not None else (1 if numeric else 0)
        return (src.lstrip("+") if numeric else src), ton, npi

    def _on_deliver(self, ev, spool: _Spool, counts: dict) -> Receipt | None:
        """Spool one deliver_sm (receipt or MO); returns the receipt as read (None for an MO)."""
        if ev.esm_class & 0x3C in (0x04, 0x08, 0x20):  # SMSC delivery receipt, SME ack, intermediate notice
            r = receipt_from_deliver_sm(ev)
            multi = spool.multipart_of(r.gateway_message_id)
            if multi is None:
                if spool.is_later_part(r.gateway_message_id):  # a part of a message tracked before multipart
                    counts["part_receipts"] += 1
                    return r
                spool.add_receipt(r)
                counts["receipts"] += 1
                return r
            main_id, done = multi
            if done or r.status not in _FINAL:
                if not done and r.gateway_message_id == main_id:  # the first part's progress: harmless, kept
                    spool.add_receipt(r)
                    counts["receipts"] += 1
                else:
                    counts["part_receipts"] += 1
                return r
            counts["part_receipts"] += 1
            if spool.add_part_receipt(main_id, r) is not None:
                counts["receipts"] += 1
            return r
        raw = bytes(ev.short_message)
        if ev.esm_class & 0x40 and raw:  # UDH (e.g. concatenated MO): strip it
            raw = raw[raw[0] + 1:]
        src = ev.source_addr
        if ev.source_addr_ton == 1 and src and not src.startswith("+"):
            src = "+" + src
        tlvs = _tlv_map(ev.tlvs)
        gmid = tlvs.get(TLV_RECEIPTED_MESSAGE_ID, b"").rstrip(b"\0").decode("latin-1") or uuid.uuid4().hex
        spool.add_inbound({"gateway_message_id": gmid, "from": src, "to": ev.destination_addr,
                           "text": decode_short_message(ev.data_coding, raw, self.dcs0_charset)})
        counts["inbound"] += 1
        return None

    # ------------------------------------------------------------------ submit
    def _prepare(self, m: OutgoingMessage) -> tuple[int, list[bytes]] | SubmitResult:

        dst = m.phone_e164.lstrip("+")
        if not dst.isdigit() or len(dst) > 20:
            return SubmitResult(m.reference, False, None, BAD_ADDRESS, "destination is not a phone number")
        try:
            dcs, parts = encode_message(m.text, m.encoding == UCS2)
        except ValueError as exc:
            return SubmitResult(m.reference, False, None, TOO_LONG, str(exc))
        if len(parts) > self.max_parts:
            return SubmitResult(m.reference, False, None, TOO_LONG,
                                f"{len(parts)} segments > max_parts={self.max_parts}")
        return dcs, parts

    async def _run_batch(self, messages: list[OutgoingMessage], prepared: list, binds: int,
                         linger_s: float) -> _Batch:
        spool = self._spool()
        batch = _Batch(self, messages, prepared, spool, self._source())
        ticker = None
        try:
            if batch.parts or not messages:
                for _ in range(binds):
                    batch.start_bind()

                async def tick():
                    while True:
                        await asyncio.sleep(0.5)
                        batch.tick()

                ticker = asyncio.create_task(tick())
            if messages:
                await batch.done  # GatewayUnavailable: nothing was sent
            if linger_s > 0:
                end = time.monotonic() + linger_s
                if not messages:  # a drain: wait for a bind, then listen
                    while batch.binding and not batch.live() and time.monotonic() < end:
                        await asyncio.sleep(0.01)
                    if not batch.live():
                        raise GatewayUnavailable(f"SMPP bind to {self.host}:{self.port} as {self.system_id!r} "
                                                 f"failed: {'; '.join(batch.bind_errors[-3:]) or 'no session'}")
                while batch.live() and time.monotonic() < end and (not messages or not batch.receipts_done.is_set()):
                    try:
                        await asyncio.wait_for(batch.receipts_done.wait(), min(0.1, max(0.0, end - time.monotonic())))
                    except asyncio.TimeoutError:
                        pass
        finally:
            if ticker is not None:
                ticker.cancel()
            await asyncio.gather(*(s.unbind() for s in batch.sessions), return_exceptions=True)
            for _ in range(50):  # binds still in progress: let them end
                if not batch.binding:
                    break
                await asyncio.sleep(0.1)
            for s in batch.sessions:
                s.abort() if not s.dead else None
            spool.close()
        return batch

    async def _submit_async(self, messages: list[OutgoingMessage]) -> tuple[list[SubmitResult | None], dict]:
        prepared: list = []
        pre: dict[int, SubmitResult] = {}
        seen: dict[str, int] = {}
        for i, m in enumerate(messages):
            if m.reference in seen:  # the same reference twice in one batch: sent once, same result
                prepared.append(seen[m.reference])
                continue
            seen[m.reference] = i
            p = self._prepare(m)
            if isinstance(p, SubmitResult):
                pre[i] = p
            prepared.append(p)
        batch = await self._run_batch(messages, prepared, self.binds, self.receipt_linger_s)
        results = batch.results
        for i, r in pre.items():
            results[i] = r
        for i, p in enumerate(prepared):
            if isinstance(p, int):
                results[i] = results[p]
        t_res = (batch.t_results or time.perf_counter()) - batch.t0
        self._last_stats = {"submit_s": t_res, "receipts_s": (batch.t_receipts - batch.t0) if batch.t_receipts else None,
                            "receipts_missing": len(batch.awaiting), "sessions": len(batch.sessions),
                            "pdus": batch.issued, **batch.counts}
        return results, batch.counts

    def submit(self, messages: list[OutgoingMessage]) -> list[SubmitResult]:
        """Submit a batch; one result per message, in order. Raises ``GatewayUnavailable``
        (nothing of the batch sent) when the SMSC cannot be bound."""
        if not messages:
            return []
        t0 = time.perf_counter()
        results, counts = _run(lambda: self._submit_async(messages))
        out = [r for r in results if r is not None]
        if len(out) != len(messages):
            raise RuntimeError(f"smpp submit lost track of {len(messages) - len(out)} of {len(messages)} messages")
        self._log_batch(messages, out, time.perf_counter() - t0, counts)
        return out

    @property
    def last_batch_stats(self) -> dict:
        """Timings of the last submit(): ``submit_s`` (start -> last submit_sm_resp, binds included),
        ``receipts_s`` (start -> every final receipt of the batch spooled; None if not within the linger)."""
        return dict(self._last_stats or {})

    def _log_batch(self, messages, results, elapsed: float, counts: dict) -> None:
        acc = sum(r.accepted for r in results)
        doubt = sum(r.in_doubt for r in results)
        transient = sum(r.transient for r in results)
        rejected = len(results) - acc - doubt - transient
        log.info("smpp submit to %s:%d: %d messages in %.3fs (%.0f msg/s): %d accepted, %d rejected, %d to retry, "
                 "%d in doubt; %d receipts, %d MO spooled", self.host, self.port, len(results), elapsed,
                 len(results) / elapsed if elapsed else 0.0, acc, rejected, transient, doubt, counts["receipts"],
                 counts["inbound"])
        shown = 0
        for m, r in zip(messages, results):
            if (not r.accepted or r.error_code) and shown < 5:
                shown += 1
                log.warning("smpp %s ref=%s to=%s: %s %s", "accepted" if r.accepted else "refused", r.reference,
                            mask_phone(m.phone_e164), r.error_code, r.error)

    # ------------------------------------------------------------------ receipts / MO
    async def _drain_async(self) -> dict:
        batch = await self._run_batch([], [], 1, self.receipt_window_s)
        return batch.counts

    def _drain(self) -> None:
        if self.receipt_window_s <= 0:
            return
        try:
            counts = _run(self._drain_async)
            log.info("smpp drain %s:%d: %d receipts, %d MO", self.host, self.port, counts["receipts"], counts["inbound"])
        except GatewayUnavailable as exc:  # hand out what is spooled anyway
            log.warning("smpp: cannot drain deliver_sm: %s", exc)

    def fetch_receipts(self, limit: int = 100_000) -> list[Receipt]:
        """Bind, drain deliver_sm for ``receipt_window_s``, then hand out (and remove) every spooled
        receipt: those of earlier submit() calls and of this drain. MO messages received meanwhile
        stay spooled for ``fetch_inbound``."""
        self._drain()
        spool = self._spool()
        try:
            return spool.take_receipts(limit)
        finally:
            spool.close()

    def fetch_inbound(self, limit: int = 100_000) -> list[dict]:
        """Bind, drain deliver_sm for ``receipt_window_s``, then hand out (and remove) the spooled MO
        messages: ``{"gateway_message_id", "from", "to", "text"}``."""
        self._drain()
        spool = self._spool()
        try:
            return spool.take_inbound(limit)
        finally:
            spool.close()

    def lookup(self, references: list[str]) -> dict[str, str]:
        """Always ``{}``: an SMSC cannot be asked which of our references it accepted."""
        return {}
