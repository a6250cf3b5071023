"""ASGI service (FastAPI) for delivery-receipt callbacks and inbound messages.

Rules: every call is written to the store and committed BEFORE the 2xx answer (a gateway
that gets no 2xx retries); a duplicate delivery is recognised and harmless; after the
commit a Prefect event is emitted so `reconcile` can run on demand. Nothing depends on
this service being up to keep messages safe: receipts that never arrive end in TTL expiry.
Logs never carry a full phone number.

    smsflow serve --host 127.0.0.1 --port 8787
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from service.webhooks import MAX_BODY
from smsflow.privacy import mask_phone
from blocks.http_gateway import HttpGateway, verify_twilio_signature
from blocks.kannel import KannelGateway
from service.webhooks import authenticate, parse, WebhookError
from smsflow.callback_auth import CallbackRefused, check
from smsflow.links import bot_reason, click_ip_key, ip_hash, is_code
from smsflow.settings import get_settings
from store.db import get_engine, utcnow
from store.links import ClickWriter, LinkReader
from store.events import record_event
from tasks.inbound import store_and_apply
from tasks.reconcile import store_receipts
from smsflow.phones import normalize_phones

log = logging.getLogger("smsflow.service")


def _emit(event: str, resource_id: str, payload: dict[str, Any]) -> None:
    """Best effort: the store is the record; an event only speeds reconcile up."""
    try:
        from prefect.events import emit_event

        emit_event(event=event, resource={"prefect.resource.id": resource_id}, payload=payload)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not emit %s: %s", event, type(exc).__name__)


class ReceiptSignal:
    """``smsflow.receipt.received`` at most once per gateway per ``every_s``: the event only tells
    reconcile that receipts are waiting (the store holds them all), and one event per receipt at
    thousands a second filled Prefect's event queue until request handlers blocked on it. The same
    for clicks: ``smsflow.link.clicked`` per campaign, with the number of clicks since the last one."""

    def __init__(self, every_s: float = 1.0, event: str = "smsflow.receipt.received",
                 resource: str = "smsflow.gateway", counted: str = "receipts"):
        import time

        self.every_s, self._clock, self._last, self._count = every_s, time.monotonic, {}, {}
        self.event, self.resource, self.counted = event, resource, counted

    def __call__(self, key) -> None:
        now = self._clock()
        self._count[key] = self._count.get(key, 0) + 1
        if now - self._last.get(key, -1e9) >= self.every_s:
            self._last[key] = now
            _emit(self.event, f"{self.resource}.{key}", {self.counted: self._count.pop(key)})


class BadInput(Exception):
    """A request we cannot act on: answered with ``status`` (4xx) and the reason, never a 5xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadInput(413 if declared.isdigit() else 400, "body too large" if declared.isdigit() else "bad Content-Length")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadInput(413, "body too large")
    return body


async def _params(request: Request) -> dict[str, str]:
    """Query parameters plus form fields (Kannel uses GET, others POST forms) or a JSON object."""
    params = dict(request.query_params)
    if request.method == "POST":
        params.update(await _body_params(request))
    if any("\x00" in k or "\x00" in v for k, v in params.items()):
        raise BadInput(400, "NUL characters are not allowed")
    return params


