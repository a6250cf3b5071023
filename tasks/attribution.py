"""What each campaign earned: orders credited to the message that touched the buyer last, and replies.

Attribution (documented defaults, settings ``SMSFLOW_ATTRIBUTION_DELIVERY_DAYS`` and
``SMSFLOW_ATTRIBUTION_CLICK_DAYS``, 7 and 7; a campaign may set its own, ``CampaignParams``
``attribution_delivery_days`` / ``attribution_click_days``):

* a *touch* is a delivered message (at its delivery) or a person's click on its short link (at the
  click; tasks/clicks.py says what counts as a person);
* an order that counts as a sale (tasks/orders.py) is credited to the LAST touch of the buyer's phone
  before it, if that touch is within the window of its kind; to nothing otherwise;
* so an order counts once, for one message of one campaign: the campaigns' attributed revenue never sums
  above the CRM's revenue. A refunded or cancelled order re-read from the CRM stops counting.

Replies: an inbound reply (not STOP/START/HELP) is credited to the last message submitted to that phone
before it, within the delivery window; time to reply is from that submission.
"""
from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import text

from store.db import read_frame
from tasks.clicks import is_human

TOUCH_COLUMNS = ["key", "campaign_id", "segment", "phone", "at"]


def _frame(conn, sql: str, params: dict | None = None) -> pd.DataFrame:
    return read_frame(conn, sql, params or {})


def _times(df: pd.DataFrame, *cols: str) -> pd.DataFrame:
    for c in cols:
        df[c] = pd.to_datetime(df[c], format="mixed").astype("datetime64[us]")
    return df


def touches(engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(deliveries, human clicks) as TOUCH_COLUMNS frames."""
    with engine.connect() as conn:
        delivered = _frame(conn, "SELECT idempotency_key AS key, campaign_id, segment, phone_e164 AS phone, "
                                 "final_at AS at FROM outbox WHERE state = 'delivered' AND final_at IS NOT NULL "
                                 "AND phone_e164 IS NOT NULL")
        clicks = _frame(conn, "SELECT o.idempotency_key AS key, o.campaign_id, o.segment, o.phone_e164 AS phone, "
                              "c.at, c.bot_reason, o.final_at, o.state FROM clicks c "
                              "JOIN short_links l ON l.code = c.code JOIN outbox o ON o.idempotency_key = l.outbox_key "
                              "WHERE c.bot_reason IS NULL AND o.phone_e164 IS NOT NULL")
    delivered = _times(delivered, "at")
    if len(clicks):
        clicks = _times(clicks, "at", "final_at")
        human = [is_human(b, a, f, s)
                 for b, a, f, s in zip(clicks["bot_reason"], clicks["at"].dt.to_pydatetime(),
                                       clicks["final_at"].dt.to_pydatetime(), clicks["state"])]
        clicks = clicks[human]
    return delivered[TOUCH_COLUMNS], clicks[TOUCH_COLUMNS] if len(clicks) else clicks.reindex(columns=TOUCH_COLUMNS)


def _last_touch(events: pd.DataFrame, touch: pd.DataFrame, days: float, time_col: str) -> pd.DataFrame:
    """For every event, the last touch of its phone at or before it within ``days`` (NaN when none)."""
    if touch.empty or events.empty:
        return events.assign(**{c: pd.NA for c in ("key", "campaign_id", "segment")}, touch_at=pd.NaT)
    t = touch.rename(columns={"at": "touch_at"}).sort_values("touch_at")
    e = events.sort_values(time_col)
    return pd.merge_asof(e, t, left_on=time_col, right_on="touch_at", by="phone", direction="backward",
                         tolerance=pd.Timedelta(days=days))


def campaign_windows(engine, delivery_days: float, click_days: float) -> dict[int, tuple[float, float]]:
    """Each campaign's (delivery, click) attribution windows in days: its own (``CampaignParams``
    attribution_delivery_days / attribution_click_days, kept in campaigns.params) or the defaults."""
    import json

    out = {}
    with engine.connect() as conn:
        for cid, params in conn.execute(text("SELECT id, params FROM campaigns")):
            p = (params if isinstance(params, dict) else json.loads(params or "{}")) or {}
            a = p.get("attribution") or {}
            out[int(cid)] = (float(a.get("delivery_days") or delivery_days), float(a.get("click_days") or click_days))
    return out


def _within(matched: pd.DataFrame, windows: dict[int, tuple[float, float]], which: int, default: float) -> pd.DataFrame:
    """Matches older than their campaign's window credit nothing (the last touch decides, as ever)."""
    if matched.empty or "touch_at" not in matched:
        return matched
    limit = matched["campaign_id"].map(lambda c: windows.get(int(c), (default, default))[which] if pd.notna(c)
                                       else default).astype(float)
    late = (matched["ordered_at"] - matched["touch_at"]) > pd.to_timedelta(limit, unit="D")
    for c in ("key", "campaign_id", "segment"):
        matched[c] = matched[c].where(~late)
    matched["touch_at"] = matched["touch_at"].where(~late)
    return matched


