"""Kannel (open-source SMS gateway) as an ``SmsGateway`` Block.

    smsflow --HTTP GET /cgi-bin/sendsms--> smsbox --> bearerbox --SMPP--> SMSC
    SMSC --receipt--> bearerbox --> smsbox --HTTP GET dlr-url--> smsflow callback service

Submitting
  One ``GET /cgi-bin/sendsms`` per message, ``concurrency`` requests in flight over
  persistent HTTP/1.1 keep-alive connections, each driven by its own thread with a
  hand-written request and a minimal response parser. (A general-purpose client costs
  milliseconds of CPU per request: ``httpx.AsyncClient`` tops out near 140 msg/s where
  Kannel itself takes over 1,000 msg/s with receipts on.) They are opened at most
  ``CONNECT_BURST`` at a time: smsbox listens with a backlog of 10, and a burst of connects
  overflows it (dropped SYN = a 1 s stall), so opening 32 connections takes several answer
  round trips. The send loop calls ``submit`` back to back, so the connections of one call
  are kept for the next (``_IdleConnections``), but only while they are fresh: idle for less
  than ``KEEPALIVE_REUSE_S`` (smsbox itself keeps an idle connection far longer) and with
  nothing to read (a server that closed it would have made it readable). A connection
  closed by Kannel while idle would swallow a request (written, never answered, so counted
  as accepted without an answer), which is why older or readable ones are never reused.
  ``warm_up`` opens them ahead of the first submit (the send loop calls it while it claims).

  Before anything of a batch is sent, one cheap probe (a sendsms request without a
  receiver: it cannot send anything, and it checks the credentials) must be answered;
  otherwise ``GatewayUnavailable`` is raised and the whole batch is untouched.

  Kannel's answer, per message:
    202 "0: Accepted for delivery"       -> accepted
    202 "3: Queued for later delivery"   -> accepted: the SMSC link is down, but the message
                                            is in Kannel's custody (its store file); sending
                                            it again would be a duplicate
    4xx (bad number, bad field, "Not routable. Do not try again.") -> rejected
    503 "Temporal failure, try again later." / other 5xx           -> transient
    403 "Authorization failed" (credentials changed mid-batch)      -> transient
    no connection / request not (fully) written                     -> transient: Kannel
                                                                       cannot have it
    request written, but no answer (timeout, connection reset)      -> in doubt, with
        error_code KANNEL_NO_ANSWER: the outcome is unknown, and sending again at once could
        send the SMS twice. The message stays 'queued' for recovery: a receipt carrying our
        reference (dlr-mask 31 includes the SMSC's submit ack) settles it; with no receipt after
        ``evidence_grace_s`` it never reached the SMSC and is sent again (e.g. smsbox killed
        with the request in flight).

  Kannel returns no message id, so the gateway_message_id of an accepted message is our
  own reference, and the dlr-url carries that reference back (``ref=``), together with
  Kannel's ``%d`` (receipt type), ``%A`` (the SMSC's receipt text), ``%F`` (the SMSC's
  message id), ``%i`` (smsc-id) and ``%T`` (unix time). The whole dlr-url is URL-encoded
  as ONE parameter value, or smsbox would decode ``%d`` away and cut the URL at ``&``.
  A literal ``%`` inside the dlr-url (our reference, the base URL) is written ``%%``,
  since Kannel expands every ``%<letter>`` it knows.

  GSM-7 text goes as is with ``charset=UTF-8``; anything else with ``coding=2&charset=UTF-8``
  (UCS-2; ``charset`` alone would send GSM 7-bit and the handset would show ``??????``).
  Messages of more than ``max_parts`` segments are rejected before sending: Kannel would
  silently truncate them to its ``max-messages``.

Receipts are pushed to the callback service (``parse_dlr``), so ``fetch_receipts`` returns
nothing, and Kannel cannot be asked what it accepted, so ``lookup`` returns nothing either.

Logs never carry the password (nor the request URL, which contains it) nor a full phone
number.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import select
import socket
import ssl
import string
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr

from blocks.gateway import GatewayUnavailable, OutgoingMessage, Receipt, SmsGateway, SubmitResult
from smsflow.callback_auth import current_secret
from smsflow.privacy import mask_phone, mask_phones_in
from smsflow.sms_encoding import is_gsm7, sms_info, UCS2

log = logging.getLogger("smsflow.gateway.kannel")

CONNECT_BURST = 4  # new connections awaiting their first answer at once (smsbox's listen backlog is 10)
KEEPALIVE_REUSE_S = 2.0  # an idle keep-alive connection is reused by the next submit within this time
NO_ANSWER = "KANNEL_NO_ANSWER"
NOT_SENT = "KANNEL_NOT_SENT"
TOO_LONG = "KANNEL_TOO_LONG"

# SMPP receipt "stat:" -> our receipt status
_STAT = {
    "DELIVRD": "delivered",
    "UNDELIV": "undelivered",
    "EXPIRED": "expired",
    "DELETED": "undelivered",
    "REJECTD": "rejected",
    "ACCEPTD": "accepted",
    "ENROUTE": "enroute",
    "BUFFRED": "enroute",
    "UNKNOWN": "unknown",
}
# Kannel dlr types (%d, bits): 1 delivered to phone, 2 not delivered, 4 queued at SMSC,
# 8 accepted by SMSC (submit_sm_resp ok), 16 rejected by SMSC (submit_sm_resp error);
# Kannel 1.4.5 also sets 32 on an EXPIRED receipt (seen as 34 = 2|32).
_RECEIPT_FIELD = re.compile(r"(id|sub|dlvrd|submit date|done date|stat|err|text):", re.IGNORECASE)
_NACK = re.compile(r"NACK/(0x[0-9a-fA-F]+|\d+)(?:/(.*))?", re.DOTALL)


class _NotSent(Exception):
    """The request did not (completely) reach Kannel: it cannot have been processed."""


class _NoAnswer(Exception):
    """The request was written but no complete answer came back: outcome unknown."""


# ``urllib.parse.quote(s, safe="")`` as one table lookup per UTF-8 byte done in C (``map``): half its
# time on a message's text, which every request quotes (urllib joins a Python-level list of bytes)
_QUOTED = {b: chr(b) if chr(b) in string.ascii_letters + string.digits + "_.-~" else f"%{b:02X}" for b in range(256)}


def _quote(value: str) -> str:
    return "".join(map(_QUOTED.__getitem__, value.encode("utf-8")))


def _header(lower_head: str, name: str) -> str | None:
    """Value of header ``name`` in a lower-cased response head, or None."""
    i = lower_head.find("\n" + name + ":")
    if i < 0:
        return None
    start = i + len(name) + 2
    j = lower_head.find("\r", start)
    return lower_head[start : j if j >= 0 else None].strip()


class _Connection:
    """One persistent HTTP/1.1 connection with a minimal, allocation-light exchange."""

    __slots__ = ("host", "port", "tls", "timeout", "sock", "buf", "idle_since")

    def __init__(self, host: str, port: int, tls: bool, timeout: float):
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.idle_since = 0.0

    def reusable(self, now: float) -> bool:
        """Open, idle for less than ``KEEPALIVE_REUSE_S``, no leftover bytes, and nothing to read:
        a connection the server closed (or wrote to unasked) is readable, and is not reused."""
        sock = self.sock
        if sock is None or self.buf or now - self.idle_since > KEEPALIVE_REUSE_S:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def open(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock, self.buf = sock, b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.buf = None, b""

    def exchange(self, request: bytes) -> tuple[int, str]:
        sock = self.sock
        if sock is None:
            raise _NotSent("not connected")
        try:
            sock.sendall(request)
        except OSError as exc:  # partially written at most: no complete request reached Kannel
            self.close()
            raise _NotSent(f"{type(exc).__name__}: {exc}") from exc
        try:
            return self._read_response(sock)
        except (OSError, ValueError, IndexError) as exc:
            self.close()
            raise _NoAnswer(f"{type(exc).__name__}: {exc}") from exc

    def _read_response(self, sock: socket.socket) -> tuple[int, str]:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("connection closed before the answer")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status = int(head[9:12])
        lower = head.lower()
        clen = _header(lower, "content-length")
        if clen is not None:
            length = int(clen)
        elif _header(lower, "transfer-encoding") is not None:
            raise ValueError("chunked answers are not supported")
        else:
            length = -1  # body until the connection closes
        body_start = end + 4
        if length < 0:
            parts = [buf[body_start:]]
            while chunk := sock.recv(65536):
                parts.append(chunk)
            self.close()
            return status, b"".join(parts).decode("utf-8", "replace")
        while len(buf) - body_start < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("connection closed inside the answer")
            buf += chunk
        body = buf[body_start : body_start + length]
        self.buf = buf[body_start + length :]
        conn = _header(lower, "connection")
        if conn == "close" or (conn is None and head.startswith("HTTP/1.0")):
            self.close()
        return status, body.decode("utf-8", "replace")


class _IdleConnections:
    """Keep-alive connections between two ``submit`` calls of this process, per smsbox address.

    Only the sockets are shared (credentials travel in every request), never across ``fork()``
    (the process id is part of the key), and only fresh ones are handed out (``reusable``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[_Connection]] = {}

    @staticmethod
    def _key(host: str, port: int, tls: bool) -> tuple:
        return os.getpid(), host, port, tls

    def take(self, host: str, port: int, tls: bool, limit: int) -> list[_Connection]:
        """Up to ``limit`` reusable connections, most recently used first; the others are closed
        (stale ones, and the surplus: each call opens one new connection for its probe)."""
        with self._lock:
            idle = self._idle.pop(self._key(host, port, tls), [])
        now = time.monotonic()
        out = []
        for c in reversed(idle):
            if len(out) < limit and c.reusable(now):
                out.append(c)
            else:
                c.close()
        return out

    def give_back(self, host: str, port: int, tls: bool, conns: list[_Connection]) -> None:
        now = time.monotonic()
        keep = [c for c in conns if c.sock is not None and not c.buf]
        for c in conns:
            if c not in keep:
                c.close()
        for c in keep:
            c.idle_since = now
        with self._lock:
            self._idle.setdefault(self._key(host, port, tls), []).extend(keep)

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()


