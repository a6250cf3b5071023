"""Short links and clicks in the store (``smsflow/links.py`` makes the codes and classifies requests)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Text, text

from store.db import bulk_insert

CLICK_FIELDS = ("code", "at", "method", "user_agent", "ip_hash", "bot_reason")


def find_link(engine, code: str) -> tuple[str, datetime, int] | None:
    """``(target, expires_at, campaign_id)`` of a short link, or None."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT target, expires_at, campaign_id FROM short_links WHERE code = :c")
                           .columns(target=Text, expires_at=DateTime, campaign_id=BigInteger), {"c": code}).first()
    return (row[0], row[1], int(row[2])) if row else None


def store_clicks(engine, clicks: list[tuple[Any, ...]]) -> None:
    """Clicks as ``CLICK_FIELDS`` tuples, in one transaction."""
    with engine.begin() as conn:
        bulk_insert(conn, "clicks", CLICK_FIELDS, clicks)