def attributed_orders(engine, delivery_days: float | None = None, click_days: float | None = None) -> pd.DataFrame:
    """Every revenue order of a known phone with ``campaign_id, segment, key`` of the message it is
    credited to (NaN: none) and ``amount``. Windows: each campaign's own, else the arguments, else the
    settings."""
    from smsflow.settings import get_settings

    s = get_settings()
    delivery_days = s.attribution_delivery_days if delivery_days is None else delivery_days
    click_days = s.attribution_click_days if click_days is None else click_days
    windows = campaign_windows(engine, delivery_days, click_days)
    with engine.connect() as conn:
        orders = _frame(conn, "SELECT o.id AS order_id, o.amount, o.currency, o.ordered_at, c.phone_e164 AS phone "
                              "FROM orders o JOIN contacts c ON c.id = o.contact_id WHERE o.revenue AND "
                              "c.phone_e164 IS NOT NULL")
    orders = _times(orders, "ordered_at")
    delivered, clicked = touches(engine)
    longest_d = max([delivery_days, *(w[0] for w in windows.values())])
    longest_c = max([click_days, *(w[1] for w in windows.values())])
    by_delivery = _within(_last_touch(orders, delivered, longest_d, "ordered_at"), windows, 0,
                          delivery_days).set_index("order_id")
    by_click = _within(_last_touch(orders, clicked, longest_c, "ordered_at"), windows, 1,
                       click_days).set_index("order_id")
    by_click = by_click.reindex(by_delivery.index)
    use_click = by_click["touch_at"].notna() & (by_delivery["touch_at"].isna() |
                                                (by_click["touch_at"] > by_delivery["touch_at"]))
    out = by_delivery.copy()
    for c in ("key", "campaign_id", "segment", "touch_at"):
        out[c] = by_click[c].where(use_click, by_delivery[c])
    out["via"] = pd.Series("delivery", index=out.index).where(~use_click, "click").where(out["touch_at"].notna())
    return out.reset_index()


def attributed_replies(engine, days: float | None = None) -> pd.DataFrame:
    """Replies with the message (``campaign_id, segment, key``) they answer and ``seconds`` to reply."""
    from smsflow.settings import get_settings

    days = get_settings().attribution_delivery_days if days is None else days
    with engine.connect() as conn:
        replies = _frame(conn, "SELECT id AS reply_id, from_e164 AS phone, received_at FROM inbound_messages "
                               "WHERE kind = 'reply' AND from_e164 IS NOT NULL")
        sent = _frame(conn, "SELECT idempotency_key AS key, campaign_id, segment, phone_e164 AS phone, "
                            "submitted_at AS at FROM outbox WHERE submitted_at IS NOT NULL AND phone_e164 IS NOT NULL")
    replies, sent = _times(replies, "received_at"), _times(sent, "at")
    out = _last_touch(replies, sent, days, "received_at")
    out["seconds"] = (out["received_at"] - out["touch_at"]).dt.total_seconds()
    return out


def campaign_earnings(engine, campaign_id: int | None = None) -> dict[int, dict[str, Any]]:
    """Per campaign: conversions, revenue, replies, median seconds to reply; per (campaign, segment) too
    under ``segments``."""
    orders = attributed_orders(engine)
    replies = attributed_replies(engine)
    out: dict[int, dict[str, Any]] = {}

    def slot(cid, seg):
        c = out.setdefault(int(cid), {"conversions": 0, "revenue": 0.0, "replies": 0, "reply_seconds": [],
                                      "segments": {}})
        return c, c["segments"].setdefault(seg, {"conversions": 0, "revenue": 0.0, "replies": 0})

    def count(frame: pd.DataFrame, value: str, counter: str, total: str | None) -> None:
        for cid, seg, v in zip(frame["campaign_id"], frame["segment"], frame[value]):
            if pd.isna(cid):
                continue
            for d in slot(cid, seg):
                d[counter] += 1
                if total:
                    d[total] += float(v)
            if counter == "replies":
                out[int(cid)]["reply_seconds"].append(float(v))

    count(orders, "amount", "conversions", "revenue")
    count(replies, "seconds", "replies", None)
    for c in out.values():
        secs = sorted(c.pop("reply_seconds"))
        c["median_reply_s"] = float(pd.Series(secs).median()) if secs else None
        c["revenue"] = round(c["revenue"], 2)
        for sg in c["segments"].values():
            sg["revenue"] = round(sg["revenue"], 2)
    if campaign_id is not None:
        return {campaign_id: out.get(campaign_id, {"conversions": 0, "revenue": 0.0, "replies": 0,
                                                   "median_reply_s": None, "segments": {}})}
    return out


def crm_revenue(engine) -> float:
    with engine.connect() as conn:
        return float(conn.execute(text("SELECT COALESCE(SUM(amount), 0) FROM orders WHERE revenue")).scalar())
