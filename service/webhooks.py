"""Signed CRM webhooks: parse and authenticate amoCRM, Bitrix24 and generic JSON events.

Generic JSON: headers ``X-Smsflow-Timestamp`` (unix seconds) and ``X-Smsflow-Signature``
= hex HMAC-SHA256(secret, f"{timestamp}.{raw body}"), 5-minute replay window.
amoCRM (no signature of its own): a per-source token in the URL, ``?token=...``.
Bitrix24: its ``auth[application_token]`` form field must equal the configured token.
Secrets: ``SMSFLOW_WEBHOOK_SECRET_<SOURCE>`` (source upper-cased, '-' -> '_').
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

MAX_BODY = 1024 * 1024
REPLAY_WINDOW_S = 300


class WebhookError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class CrmEventIn:
    event_type: str
    entity_id: str | None
    dedup_key: str
    payload: dict[str, Any]


def secret_for(source: str) -> str | None:
    return os.environ.get("SMSFLOW_WEBHOOK_SECRET_" + source.upper().replace("-", "_"))


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def authenticate(kind: str, source: str, body: bytes, headers: dict[str, str], query: dict[str, str],
                 now: float | None = None) -> None:
    secret = secret_for(source)
    if not secret:
        raise WebhookError(401, f"no webhook secret configured for source '{source}'")
    if kind == "generic":
        ts = headers.get("x-smsflow-timestamp", "")
        sig = headers.get("x-smsflow-signature", "")
        try:
            age = abs((now or time.time()) - int(ts))
        except ValueError:
            raise WebhookError(401, "missing or bad X-Smsflow-Timestamp") from None
        if age > REPLAY_WINDOW_S:
            raise WebhookError(401, "timestamp outside the 5-minute replay window")
        if not hmac.compare_digest(sign(secret, ts, body), sig):
            raise WebhookError(401, "bad signature")
    elif kind == "amocrm":
        if not hmac.compare_digest(query.get("token", ""), secret):
            raise WebhookError(401, "bad token")
    elif kind == "bitrix24":
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        if not hmac.compare_digest(form.get("auth[application_token]", ""), secret):
            raise WebhookError(401, "bad application_token")
    else:
        raise WebhookError(404, f"unknown webhook kind '{kind}'")


def parse(kind: str, body: bytes) -> list[CrmEventIn]:
    if kind == "generic":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise WebhookError(422, "body is not JSON") from None
        events = data if isinstance(data, list) else [data]
        out = []
        for e in events:
            if not isinstance(e, dict) or not isinstance(e.get("type"), str):
                raise WebhookError(422, "each event needs a string 'type'")
            key = str(e.get("id") or _body_hash(json.dumps(e, sort_keys=True).encode()))
            out.append(CrmEventIn(e["type"], None if e.get("entity_id") is None else str(e["entity_id"]), key, e))
        return out
    form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    if not form:
        raise WebhookError(422, "empty form body")
    fields = dict(form)
    if kind == "amocrm":
        # e.g. leads[status][0][id]=1&leads[status][0][status_id]=142&leads[status][0][pipeline_id]=7
        groups: dict[tuple[str, str, str], dict[str, str]] = {}
        for k, v in form:
            parts = k.replace("]", "").split("[")
            if len(parts) >= 4 and parts[0] in ("leads", "contacts", "customers", "tasks"):
                groups.setdefault((parts[0], parts[1], parts[2]), {})[".".join(parts[3:])] = v
        if not groups:
            raise WebhookError(422, "no amoCRM entity in the body")
        out = []
        for (entity, action, _), vals in groups.items():
            etype = f"{entity.rstrip('s')}.{action}"
            key = _body_hash(f"{etype}:{sorted(vals.items())}".encode())
            out.append(CrmEventIn(etype, vals.get("id"), key, {"entity": entity, "action": action, **vals}))
        return out
    # bitrix24: event=ONCRMDEALUPDATE&data[FIELDS][ID]=42&ts=...&auth[...]=...
    event = fields.get("event")
    if not event:
        raise WebhookError(422, "no 'event' in the Bitrix24 body")
    entity = fields.get("data[FIELDS][ID]")
    payload = {k: v for k, v in fields.items() if not k.startswith("auth[")}
    key = _body_hash(f"{event}:{entity}:{fields.get('ts', '')}".encode())
    return [CrmEventIn(event.lower(), entity, key, payload)]
