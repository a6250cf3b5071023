"""A direct SMPP 3.4 client (ESME) as an ``SmsGateway`` Block, on PyPI ``smpp34``.

    smsflow --submit_sm--> SMSC          (one bind per submit() call, bind_type "trx")
    SMSC --deliver_sm (receipts, MO)--> smsflow   (on the same session, or on fetch_*())

Submitting
  ``submit`` is synchronous and runs its own asyncio loop (in a helper thread when the
  calling thread already runs one). It binds first; a failed connect / bind raises
  ``GatewayUnavailable`` before anything of the batch is sent. Then every message is
  submitted concurrently, at most ``window_size`` submit_sm outstanding at once (an
  ``asyncio.Semaphore``: smpp34's own window does not block the caller).

  Encoding: GSM-7 text goes as data_coding 0, GSM 03.38 *unpacked* (one septet per byte,
  extension characters as ESC 0x1B + code); anything else (or ``encoding == "UCS-2"``) as
  data_coding 8, UTF-16-BE. Longer messages are split with ``tasks.sms_encoding.split_parts``
  and each part carries a concatenation UDH (esm_class 0x40, ``05 00 03 ref total seq``);
  the parts of one message go one after the other, and the message's id is the first part's.

  submit_sm_resp, per message:
    ESME_ROK                          -> accepted, gateway_message_id = the SMSC's message_id
    ESME_RTHROTTLED / ESME_RMSGQFUL   -> transient (the SMSC refused it: provably not sent)
    any other status                  -> rejected, error_code = "0x%08X" of the status
    session lost / no resp within smpp34's 30 s response timer (it raises SmppError
    ESME_RSYSERR; whether the PDU was written cannot be told)
                                      -> in_doubt (never resent blindly); nothing more of
                                         the batch is issued on that session
    session known dead before the submit_sm was issued -> transient (SMPP_NOT_SENT)
  A multipart message whose first part was accepted but a later one was not is reported
  accepted (it is on its way, partly) with error_code ``SMPP_PARTIAL``.

Receipts and MO
  deliver_sm arriving while submitting and for ``receipt_linger_s`` after are kept;
  ``fetch_receipts`` / ``fetch_inbound`` bind (trx) and drain deliver_sm for
  ``receipt_window_s``. Everything received is written at once to a small SQLite spool
  (``spool_path``), so a crash between submit and fetch loses nothing; ``fetch_receipts``
  hands out (and removes) the spooled receipts, ``fetch_inbound`` the spooled MO messages.
  Receipts are parsed from the SMPP receipt text (``id:... stat:DELIVRD err:000``) or the
  receipted_message_id / message_state TLVs. A concatenated message is known by its first
  part's id, but every part gets its own receipt: the spool keeps the final receipts of its
  parts and hands out ONE receipt for the message once every accepted part has a final one
  (delivered only when all parts were delivered; otherwise the failed part's status and
  error; undelivered with ``SMPP_PARTIAL`` when a part never got past submit_sm).
  Intermediate receipts of the first part pass through; those of later parts are dropped.

enquire_link keepalive and the 30 s response timer are handled by smpp34's core.
``lookup`` returns ``{}``: SMPP cannot be asked which references were accepted.

Logs never carry the password nor a full phone number.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import random
import sqlite3
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from blocks.gateway import GatewayUnavailable, OutgoingMessage, Receipt, SmsGateway, SubmitResult
from smsflow.privacy import mask_phone

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
    from tasks.sms_encoding import is_gsm7, split_parts

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
    from blocks.kannel import KannelGateway

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
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT expected, short, done FROM multipart WHERE main_id = ?", (main_id,)).fetchone()
            parts = self.db.execute("SELECT part_id, status, error_code, event_at, raw FROM part_receipts "
                                    "WHERE main_id = ?", (main_id,)).fetchall()
            if row is None or row[2] or len(parts) < row[0]:
                self.db.execute("COMMIT")
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
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
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


class SmppGateway(SmsGateway):
    """A direct SMPP 3.4 bind to an SMSC: submit_sm with windowing, receipts and MO via deliver_sm.

    ``lookup`` cannot be answered (``{}``, ``lookup_is_authoritative`` False): messages left
    in flight are resolved from receipts, and what has none after ``evidence_grace_s`` is
    re-planned.
    """

    _block_type_name = "SMPP SMS Gateway"
    _description = "Direct SMPP 3.4 bind (smpp34): submit_sm, delivery receipts and MO via deliver_sm."
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
    window_size: int = Field(default=50, ge=1, le=1000, description="submit_sm outstanding at once.")
    registered_delivery: int = Field(default=1, ge=0, le=255, description="1: ask the SMSC for a final receipt.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="TCP connect + bind timeout, seconds.")
    bind_type: Literal["trx", "tx"] = Field(default="trx", description="trx: receipts come back on the same bind.")
    receipt_linger_s: float = Field(default=1.0, ge=0, description="Keep the bind open this long after the last "
                                    "submit_sm_resp to collect receipts.")
    receipt_window_s: float = Field(default=2.0, ge=0, description="fetch_receipts / fetch_inbound: how long to "
                                    "drain deliver_sm.")
    spool_path: str | None = Field(default=None, description="SQLite spool of received receipts / MO "
                                   "(default: data dir / smpp_spool_<name>.sqlite).")
    max_parts: int = Field(default=10, ge=1, le=255, description="Longest message in segments; longer ones are "
                           "rejected before sending.")
    dcs0_charset: Literal["gsm", "ascii", "latin-1"] = Field(default="gsm", description="How to read inbound "
                                                             "data_coding 0 (SMSCs differ).")

    # ------------------------------------------------------------------ helpers
    def _spool(self) -> _Spool:
        if self.spool_path:
            return _Spool(Path(self.spool_path))
        from smsflow.settings import get_settings

        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.gateway_name)
        return _Spool(get_settings().data_dir / f"smpp_spool_{safe}.sqlite")

    def _source(self) -> tuple[str, int, int]:
        src = self.source_addr or self.sender_id
        numeric = src.lstrip("+").isdigit()
        ton = self.source_addr_ton if self.source_addr_ton is not None else (1 if numeric else 5)
        npi = self.source_addr_npi if self.source_addr_npi is not None else (1 if numeric else 0)
        return (src.lstrip("+") if numeric else src), ton, npi

    def _client(self):
        import smpp34

        return smpp34.Client(self.host, self.port, self.system_id, self.password.get_secret_value(),
                             bind_type=self.bind_type, system_type=self.system_type,
                             window_size=self.window_size, connect_timeout_ms=int(self.connect_timeout_s * 1000))

    async def _bind(self):
        client = self._client()
        try:
            smsc = await asyncio.wait_for(client.connect(), self.connect_timeout_s + 5)
        except Exception as exc:  # noqa: BLE001 - SmppError, timeouts, OS errors: all mean "not bound"
            try:
                await client.stop()
            except Exception:  # noqa: BLE001
                pass
            raise GatewayUnavailable(f"SMPP bind to {self.host}:{self.port} as {self.system_id!r} failed: "
                                     f"{type(exc).__name__}: {exc}") from None
        return client, smsc

    @staticmethod
    async def _close(client, smsc) -> None:
        try:
            await asyncio.wait_for(smsc.unbind(), 5)
        except Exception:  # noqa: BLE001
            pass
        try:
            await asyncio.wait_for(client.stop(), 5)
        except Exception:  # noqa: BLE001
            pass

    def _on_deliver(self, ev, spool: _Spool, counts: dict) -> None:
        if ev.esm_class & 0x3C in (0x04, 0x08, 0x20):  # SMSC delivery receipt, SME ack, intermediate notice
            r = receipt_from_deliver_sm(ev)
            multi = spool.multipart_of(r.gateway_message_id)
            if multi is None:
                if spool.is_later_part(r.gateway_message_id):  # a part of a message tracked before multipart
                    counts["part_receipts"] += 1
                    return
                spool.add_receipt(r)
                counts["receipts"] += 1
                return
            main_id, done = multi
            if done or r.status not in _FINAL:
                if not done and r.gateway_message_id == main_id:  # the first part's progress: harmless, kept
                    spool.add_receipt(r)
                    counts["receipts"] += 1
                else:
                    counts["part_receipts"] += 1
                return
            counts["part_receipts"] += 1
            if spool.add_part_receipt(main_id, r) is not None:
                counts["receipts"] += 1
            return
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

    async def _reader(self, smsc, spool: _Spool, counts: dict, dead: asyncio.Event) -> None:
        import smpp34

        try:
            while True:
                try:
                    ev = await smsc.next()
                except Exception as exc:  # noqa: BLE001 - the session is gone either way
                    log.debug("smpp session ended: %s: %s", type(exc).__name__, exc)
                    return
                if isinstance(ev, smpp34.Disconnected):
                    return
                if isinstance(ev, smpp34.DeliverSmEvent):
                    try:
                        self._on_deliver(ev, spool, counts)
                    except Exception as exc:  # noqa: BLE001 - one bad PDU must not stop the session
                        log.warning("smpp: could not handle a deliver_sm: %s: %s", type(exc).__name__, exc)
        finally:
            dead.set()

    # ------------------------------------------------------------------ submit
    def _prepare(self, m: OutgoingMessage) -> tuple[int, list[bytes]] | SubmitResult:
        from tasks.sms_encoding import UCS2

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

    async def _submit_async(self, messages: list[OutgoingMessage]) -> tuple[list[SubmitResult | None], dict]:
        n = len(messages)
        results: list[SubmitResult | None] = [None] * n
        prepared: list = []
        seen: dict[str, int] = {}
        for i, m in enumerate(messages):
            if m.reference in seen:  # the same reference twice in one batch: sent once, same result
                prepared.append(seen[m.reference])
                continue
            seen[m.reference] = i
            p = self._prepare(m)
            if isinstance(p, SubmitResult):
                results[i] = p
            prepared.append(p)

        src, ton, npi = self._source()
        counts = {"receipts": 0, "inbound": 0, "part_receipts": 0}
        client, smsc = await self._bind()  # GatewayUnavailable: nothing sent
        spool = self._spool()
        dead = asyncio.Event()
        reader = asyncio.create_task(self._reader(smsc, spool, counts, dead))
        window = asyncio.Semaphore(self.window_size)

        async def one_part(dst: str, dcs: int, payload: bytes, esm: int):
            async with window:
                if dead.is_set():
                    return None
                try:
                    return await smsc.submit_sm(dst, payload, source_addr=src, source_addr_ton=ton,
                                                source_addr_npi=npi, dest_addr_ton=1, dest_addr_npi=1,
                                                esm_class=esm, registered_delivery=self.registered_delivery,
                                                data_coding=dcs)
                except Exception:
                    # session lost or no resp within smpp34's response timer: issue nothing more on it
                    # (marked before the window slot is released, so no waiter slips through)
                    dead.set()
                    raise

        def short(ids: list[str]) -> None:
            """A later part of a concatenated message did not get through: its receipts settle it."""
            if ids and ids[0] and spool.multipart_short(ids[0], len(ids)) is not None:
                counts["receipts"] += 1

        async def one(i: int, m: OutgoingMessage, dcs: int, parts: list[bytes]) -> None:
            dst = m.phone_e164.lstrip("+")
            ids: list[str] = []
            total = len(parts)
            cref = next(_concat_refs) % 256
            for seq, payload in enumerate(parts, 1):
                esm = 0
                if total > 1:
                    payload = bytes([0x05, 0x00, 0x03, cref, total, seq]) + payload
                    esm = 0x40
                first = seq == 1
                try:
                    resp = await one_part(dst, dcs, payload, esm)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - smpp34.SmppError: session lost / resp timeout
                    dead.set()
                    if first:
                        results[i] = SubmitResult(m.reference, False, None, NO_RESPONSE,
                                                  f"submit_sm sent, no response ({exc}): outcome unknown",
                                                  in_doubt=True)
                    else:  # in doubt whether this part went out: expect receipts for the accepted ones only
                        results[i] = SubmitResult(m.reference, True, ids[0], PARTIAL,
                                                  f"part {seq}/{total}: no response ({exc})")
                        short(ids)
                    break
                if resp is None:  # the session died before this part was issued
                    if first:
                        results[i] = SubmitResult(m.reference, False, None, NOT_SENT,
                                                  "not sent: the SMPP session ended during the batch", transient=True)
                    else:
                        results[i] = SubmitResult(m.reference, True, ids[0], PARTIAL,
                                                  f"parts {seq}..{total} of {total} not sent: session ended")
                        short(ids)
                    break
                if resp.is_success:
                    ids.append(resp.message_id or "")
                    if first and total > 1 and resp.message_id:  # before any receipt can arrive: see _on_deliver
                        spool.add_multipart(resp.message_id, total)
                    if not first and resp.message_id:
                        spool.add_parts(ids[0], [resp.message_id])
                    continue
                st = resp.command_status
                code = f"0x{st:08X}"
                err = _STATUS_NAMES.get(st, "SMPP error")
                if not first:
                    results[i] = SubmitResult(m.reference, True, ids[0], PARTIAL,
                                              f"part {seq}/{total} refused: {code} {err}")
                    short(ids)
                elif st in _TRANSIENT:
                    results[i] = SubmitResult(m.reference, False, None, code, err, transient=True)
                else:
                    results[i] = SubmitResult(m.reference, False, None, code, err)
                break
            else:
                results[i] = SubmitResult(m.reference, True, ids[0] or None)

        try:
            tasks = [asyncio.create_task(one(i, messages[i], *p))
                     for i, p in enumerate(prepared) if isinstance(p, tuple)]
            if tasks:
                await asyncio.gather(*tasks)
            if self.receipt_linger_s > 0 and not dead.is_set():
                try:
                    await asyncio.wait_for(dead.wait(), self.receipt_linger_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._shutdown(client, smsc, reader, spool)
        for i, p in enumerate(prepared):
            if isinstance(p, int):
                results[i] = results[p]
        return results, counts

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
        counts = {"receipts": 0, "inbound": 0, "part_receipts": 0}
        client, smsc = await self._bind()
        spool = self._spool()
        dead = asyncio.Event()
        reader = asyncio.create_task(self._reader(smsc, spool, counts, dead))
        try:
            try:
                await asyncio.wait_for(dead.wait(), self.receipt_window_s)
            except asyncio.TimeoutError:
                pass
        finally:
            await self._shutdown(client, smsc, reader, spool)
        return counts

    async def _shutdown(self, client, smsc, reader, spool) -> None:
        """Unbind, let the receipt reader finish (5 s at most), close the spool."""
        await self._close(client, smsc)
        try:
            await asyncio.wait_for(reader, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
            reader.cancel()
        spool.close()

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
