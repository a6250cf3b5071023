"""An offline Twilio, as the Programmable Messaging API documents itself (httpx.MockTransport).

Kept in one place: Basic auth (20003 on failure), form POST to
/2010-04-01/Accounts/{sid}/Messages.json -> 201 with a message resource; invalid 'To' -> 400
21211; unsubscribed recipient -> 400 21610; over the rate -> 429 20429 with Retry-After.
"""
from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from urllib.parse import parse_qsl

import httpx

E164 = re.compile(r"^\+[1-9]\d{7,14}$")


class FakeTwilio:
    def __init__(self, account_sid="AC" + "0" * 32, auth_token="secret-token", unsubscribed=(), rate_per_s: float | None = None,
                 down: bool = False):
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.unsubscribed = set(unsubscribed)
        self.rate_per_s = rate_per_s
        self.down = down
        self.messages: list[dict] = []
        self.requests = 0
        self.throttled = 0
        self._lock = threading.Lock()
        self._window: list[float] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @staticmethod
    def _error(status: int, code: int, message: str, headers=None) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, json={
            "code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status})

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        with self._lock:
            self.requests += 1
        auth = request.headers.get("authorization", "")
        expected = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if auth != expected:
            return self._error(401, 20003, "Authenticate")
        base = f"/2010-04-01/Accounts/{self.account_sid}"
        if request.method == "GET" and request.url.path == f"{base}.json":
            return httpx.Response(200, json={"sid": self.account_sid, "status": "active"})
        if request.method != "POST" or request.url.path != f"{base}/Messages.json":
            return self._error(404, 20404, "The requested resource was not found")
        if self.rate_per_s is not None:
            now = time.monotonic()
            with self._lock:
                self._window = [t for t in self._window if now - t < 1.0]
                if len(self._window) >= self.rate_per_s:
                    self.throttled += 1
                    return self._error(429, 20429, "Too Many Requests", headers={"Retry-After": "0.05"})
                self._window.append(now)
        form = dict(parse_qsl(request.content.decode()))
        to = form.get("To", "")
        if not E164.match(to):
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to in self.unsubscribed:
            return self._error(400, 21610, "Attempt to send to unsubscribed recipient")
        if not form.get("Body"):
            return self._error(400, 21602, "Message body is required.")
        sid = "SM" + uuid.uuid4().hex
        msg = {"sid": sid, "account_sid": self.account_sid, "to": to, "from": form.get("From"), "body": form["Body"],
               "status": "queued", "error_code": None, "error_message": None, "num_segments": "1",
               "status_callback": form.get("StatusCallback")}
        with self._lock:
            self.messages.append(msg)
        return httpx.Response(201, content=json.dumps(msg).encode(), headers={"content-type": "application/json"})