async def _body_params(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request)
    if not body:
        return params
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(400, "the body is not UTF-8") from None
    if ctype == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        params.update(dict(parse_qsl(decoded, keep_blank_values=True)))
    elif ctype.endswith("json"):
        import json

        try:
            data = json.loads(decoded)
        except ValueError:
            raise BadInput(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadInput(422, "the JSON body must be an object")
        params.update({str(k): str(v) for k, v in data.items()})
    else:
        raise BadInput(415, "send application/x-www-form-urlencoded or application/json (or GET parameters)")
    return params


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


def create_app(database_url: str | None = None, *, emit_events: bool = True) -> FastAPI:

    app = FastAPI(title="smsflow callbacks", version="1")
    engine = get_engine(database_url)  # migrates on start

    @app.middleware("http")
    async def log_every_call(request: Request, call_next):
        """One line per call: method, path (never the query: it may hold a phone number or a key),
        status and client. A failure of ours (the store is down) is a 503 the caller may retry."""
        try:
            response = await call_next(request)  # BadInput is answered by its exception handler below
        except Exception as exc:  # noqa: BLE001
            log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
            response = JSONResponse({"error": "temporarily unavailable"}, status_code=503, headers={"Retry-After": "5"})
        log.info("%s %s %d from %s", request.method, request.url.path, response.status_code, _client(request))
        return response

    @app.exception_handler(BadInput)
    async def bad_input(_request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def authenticated_gateway(request: Request, params: dict[str, str], what: str) -> str:
        """The gateway a Kannel-side callback claims to come from, once its key is checked."""

        gw = params.get("gw") or "kannel"
        try:
            check(gw, params.get("key"))
        except CallbackRefused as exc:
            log.warning("%s refused from %s: %s", what, _client(request), exc)
            raise BadInput(401, "unauthorized") from None
        return gw
    writer = _receipt_writer(engine)
    receipt_signal = ReceiptSignal()
    if emit_events:
        # import once, up front: a first import racing between request threads deadlocks on
        # Python's module locks ("deadlock detected by _ModuleLock('prefect.events...')")
        import prefect.events  # noqa: F401

    @app.get("/health")
    def health() -> dict[str, str]:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok"}

    @app.api_route("/callbacks/kannel/dlr", methods=["GET", "POST"])
    async def kannel_dlr(request: Request):

        params = await _params(request)
        gw = authenticated_gateway(request, params, "kannel dlr")
        try:
            receipt = KannelGateway.parse_dlr(params)
        except (ValueError, KeyError) as exc:
            log.warning("kannel dlr rejected: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=422)
        await writer.submit((gw, receipt))
        log.info("kannel dlr ref=%s status=%s err=%s", receipt.reference, receipt.status, receipt.error_code)
        if emit_events:
            receipt_signal(gw)
        return PlainTextResponse("OK")

    @app.post("/callbacks/twilio/status")
    async def twilio_status(request: Request):
        import os


        token = os.environ.get("SMSFLOW_TWILIO_AUTH_TOKEN", "")
        form = await _params(request)
        form_only = {k: v for k, v in form.items() if k not in request.query_params}
        public = os.environ.get("SMSFLOW_PUBLIC_BASE_URL")
        url = str(request.url) if not public else public.rstrip("/") + request.url.path + (
            f"?{request.url.query}" if request.url.query else "")
        if not token or not verify_twilio_signature(token, url, form_only, request.headers.get("X-Twilio-Signature")):
            log.warning("twilio status callback with a bad signature rejected")
            return JSONResponse({"error": "invalid signature"}, status_code=401)
        try:
            receipt = HttpGateway.parse_status_callback(form)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        gw = form.get("gw", "twilio")
        await writer.submit((gw, receipt))
        log.info("twilio status ref=%s status=%s err=%s", receipt.reference, receipt.status, receipt.error_code)
        if emit_events:
            receipt_signal(gw)
        return PlainTextResponse("OK")

    @app.post("/webhooks/{kind}/{source}")
    async def crm_webhook(kind: str, source: str, request: Request):
        """CRM events (amoCRM, Bitrix24, generic JSON): authenticated, stored, then emitted."""
        body = await read_body(request)
        try:
            authenticate(kind, source, body, {k.lower(): v for k, v in request.headers.items()}, dict(request.query_params))
            events = parse(kind, body)
        except WebhookError as exc:
            log.warning("webhook %s/%s rejected: %s", kind, source, exc)
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        def store():
            new = []
            with engine.begin() as conn:
                for e in events:
                    event_id = record_event(conn, source, e.event_type, e.entity_id, e.payload, e.dedup_key)
                    if event_id is not None:
                        new.append((int(event_id), e))
            return new

        new = await _in_thread(store)
        log.info("webhook %s/%s: %d event(s), %d new", kind, source, len(events), len(new))
        if emit_events:
            for event_id, e in new:
                _emit(f"crm.{e.event_type}", f"crm.{source}.{e.entity_id or event_id}",
                      {"event_id": event_id, "source": source, "entity_id": e.entity_id})
        return {"received": len(events), "new": len(new)}

    @app.api_route("/inbound/kannel", methods=["GET", "POST"])
    async def kannel_inbound(request: Request):
        params = await _params(request)
        gw = authenticated_gateway(request, params, "kannel inbound")
        raw = {k: v for k, v in params.items() if k != "key"}
        return await _inbound(gw, params.get("id") or None, params.get("from"), params.get("to"), params.get("text"), raw)

    async def _inbound(gateway: str, gid: str | None, sender: str | None, to: str | None, body: str | None,
                       raw: dict[str, Any]):

        if not sender:
            return JSONResponse({"error": "missing sender ('from')"}, status_code=422)
        import pandas as pd

        e164 = normalize_phones(pd.Series([sender]))["phone_e164"].iloc[0] or sender

        def work():
            with engine.begin() as conn:
                return store_and_apply(conn, gateway=gateway, gateway_message_id=gid, from_e164=e164, to=to, body=body,
                                       raw=raw)

        res = await _in_thread(work)
        log.info("inbound %s from %s: kind=%s contacts=%d%s", gateway, mask_phone(e164), res.kind, res.contacts,
                 "" if res.stored else " (duplicate, ignored)")
        if emit_events and res.stored:
            _emit(f"smsflow.inbound.{res.kind}", f"smsflow.gateway.{gateway}", {"kind": res.kind, "contacts": res.contacts})
        # Kannel sends the body back as a reply when max-messages > 0; we keep it at 0 and answer empty
        return PlainTextResponse("", status_code=200)

    # ------------------------------------------------------------------ tracked short links
    # Registered last: /{code} must not shadow the routes above. A malformed code is answered 404 at
    # once (it never reaches the store); a known code's click is committed, then redirected.
    settings = get_settings()
    ip_key = click_ip_key(settings.click_ip_key, settings.data_dir)
    # no batching window: a click waits only for the commit in progress (the next batch is what queued meanwhile)
    clicks = GroupCommit(ClickWriter(engine, synchronous=settings.click_commit == "sync"), "click-writer", max_wait_s=0.0)
    find = LinkReader(engine)
    # a few reader threads, each with its kept store connection (not one per request thread)
    lookups = ThreadPoolExecutor(max_workers=8, thread_name_prefix="link-lookup")
    click_signal = ReceiptSignal(event="smsflow.link.clicked", resource="smsflow.campaign", counted="clicks")
    links: dict[str, tuple[str, Any, int]] = {}  # code -> (target, expires_at, campaign): a link never changes

    def lookup(code: str):
        found = links.get(code)
        if found is None:
            found = find(code)
            if found is not None:
                if len(links) >= 200_000:
                    links.clear()
                links[code] = found
        return found

    async def answer_link(method: str, code: str, ua: str | None, client: str) -> tuple[int, str | None]:
        """(status, redirect target): the click stored and committed first; 404 unknown, 410 expired."""
        found = lookup(code) if code in links else await asyncio.get_running_loop().run_in_executor(
            lookups, lookup, code)
        if found is None:
            return 404, None
        target, expires_at, campaign_id = found
        now = utcnow()
        expired = now >= expires_at
        reason = "expired" if expired else bot_reason(method, ua)
        await clicks.submit((code, now, method, ua[:500] if ua else None, ip_hash(client, ip_key), reason))
        if expired:
            return 410, None
        if emit_events and reason is None:
            click_signal(campaign_id)
        return 302, target

    @app.api_route("/{code}", methods=["GET", "HEAD"], include_in_schema=False)
    async def malformed_link(code: str):
        """Well-formed codes are answered by ShortLinks before routing; what gets here never reaches the store."""
        return PlainTextResponse("not found", status_code=404)

    app.add_middleware(ShortLinks, answer=answer_link)  # outermost: a redirect skips routing and the log middleware
    return app


LINK_HEADERS = (("cache-control", "no-store"), ("referrer-policy", "no-referrer"))


class ShortLinks:
    """Pure ASGI: ``GET``/``HEAD /<code>`` with a well-formed code is answered here, before FastAPI's
    routing, dependency and middleware layers (the redirect is the hot path: phones hit it in bursts);
    it logs the same one line per call. Everything else goes to the app."""

    def __init__(self, app, answer):
        self.app, self.answer = app, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not is_code(scope["path"][1:]):
            return await self.app(scope, receive, send)
        code = scope["path"][1:]
        ua = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"user-agent"), None)
        client = scope["client"][0] if scope.get("client") else "-"
        try:
            status, target = await self.answer(scope["method"], code, ua, client)
        except Exception as exc:  # noqa: BLE001 - the store is down: a 503 the phone's browser may retry
            log.error("%s /%s failed: %s", scope["method"], code, type(exc).__name__)
            status, target = 503, None
        if status == 302:
            headers = [(b"location", _location(target)), (b"content-length", b"0"),
                       *((k.encode(), v.encode()) for k, v in LINK_HEADERS)]
            body = b""
        else:
            text = {404: "not found", 410: EXPIRED_PAGE, 503: '{"error": "temporarily unavailable"}'}[status]
            body = text.encode()
            kind = {404: b"text/plain; charset=utf-8", 410: b"text/html; charset=utf-8",
                    503: b"application/json"}[status]
            headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
            if status == 503:
                headers.append((b"retry-after", b"5"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        log.info("%s /%s %d from %s", scope["method"], code, status, client)


def _location(target: str) -> bytes:
    """The Location header as Starlette's RedirectResponse would write it (non-ASCII percent-encoded)."""
    from urllib.parse import quote

    return quote(target, safe=":/%#?=@[]!$&'()*+,;").encode("latin-1")


EXPIRED_PAGE = """<!doctype html><html lang="ru"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Ссылка устарела / Link expired</title>
</head><body style="font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em">
<h1>Ссылка устарела</h1><p>Срок действия этой ссылки истёк.</p>
<h1>This link has expired</h1><p>The offer this link pointed to is no longer available.</p></body></html>"""


class GroupCommit:
    """Group-commits what requests hand in: requests arriving together share one transaction
    (``write(items)``), and each caller gets its answer only after the commit that holds its item."""

    def __init__(self, write, name: str, max_batch: int = 500, max_wait_s: float = 0.01):
        import queue
        import threading

        self.write, self.max_batch, self.max_wait_s = write, max_batch, max_wait_s
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    async def submit(self, item) -> None:
        import asyncio
        from concurrent.futures import Future

        fut: Future = Future()
        self.q.put((item, fut))
        await asyncio.wrap_future(fut)

    def _run(self) -> None:
        import queue
        import time


        while True:
            items = [self.q.get()]
            end = time.monotonic() + self.max_wait_s
            while len(items) < self.max_batch:
                try:
                    items.append(self.q.get(timeout=max(0.0, end - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self.write([item for item, _ in items])
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error (a 5xx: the caller retries)
                for _, fut in items:
                    fut.set_exception(exc)
            else:
                for _, fut in items:
                    fut.set_result(None)


def _receipt_writer(engine) -> GroupCommit:
    def write(items: list[tuple[str, Any]]) -> None:
        by_gw: dict[str, list] = {}
        for gw, r in items:
            by_gw.setdefault(gw, []).append(r)
        for gw, rs in by_gw.items():
            store_receipts(engine, gw, rs)

    return GroupCommit(write, "receipt-writer")


async def _in_thread(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def run(host: str = "127.0.0.1", port: int = 8787, database_url: str | None = None, emit_events: bool = True) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(database_url, emit_events=emit_events), host=host, port=port, log_level="info",
                access_log=False)
