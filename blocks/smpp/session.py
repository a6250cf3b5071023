"""The ESME side of an SMPP session on asyncio: bind, windowed submit_sm batches (pre-packed PDUs, one
write per window), responses matched by sequence number, enquire_link, deliver_sm into the spool."""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import time

from blocks.gateway import GatewayUnavailable, SubmitResult
from blocks.smpp.pdu import NO_RESPONSE, NOT_SENT, PARTIAL, _FINAL, _STATUS_NAMES, _TRANSIENT, _concat_refs
from blocks.smpp.spool import _Spool

log = logging.getLogger("smsflow.gateway.smpp")


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

    def __init__(self, gw, messages, prepared, spool: _Spool, src: tuple[str, int, int]):
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
