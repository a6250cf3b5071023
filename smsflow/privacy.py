"""Masking for logs: no full phone number and no secret ever reaches a log line."""
from __future__ import annotations

import re

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
