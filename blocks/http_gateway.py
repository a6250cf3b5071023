"""HTTP SMS providers. First concrete one: Twilio-compatible (Programmable Messaging API).

    POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json   (HTTP Basic: AccountSid:AuthToken)
    form: To, From | MessagingServiceSid, Body, StatusCallback
    201 {"sid": "SM...", "status": "queued", ...}
    4xx {"code": 21211, "message": "...", "more_info": "...", "status": 400}
    429 {"code": 20429, ...} (+ Retry-After)

Status callbacks (POST form: MessageSid, MessageStatus, ErrorCode, ...) are signed with
``X-Twilio-Signature`` = base64(HMAC-SHA1(auth_token, url + concat(sorted key+value))).
Our reference travels in the StatusCallback URL (``?ref=``), so a callback always names the
outbox row even if we crashed before recording the sid.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlencode

import httpx
from pydantic import Field, SecretStr

from smsflow.ratelimit import retry_after_seconds
from blocks.gateway import GatewayUnavailable, OutgoingMessage, Receipt, SmsGateway, SubmitResult

# Twilio error codes we treat specially
TRANSIENT_CODES = {20429, 20500, 20503, 30001}  # too many requests, internal error, unavailable, queue overflow
STATUS_MAP = {
    "accepted": "accepted",
    "scheduled": "accepted",
    "queued": "accepted",
    "sending": "enroute",
    "sent": "enroute",
    "delivered": "delivered",
    "undelivered": "undelivered",
    "failed": "rejected",
    "canceled": "rejected",
    "read": "delivered",
}


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    payload = url + "".join(f"{k}{params[k]}" for k in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def verify_twilio_signature(auth_token: str, url: str, params: dict[str, str], signature: str | None) -> bool:
    if not signature:
        return False
    return hmac.compare_digest(twilio_signature(auth_token, url, params), signature)


class HttpGateway(SmsGateway):
    """A Twilio-compatible REST provider."""

    _block_type_name = "HTTP SMS Gateway"

    base_url: str = Field(default="https://api.twilio.com", description="API root (Twilio or a compatible provider).")
    account_sid: str = Field(default="", description="Account SID (not secret; the token is).")
    auth_token: SecretStr = Field(default=SecretStr(""), description="Auth token: signs callbacks, authenticates calls.")
    from_number: str | None = Field(default=None, description="Sender number or alphanumeric id.")
    messaging_service_sid: str | None = None
    status_callback_url: str | None = Field(default=None, description="Our callback service, e.g. https://host/callbacks/twilio/status")
    concurrency: int = Field(default=16, ge=1, le=256)
    timeout_s: float = 15.0
    max_retry_after_s: float = 30.0

    def _client(self, transport: httpx.BaseTransport | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            auth=(self.account_sid, self.auth_token.get_secret_value()),
            timeout=self.timeout_s,
            transport=transport or getattr(self, "_transport", None),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )

    def with_transport(self, transport: httpx.BaseTransport) -> "HttpGateway":
        """Use a custom transport (httpx.MockTransport in offline tests)."""
        object.__setattr__(self, "_transport", transport)
        return self

    def _callback(self, reference: str) -> str | None:
        if not self.status_callback_url:
            return None
        sep = "&" if "?" in self.status_callback_url else "?"
        return f"{self.status_callback_url}{sep}{urlencode({'ref': reference})}"

    def _one(self, client: httpx.Client, m: OutgoingMessage) -> SubmitResult:
        data = {"To": m.phone_e164, "Body": m.text}
        if self.messaging_service_sid:
            data["MessagingServiceSid"] = self.messaging_service_sid
        else:
            data["From"] = self.from_number or self.sender_id
        cb = self._callback(m.reference)
        if cb:
            data["StatusCallback"] = cb
        path = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        for attempt in range(3):
            try:
                r = client.post(path, data=data)
            except httpx.ConnectError as exc:
                # nothing reached the provider: safe to retry later
                return SubmitResult(m.reference, False, None, "CONNECT", f"{type(exc).__name__}", transient=True)
            except httpx.TransportError as exc:
                # the request may have reached the provider: in doubt. The message stays in flight and
                # is settled from the status callback carrying our reference (or the evidence grace)
                return SubmitResult(m.reference, False, None, "TRANSPORT", f"{type(exc).__name__}", in_doubt=True)
            if r.status_code in (200, 201):
                body = r.json()
                if body.get("error_code"):
                    return SubmitResult(m.reference, False, body.get("sid"), str(body["error_code"]),
                                        body.get("error_message") or "failed", transient=False)
                return SubmitResult(m.reference, True, body.get("sid"))
            try:
                err = r.json()
            except ValueError:
                err = {"code": r.status_code, "message": r.text[:200]}
            code = int(err.get("code") or r.status_code)
            if r.status_code == 429 or code in TRANSIENT_CODES or r.status_code >= 500:
                wait = retry_after_seconds(r.headers.get("Retry-After"))
                if r.status_code == 429 and wait is not None and wait <= self.max_retry_after_s and attempt < 2:
                    time.sleep(wait)
                    continue
                return SubmitResult(m.reference, False, None, str(code), str(err.get("message", ""))[:300], transient=True)
            return SubmitResult(m.reference, False, None, str(code), str(err.get("message", ""))[:300], transient=False)
        return SubmitResult(m.reference, False, None, "20429", "too many requests", transient=True)

    def submit(self, messages: list[OutgoingMessage]) -> list[SubmitResult]:
        if not messages:
            return []
        with self._client() as client:
            try:  # cheap reachability check so an outage fails the batch before anything is sent
                client.get(f"/2010-04-01/Accounts/{self.account_sid}.json")
            except httpx.TransportError as exc:
                raise GatewayUnavailable(f"{self.base_url} unreachable: {type(exc).__name__}") from None
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(messages))) as pool:
                return list(pool.map(lambda m: self._one(client, m), messages))

    def lookup(self, references: list[str]) -> dict[str, str]:
        """Twilio has no client reference to search by: in-flight messages are resolved from the
        status callbacks (they carry ``ref``) that the callback service stores."""
        return {}

    @staticmethod
    def parse_status_callback(params: dict[str, str]) -> Receipt:
        sid = params.get("MessageSid") or params.get("SmsSid")
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        if not sid or not status:
            raise ValueError("status callback without MessageSid/MessageStatus")
        code = params.get("ErrorCode") or None
        return Receipt(
            gateway_message_id=sid,
            reference=params.get("ref") or None,
            status=STATUS_MAP.get(status, "unknown"),
            error_code=code,
            event_at=datetime.now(timezone.utc).replace(tzinfo=None),
            raw={k: v for k, v in params.items() if k not in ("To", "From", "Body")},
        )
