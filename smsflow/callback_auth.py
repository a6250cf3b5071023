"""Per-gateway secrets for callbacks that a gateway pushes to us (Kannel's dlr-url and get-url).

Kannel cannot sign its requests, so the secret travels in the URL it calls (``key=...``):
configure it as ``SMSFLOW_CALLBACK_SECRET_<GATEWAY>`` (gateway Block name upper-cased, '-' ->
'_'), e.g. ``SMSFLOW_CALLBACK_SECRET_KANNEL_MAIN=new-secret,old-secret``. Every listed value is
accepted (compared in constant time), so a secret is rotated without downtime: add the new one
first, switch the gateway (its Block's ``callback_secret`` or the first value here), then drop the
old one. With none configured the service refuses the gateway's callbacks (fail closed).
"""
from __future__ import annotations

import hmac
import os
import re


def env_name(gateway: str) -> str:
    return "SMSFLOW_CALLBACK_SECRET_" + re.sub(r"[^A-Z0-9]", "_", gateway.upper())


def accepted_secrets(gateway: str) -> list[str]:
    return [s.strip() for s in os.environ.get(env_name(gateway), "").split(",") if s.strip()]


def current_secret(gateway: str) -> str | None:
    """The secret a gateway puts into the URLs it gives out: the first configured value."""
    found = accepted_secrets(gateway)
    return found[0] if found else None


class CallbackRefused(Exception):
    pass


def check(gateway: str, presented: str | None) -> None:
    """Raise ``CallbackRefused`` unless ``presented`` is one of the gateway's secrets."""
    secrets = accepted_secrets(gateway)
    if not secrets:
        raise CallbackRefused(f"no callback secret configured for gateway '{gateway}' ({env_name(gateway)})")
    given = (presented or "").encode()
    ok = False
    for s in secrets:  # no early exit: the time taken does not tell which one matched
        ok |= hmac.compare_digest(given, s.encode())
    if not ok:
        raise CallbackRefused(f"missing or wrong callback key for gateway '{gateway}'")