_IDLE = _IdleConnections()


class _ResultStream:
    """Hands results to ``on_results`` in chunks of about an eighth of the batch (at least 200)
    while the batch is still in flight; ``flush`` hands over the rest."""

    def __init__(self, on_results: Callable[[list[SubmitResult]], None] | None, n: int):
        self.on_results, self.chunk = on_results, max(200, n // 8)
        self.lock = threading.Lock()
        self.pending: list[SubmitResult] = []

    def done(self, result: SubmitResult) -> None:
        if self.on_results is None:
            return
        with self.lock:
            self.pending.append(result)
            if len(self.pending) < self.chunk:
                return
            out, self.pending = self.pending, []
        self.on_results(out)

    def flush(self) -> None:
        if self.on_results is None:
            return
        with self.lock:
            out, self.pending = self.pending, []
        if out:
            self.on_results(out)


class KannelGateway(SmsGateway):
    """Kannel's HTTP sendsms interface, fast (keep-alive, parallel), receipts via dlr-url.

    ``lookup`` cannot be answered: Kannel keeps no queryable record of what it accepted.
    Messages left in flight by a crash are resolved from the receipts the callback service
    stores (they carry our reference; with dlr-mask bit 8 the SMSC's acknowledgement comes
    back within moments of the submit); ``lookup`` returns ``{}`` and
    ``lookup_is_authoritative`` stays False, so what has no receipt is re-planned only after
    ``evidence_grace_s``.
    """

    _block_type_name = "Kannel SMS Gateway"
    streams_results: ClassVar[bool] = True
    takes_more: ClassVar[bool] = True
    _description = "Kannel sendsms HTTP interface; delivery receipts arrive at the smsflow callback service."

    sendsms_url: str = Field(default="http://127.0.0.1:13013/cgi-bin/sendsms", description="Kannel smsbox sendsms URL.")
    username: str = Field(default="smsflow", description="sendsms-user username.")
    password: SecretStr = Field(description="sendsms-user password.")
    dlr_url: str | None = Field(
        default="http://127.0.0.1:8787/callbacks/kannel/dlr",
        description="Base URL of the smsflow callback service's Kannel receipt endpoint; None: no receipts.",
    )
    callback_secret: SecretStr | None = Field(
        default=None, description="Secret appended to the dlr-url (key=...) so the callback service knows the "
        "receipt comes from this gateway; default: the first value of SMSFLOW_CALLBACK_SECRET_<BLOCK NAME>.")
    dlr_mask: int = Field(default=31, ge=1, le=63, description="Kannel dlr-mask: 1 delivered, 2 undelivered, 4 queued "
                          "at SMSC, 8 accepted by SMSC, 16 rejected by SMSC.")
    sender: str | None = Field(default=None, description="Sender (from); default: sender_id.")
    smsc: str | None = Field(default=None, description="Route through this smsc-id (Kannel's smsc parameter).")
    concurrency: int = Field(default=32, ge=1, le=512, description="HTTP requests in flight (one keep-alive connection each).")
    batch_size: int = Field(default=10000, ge=1, description="Most messages the send loop claims at once (and no more "
                            "than 5 s of sending at the rate). The claimed batches follow one another through one "
                            "streaming submit call (takes_more), claimed and recorded in the background.")
    timeout_s: float = Field(default=10.0, gt=0, description="Connect / answer timeout per request, seconds.")
    max_parts: int = Field(default=10, ge=1, le=255, description="Longest message in segments; must not exceed the "
                           "sendsms-user's max-messages in kannel.conf (Kannel would truncate silently).")

    # ------------------------------------------------------------------ helpers
    def _target(self) -> tuple[str, int, bool, str]:
        u = urlsplit(self.sendsms_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"sendsms_url must be an http(s) URL, got {self.sendsms_url!r}")
        tls = u.scheme == "https"
        return u.hostname, u.port or (443 if tls else 80), tls, u.path or "/cgi-bin/sendsms"

    def _dlr_pattern(self) -> str | None:
        """The dlr-url with '{ref}' left to fill in; literal '%' doubled for Kannel."""
        if not self.dlr_url:
            return None
        base = self.dlr_url.replace("%", "%%")
        sep = "&" if "?" in base else "?"
        gw = quote(self.gateway_name, safe="-._~").replace("%", "%%")
        secret = self.callback_secret.get_secret_value() if self.callback_secret else current_secret(self.gateway_name)
        key = "&key=" + quote(secret, safe="").replace("%", "%%") if secret else ""
        return base + sep + "ref={ref}&type=%d&answer=%A&msgid=%F&smsc=%i&ts=%T&gw=" + gw + key

    @staticmethod
    def _is_ucs2(m: OutgoingMessage) -> bool:

        return m.encoding == UCS2 or not is_gsm7(m.text)

    def _segments(self, m: OutgoingMessage) -> int:
        if len(m.text) * 2 <= 67 * self.max_parts:  # certainly short enough, skip the exact count
            return m.segments

        return max(m.segments, sms_info(m.text).segments)

    def _fixed(self) -> tuple[tuple[str, str, str | None, str | None], bytes]:
        """The parts of a batch's requests that do not depend on the message (quoted once per batch), and
        the probe request."""
        host, port, _tls, path = self._target()
        hostport = host if port in (80, 443) else f"{host}:{port}"
        common = (f"username={quote(self.username, safe='')}"
                  f"&password={quote(self.password.get_secret_value(), safe='')}")
        probe = f"GET {path}?{common} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode("ascii")
        common += f"&from={quote(self.sender or self.sender_id, safe='')}"
        if self.smsc:
            common += f"&smsc={quote(self.smsc, safe='')}"
        pattern = self._dlr_pattern()
        if pattern:
            common += f"&dlr-mask={self.dlr_mask}"
        head = f"GET {path}?{common}&charset=UTF-8"
        tail = f" HTTP/1.1\r\nHost: {hostport}\r\n\r\n"
        dlr_before = dlr_after = None
        if pattern:  # quoting is per character: quote the fixed parts of the dlr-url once per batch
            before, after = pattern.split("{ref}", 1)
            dlr_before, dlr_after = "&dlr-url=" + quote(before, safe=""), quote(after, safe="")
        return (head, tail, dlr_before, dlr_after), probe

    def _request(self, m: OutgoingMessage, fixed) -> bytes | SubmitResult:
        """The request of one message, or the result decided without sending it (too long)."""
        head, tail, dlr_before, dlr_after = fixed
        parts = self._segments(m)
        if parts > self.max_parts:
            return SubmitResult(m.reference, False, None, TOO_LONG,
                                f"{parts} segments > max_parts={self.max_parts}: Kannel would truncate it")
        req = head + "&to=" + _quote(m.phone_e164) + "&text=" + _quote(m.text)
        if self._is_ucs2(m):
            req += "&coding=2"
        if dlr_before is not None:
            req += dlr_before + _quote(_quote(m.reference).replace("%", "%%")) + dlr_after
        return (req + tail).encode("ascii")

    @staticmethod
    def _repeats(messages: list[OutgoingMessage]) -> list[int | None]:
        """For each message, the index of an earlier one with the same reference (sent once, same
        result), else None."""
        seen: dict[str, int] = {}
        out: list[int | None] = []
        for i, m in enumerate(messages):
            first = seen.setdefault(m.reference, i)
            out.append(first if first != i else None)
        return out

    @staticmethod
    def _result(m: OutgoingMessage, status: int, body: str) -> SubmitResult:
        text = body.strip()
        if 200 <= status < 300:
            if text.startswith("3:"):  # SMSC link not online: queued inside Kannel (store file)
                return SubmitResult(m.reference, True, m.reference, None, text)
            return SubmitResult(m.reference, True, m.reference)
        err = mask_phones_in(text)[:300] or f"HTTP {status}"
        if status >= 500:
            return SubmitResult(m.reference, False, None, f"HTTP_{status}", err, transient=True)
        if status in (401, 403) and "authorization" in text.lower():
            return SubmitResult(m.reference, False, None, f"HTTP_{status}", err, transient=True)
        return SubmitResult(m.reference, False, None, f"HTTP_{status}", err)

    # ------------------------------------------------------------------ interface
    def submit(self, messages: list[OutgoingMessage],
               on_results: Callable[[list[SubmitResult]], None] | None = None,
               more: Callable[[], list[OutgoingMessage]] | None = None) -> list[SubmitResult]:
        """Submit a batch; one result per message, in order. Raises ``GatewayUnavailable``
        (with nothing of the batch sent) when smsbox does not answer the probe.

        ``on_results``: called (from the worker threads) with chunks of results as they come, each
        reference once, so the caller can record them while the rest of the batch is in flight.

        ``more`` (only with ``on_results``): when every message is handed out, the next worker calls it
        (one at a time, the others waiting) for more messages to send in the same call, until it returns
        an empty list; never once Kannel stopped answering (the call ends, the next one probes). The
        results of those messages follow (returned in order after the first ones); an exception raised
        by ``more`` ends the call and is raised once every result has been handed to ``on_results``."""
        if not messages:
            return []
        if more is not None and on_results is None:
            raise ValueError("submit(more=...) needs on_results: the extra messages' results are streamed")
        t0 = time.perf_counter()
        host, port, tls, _path = self._target()
        fixed, probe = self._fixed()
        messages = list(messages)  # grows when ``more`` gives more
        prepared = self._repeats(messages)  # each request is built by the thread that sends it: no wait
        n = len(messages)
        workers = self.concurrency if more is not None else min(self.concurrency, n)
        reused = _IDLE.take(host, port, tls, workers - 1)
        first = self._probe(reused, probe)
        results: list[SubmitResult | None] = [None] * n
        counter = itertools.count()
        lock = threading.Lock()
        down = threading.Event()
        connecting = threading.BoundedSemaphore(CONNECT_BURST)
        stream = _ResultStream(on_results, n)

        state = {"n": n, "more": more, "error": None}

        def extend() -> None:
            """Under ``lock``: ask ``more`` for the next messages (the caller's index is the first new one).
            The results so far are handed over first: a part boundary is when the caller records."""
            stream.flush()
            try:
                extra = state["more"]()
            except BaseException as exc:  # noqa: BLE001 - raised by submit once the results are handed over
                state["error"], extra = exc, []
            if not extra:
                state["more"] = None
                return
            base = len(messages)
            stream.chunk = max(stream.chunk, len(extra) // 8)
            messages.extend(extra)
            prepared.extend(None if r is None else base + r for r in self._repeats(extra))
            results.extend([None] * len(extra))
            state["n"] = len(messages)

        def work(conn: _Connection) -> None:
            done = False
            try:
                while True:
                    with lock:
                        i = next(counter)
                        if i >= state["n"] and state["more"] is not None and not down.is_set():
                            extend()
                    if i >= state["n"]:
                        done = True
                        return
                    m = messages[i]
                    if prepared[i] is not None:  # duplicate reference: filled in below
                        continue
                    req = self._request(m, fixed)
                    if isinstance(req, SubmitResult):
                        results[i] = req
                        stream.done(req)
                        continue
                    if down.is_set():
                        results[i] = SubmitResult(m.reference, False, None, NOT_SENT,
                                                  "not sent: Kannel stopped answering during the batch", transient=True)
                        stream.done(results[i])
                        continue
                    opening = conn.sock is None
                    if opening:
                        # smsbox listens with a backlog of 10: a burst of new connections overflows it,
                        # the kernel drops the SYNs and each dropped one stalls 1 s (SYN retransmit).
                        # So only a few connections may be "opened, not yet answered" at a time.
                        connecting.acquire()
                        try:
                            conn.open()
                        except OSError as exc:
                            connecting.release()
                            down.set()
                            results[i] = SubmitResult(m.reference, False, None, NOT_SENT,
                                                      f"not sent: cannot connect ({exc})", transient=True)
                            stream.done(results[i])
                            continue
                    try:
                        try:
                            status, body = conn.exchange(req)
                        finally:
                            if opening:
                                connecting.release()
                    except _NotSent as exc:
                        results[i] = SubmitResult(m.reference, False, None, NOT_SENT, f"not sent: {exc}", transient=True)
                    except _NoAnswer as exc:
                        results[i] = SubmitResult(m.reference, True, m.reference, NO_ANSWER,
                                                  f"sent, no answer ({exc}): outcome unknown, not resent",
                                                  in_doubt=True)
                    else:
                        results[i] = self._result(m, status, body)
                    stream.done(results[i])
            finally:
                if not done:  # an unexpected error: never hand this connection to another call
                    conn.close()

        conns = [first] + reused + [_Connection(host, port, tls, self.timeout_s) for _ in range(workers - 1 - len(reused))]
        if workers == 1:
            work(first)
        else:
            threads = [threading.Thread(target=work, args=(c,), name=f"kannel-submit-{k}", daemon=True)
                       for k, c in enumerate(conns)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        _IDLE.give_back(host, port, tls, conns)
        stream.flush()

        n = state["n"]
        for i, req in enumerate(prepared):
            if isinstance(req, int):
                results[i] = results[req]
        out: list[SubmitResult] = [r for r in results if r is not None]
        if len(out) != n:  # a worker died on an unexpected error: never report fewer results
            raise RuntimeError(f"kannel submit lost track of {n - len(out)} of {n} messages")
        self._log_batch(messages, out, time.perf_counter() - t0)
        if state["error"] is not None:
            raise state["error"]
        return out

    def _probe(self, reused: list[_Connection], probe: bytes) -> _Connection:
        """Make sure smsbox answers (and accepts our credentials) before anything of the batch is
        sent; raises ``GatewayUnavailable`` otherwise, closing ``reused`` too. The probe always
        goes over a NEW connection: a listener that accepts is what "smsbox is up" means (kept
        connections can outlive it). Returns that connection, ready for the batch."""
        host, port, tls, _path = self._target()
        conn = _Connection(host, port, tls, self.timeout_s)
        problem = None
        try:
            conn.open()
            status, body = conn.exchange(probe)
        except (OSError, _NotSent, _NoAnswer) as exc:
            problem = f"Kannel sendsms at {host}:{port} is not answering: {exc}"
        else:
            if status in (401, 403) and "authorization" in body.lower():
                problem = (f"Kannel sendsms at {host}:{port} refused the credentials of user {self.username!r}: "
                           f"{body.strip()}")
            elif status >= 500:
                problem = f"Kannel sendsms at {host}:{port} answered the probe with HTTP {status}"
        if problem is None:
            return conn
        for c in [conn, *reused]:
            c.close()
        raise GatewayUnavailable(problem)

    def close(self) -> None:
        """Close the idle keep-alive connections this process keeps between submits."""
        _IDLE.close_all()

    def warm_up(self) -> None:
        """Open the keep-alive connections of the next ``submit`` ahead of time (the send loop calls
        this while it claims its first batch), ``CONNECT_BURST`` at a time: each one carries a probe
        (no receiver: nothing can be sent) so smsbox has accepted it before the next opens."""
        host, port, tls, _path = self._target()
        _fixed, probe = self._fixed()
        todo = itertools.count()
        ready: list[_Connection] = []
        lock = threading.Lock()

        def opener() -> None:
            while next(todo) < self.concurrency - 1:
                conn = _Connection(host, port, tls, self.timeout_s)
                try:
                    conn.open()
                    conn.exchange(probe)
                except (OSError, _NotSent, _NoAnswer):
                    conn.close()
                    return
                with lock:
                    ready.append(conn)

        threads = [threading.Thread(target=opener, name=f"kannel-warm-{k}", daemon=True)
                   for k in range(min(CONNECT_BURST, self.concurrency - 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _IDLE.give_back(host, port, tls, ready)

    def _log_batch(self, messages: list[OutgoingMessage], results: list[SubmitResult], elapsed: float) -> None:
        acc = sum(r.accepted for r in results)
        transient = sum(r.transient for r in results)
        unknown = sum(r.error_code == NO_ANSWER for r in results)
        rejected = len(results) - acc - transient
        log.info("kannel submit: %d messages in %.3fs (%.0f msg/s): %d accepted (%d without answer), %d rejected, "
                 "%d to retry", len(results), elapsed, len(results) / elapsed if elapsed else 0.0, acc, unknown,
                 rejected, transient)
        shown = 0
        for m, r in zip(messages, results):
            if (not r.accepted or r.error_code) and shown < 5:
                shown += 1
                log.warning("kannel %s ref=%s to=%s: %s %s", "accepted" if r.accepted else "refused", r.reference,
                            mask_phone(m.phone_e164), r.error_code, r.error)

    def lookup(self, references: list[str]) -> dict[str, str]:
        """Always ``{}``: Kannel's sendsms interface returns no id and cannot be queried for
        what it accepted. In-flight messages are resolved from the receipts the callback
        service stores (matched on our reference); what has no receipt after
        ``evidence_grace_s`` is re-planned (``lookup_is_authoritative`` is False)."""
        return {}

    def fetch_receipts(self, limit: int = 100_000) -> list[Receipt]:
        """Always ``[]``: Kannel pushes receipts to ``dlr_url`` (see ``parse_dlr``)."""
        return []

    # ------------------------------------------------------------------ receipts
    @staticmethod
    def parse_receipt_text(text: str) -> dict[str, str]:
        """``id:X sub:001 dlvrd:001 submit date:2611251047 done date:... stat:DELIVRD err:000 text:...``
        -> {"id": "X", "sub": "001", ..., "stat": "DELIVRD", "err": "000", "text": "..."}."""
        fields: dict[str, str] = {}
        matches = list(_RECEIPT_FIELD.finditer(text or ""))
        for k, mt in enumerate(matches):
            end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
            name = mt.group(1).lower()
            if name in fields:  # 'text:' may itself contain 'id:' etc.; the first occurrence counts
                continue
            fields[name] = text[mt.end() : end].strip() if name != "text" else text[mt.end() :].strip()
            if name == "text":
                break
        return fields

    @staticmethod
    def parse_dlr(query_params: dict[str, Any]) -> Receipt:
        """A Kannel dlr-url callback (``ref``, ``type`` = %d, ``answer`` = %A, ``msgid`` = %F,
        ``smsc`` = %i, ``ts`` = %T) -> ``Receipt``. Values may be strings or lists (parse_qs).

        Status: an SMPP receipt's ``stat:`` wins (DELIVRD delivered, UNDELIV/DELETED undelivered,
        EXPIRED expired, REJECTD rejected, ACCEPTD accepted, ENROUTE enroute, UNKNOWN unknown);
        without one, the type bits decide: 16 rejected (by the SMSC at submit; error_code = the
        SMPP command_status), 32 expired, 2 undelivered, 1 delivered, 4 enroute, 8 accepted.
        Raises ``ValueError`` without ``ref`` or with a non-numeric ``type``."""
        p = {k: (v[0] if isinstance(v, (list, tuple)) and v else v) for k, v in query_params.items()}
        p = {k: ("" if v is None else str(v)) for k, v in p.items()}
        ref = p.get("ref", "").strip()
        if not ref:
            raise ValueError("kannel dlr without 'ref'")
        try:
            dtype = int(p.get("type", "").strip())
        except ValueError:
            raise ValueError(f"kannel dlr with a bad 'type': {p.get('type')!r}") from None
        answer = p.get("answer", "")
        fields = KannelGateway.parse_receipt_text(answer) if "stat:" in answer.lower() else {}
        error_code: str | None = None
        stat = fields.get("stat", "").upper()
        if dtype & 16:
            status = "rejected"
            nack = _NACK.search(answer)
            if nack:
                code = nack.group(1)
                error_code = f"0x{int(code, 16):08X}" if code.lower().startswith("0x") else code
        elif stat:
            status = _STAT.get(stat, "unknown")
        elif dtype & 32:
            status = "expired"
        elif dtype & 2:
            status = "undelivered"
        elif dtype & 1:
            status = "delivered"
        elif dtype & 4:
            status = "enroute"
        elif dtype & 8:
            status = "accepted"
        else:
            status = "unknown"
        if fields.get("err"):
            error_code = fields["err"]
        event_at = None
        ts = p.get("ts", "").strip()
        if ts.isdigit():
            event_at = datetime.fromtimestamp(int(ts), timezone.utc).replace(tzinfo=None)
        elif fields.get("done date", "").isdigit():
            d = fields["done date"]
            try:
                event_at = datetime.strptime(d, "%y%m%d%H%M%S" if len(d) == 12 else "%y%m%d%H%M")
            except ValueError:
                event_at = None
        gmid = fields.get("id") or p.get("msgid", "").strip() or ref
        raw = {k: v for k, v in p.items() if k not in ("password", "username", "key")}
        return Receipt(gateway_message_id=gmid, reference=ref, status=status, error_code=error_code,
                       event_at=event_at, raw=raw)
