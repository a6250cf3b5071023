"""What a campaign's short links were clicked: raw requests, human clicks, unique clickers.

A request is a person's click when it is not a bot by request (``clicks.bot_reason`` NULL: not a HEAD,
not a known crawler or link-preview agent, not after expiry; see smsflow/links.py) and it did not come
within ``PREVIEW_WINDOW_S`` of the message's delivery (phones and messengers fetch a link to draw its
preview the moment the message arrives; the delivery receipt may be stored later than the click, so
this is decided here, when counting, not when the click is stored).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, text

from smsflow.links import PREVIEW_WINDOW_S

_CLICKS = text(
    "SELECT l.contact_id, c.at, c.bot_reason, o.final_at, o.state FROM clicks c "
    "JOIN short_links l ON l.code = c.code LEFT JOIN outbox o ON o.idempotency_key = l.outbox_key "
    "WHERE l.campaign_id = :c").columns(at=DateTime, final_at=DateTime)


def is_human(bot_reason: str | None, at: datetime, final_at: datetime | None, state: str | None) -> bool:
    """A person's click: not a bot by request, and not within the preview window of the message's
    delivery (``final_at`` is the delivery time only when ``state`` is 'delivered')."""
    if bot_reason is not None:
        return False
    return state != "delivered" or final_at is None or abs((at - final_at).total_seconds()) > PREVIEW_WINDOW_S


def click_counts(engine, campaign_id: int) -> dict[str, Any]:
    """``clicks_total`` (every request to the campaign's links), ``clicks_human``, ``unique_clickers``
    (contacts with a human click), ``clicks_preview`` (bot-free requests within the preview window)."""
    total = human = preview = 0
    clickers: set[int] = set()
    with engine.connect() as conn:
        for contact_id, at, bot, final_at, state in conn.execute(_CLICKS, {"c": campaign_id}):
            total += 1
            if is_human(bot, at, final_at, state):
                human += 1
                if contact_id is not None:
                    clickers.add(int(contact_id))
            elif bot is None:
                preview += 1
    return {"clicks_total": total, "clicks_human": human, "unique_clickers": len(clickers),
            "clicks_preview": preview}
