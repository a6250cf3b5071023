"""Masking for logs: no full phone number and no secret ever reaches a log line."""
from __future__ import annotations

import re
from smsflow.settings import get_settings

_PHONE_RE = re.compile(r"\+?\d[\d\s().-]{7,}\d")


def mask_phone(phone: str | None) -> str:
    """+79161234567 -> +7916***4567."""
    if not phone:
        return ""
    p = str(phone)
    if len(p) <= 8:
        return p[:2] + "***"
    return f"{p[:5]}***{p[-4:]}"


def mask_phones_in(text: str) -> str:
    """Mask anything that looks like a phone number inside free text (error messages)."""
    return _PHONE_RE.sub(lambda m: mask_phone(re.sub(r"[^\d+]", "", m.group(0))), text)


_SALTS: dict[str, bytes] = {}


def _salt() -> bytes:
    """Secret salt (pepper) for the suppression list: SMSFLOW_SUPPRESSION_SALT, else a random one
    kept in the data dir (created once, mode 600). Keep it outside the database in production."""
    import os
    import secrets

    env = os.environ.get("SMSFLOW_SUPPRESSION_SALT")
    if env:
        return env.encode()

    path = get_settings().data_dir / ".suppression_salt"
    cached = _SALTS.get(str(path))
    if cached is not None:
        return cached
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    _SALTS[str(path)] = path.read_text().strip().encode()
    return _SALTS[str(path)]


def phone_hash(e164: str) -> str:
    """Salted SHA-256 of an E.164 number (what the suppression list keeps instead of the number)."""
    import hashlib
    import hmac

    return hmac.new(_salt(), e164.encode(), hashlib.sha256).hexdigest()
