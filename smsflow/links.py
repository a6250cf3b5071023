"""Tracked short links (leaf: no store, no Prefect).

A template writes ``{{ link("https://shop.example/sale?x=1") }}``; each recipient gets
``<base>/<code>``: 7 characters drawn with ``secrets`` from an alphabet without look-alikes
(no 0/O/o, 1/l/I/i), never derived from personal data. The code is drawn at render time, so the
segment count and cost a preview shows include the link exactly; a code that is already taken is
replaced by another of the same length and alphabet before the message is stored (same parts).

Clicks: a HEAD request, a known crawler or link-preview user agent (the kept ``crawlerdetect``
list: TelegramBot, WhatsApp, facebookexternalhit, Twitterbot, Slackbot, YandexBot, ...) or a click
within ``PREVIEW_WINDOW_S`` of delivery is counted raw but not human. IPs are stored as a keyed
hash only.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ALPHABET = "23456789abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_LEN = 7
CODE_RE = re.compile(f"[{ALPHABET}]{{{CODE_LEN}}}")
PREVIEW_WINDOW_S = 2.0  # a "click" this soon after delivery is a phone drawing a preview
DEFAULT_TTL_DAYS = 90


class LinkError(ValueError):
    pass


def new_code() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(CODE_LEN))


def is_code(value: str) -> bool:
    return bool(CODE_RE.fullmatch(value))


def short_url(base: str, code: str) -> str:
    return f"{base.rstrip('/')}/{code}"


def check_base(base: str | None) -> str:
    """The operator's short-link base URL (``https://s.example.ru``), checked."""
    if not base:
        raise LinkError("the template uses link() but no short-link base URL is set "
                        "(SMSFLOW_LINK_BASE_URL, e.g. https://s.example.ru)")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise LinkError(f"short-link base URL must be http(s)://host[/path] without query: {base!r}")
    return base.rstrip("/")


def target_url(url, utm: dict[str, str] | None = None) -> str:
    """The link's target, checked, with the campaign's UTM parameters (ones the URL has are kept)."""
    if not isinstance(url, str) or not url.strip():
        raise LinkError(f"link() needs a URL, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LinkError(f"link() needs an http(s) URL, got {url!r}")
    if not utm:
        return urlunsplit(parts)
    query = parse_qsl(parts.query, keep_blank_values=True)
    have = {k for k, _ in query}
    query += [(k, str(v)) for k, v in utm.items() if k not in have]
    return urlunsplit(parts._replace(query=urlencode(query)))


def ip_hash(ip: str, key: bytes) -> str:
    """A keyed hash of the client IP (unique visitors without storing the address)."""
    return hmac.new(key, ip.encode(), hashlib.sha256).hexdigest()[:32]


_CRAWLERS = None


def bot_reason(method: str, user_agent: str | None) -> str | None:
    """Why a request is not a person's click (``head``, ``crawler``, ``no_user_agent``), or None."""
    global _CRAWLERS
    if method.upper() == "HEAD":
        return "head"
    if not user_agent or not user_agent.strip():
        return "no_user_agent"
    if _CRAWLERS is None:
        from crawlerdetect import CrawlerDetect

        _CRAWLERS = CrawlerDetect()
    return "crawler" if _CRAWLERS.isCrawler(user_agent) else None


def click_ip_key(configured: str | None, data_dir) -> bytes:
    """The key of the IP hash: SMSFLOW_CLICK_IP_KEY, else a random key kept in ``data_dir/click-ip.key``
    (made on first use, readable by the owner only): unique visitors stay countable across restarts."""
    import os
    from pathlib import Path

    if configured:
        return configured.encode()
    path = Path(data_dir) / "click-ip.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
