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
import concurrent.futures
import time
import uuid
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr, SecretStr

from blocks.gateway import GatewayUnavailable, OutgoingMessage, Receipt, SmsGateway, SubmitResult
from smsflow.privacy import mask_phone
from smsflow.settings import get_settings
from smsflow.sms_encoding import UCS2
from blocks.smpp.pdu import (
    BAD_ADDRESS, TLV_RECEIPTED_MESSAGE_ID, TOO_LONG, _FINAL, _tlv_map, decode_short_message, encode_message, log,
    receipt_from_deliver_sm,
)
from blocks.smpp.session import _Batch
from blocks.smpp.spool import _Spool


def _run(coro_factory):
    """Run a coroutine to completion from synchronous code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smpp-loop") as ex:
        return ex.submit(asyncio.run, coro_factory()).result()


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
