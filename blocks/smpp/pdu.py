"""SMPP 3.4 PDU contents: GSM 03.38 (unpacked) and UCS-2 message bodies, concatenation, receipts
from deliver_sm (receipt text or TLVs), status names. No I/O."""

from __future__ import annotations

import itertools
import logging
import random
from datetime import datetime

from blocks.gateway import Receipt
from blocks.kannel import KannelGateway
from smsflow.sms_encoding import is_gsm7, split_parts


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
