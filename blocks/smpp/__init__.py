"""SMPP 3.4 straight to an SMSC: ``SmppGateway`` (the Block, ``block.py``) on an asyncio session
(``session.py``), PDU bodies and receipts (``pdu.py``) and a SQLite spool of what arrived (``spool.py``)."""

from blocks.smpp.block import SmppGateway
from blocks.smpp.pdu import (
    BAD_ADDRESS, NO_RESPONSE, NOT_SENT, PARTIAL, TOO_LONG, decode_short_message, encode_message, gsm7_decode, gsm7_encode,
    receipt_from_deliver_sm,
)

__all__ = [
    "BAD_ADDRESS", "NO_RESPONSE", "NOT_SENT", "PARTIAL", "TOO_LONG", "SmppGateway", "decode_short_message",
    "encode_message", "gsm7_decode", "gsm7_encode", "receipt_from_deliver_sm",
]
