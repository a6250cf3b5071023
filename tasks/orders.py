"""CRM orders/deals -> the store, incrementally by the source's ``updated_at`` watermark.

Each order is upserted by ``(source, crm order id)``: re-reading an order after a refund or a
cancellation (its status changed, so its ``updated_at`` moved) turns its revenue off, which takes it out
of every campaign's conversions. A row without a usable id, amount or date is quarantined with the reason
(step ``orders``), never dropped silently. Orders are linked to our contact by the CRM's contact id.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import text

from blocks.crm import CrmSource, CrmSourceError
from store.db import bulk_insert, utcnow
from store.quarantine import write_quarantine
from tasks.extract import get_watermark, set_watermark

log = logging.getLogger("smsflow.orders")

# statuses that are a sale (lower case; amoCRM "won", Bitrix24 "WON", HubSpot "closedwon" included);
# anything else (new, cancelled, returned, refunded, lost) is not revenue
REVENUE_STATUSES = frozenset({"paid", "shipped", "delivered", "completed", "won", "closedwon", "success"})
REQUIRED = ("order_id", "contact_id", "amount", "status", "ordered_at", "updated_at")
ORDER_FIELDS = ("source", "crm_order_id", "crm_contact_id", "contact_id", "amount", "currency", "status", "revenue",
                "ordered_at", "stored_at")


@dataclass
class OrdersResult:
    rows: int = 0
    stored: int = 0
    quarantined: int = 0
    watermark: str | None = None


def _utc_naive(s: pd.Series) -> pd.Series:
    t = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    return t.dt.tz_localize(None)


def extract_orders(engine, crm: CrmSource, full_refresh: bool = False, batch_size: int = 50_000) -> OrdersResult:
    """Read the source's orders changed since the watermark into ``orders``; None-safe for sources
    without orders (nothing happens)."""
    key = f"{crm.source_name}#orders"
    with engine.begin() as conn:
        since = None if full_refresh else get_watermark(conn, key)
    batches = crm.fetch_orders(since, batch_size)
    res = OrdersResult(watermark=since)
    if batches is None:
        return res
    for df in batches:
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise CrmSourceError(f"orders of '{crm.source_name}' lack the column(s) {', '.join(missing)} "
                                 f"(need {', '.join(REQUIRED)})")
        res.rows += len(df)
        amount = pd.to_numeric(df["amount"], errors="coerce")
        ordered = _utc_naive(df["ordered_at"])
        oid = df["order_id"].astype("string").str.strip()
        bad = amount.isna() | ordered.isna() | oid.isna() | (oid == "") | (amount < 0)
        quarantine = [
            dict(step="orders", source=crm.source_name, row_key=str(r.order_id), reason_code="bad_order",
                 reason="order without " + ", ".join(n for n, b in (("an id", pd.isna(i) or i == ""),
                                                                    ("a valid amount", pd.isna(a) or a < 0),
                                                                    ("a date", pd.isna(t))) if b),
                 payload={"order_id": str(r.order_id), "contact_id": str(r.contact_id)})
            for r, i, a, t in zip(df[bad.to_numpy()].itertuples(), oid[bad], amount[bad], ordered[bad])
        ]
        ok = ~bad
        status = df.loc[ok, "status"].astype("string").str.strip().str.lower().fillna("")
        currency = (df.loc[ok, "currency"].astype("string").str.upper().fillna("RUB") if "currency" in df.columns
                    else pd.Series("RUB", index=status.index))
        now = utcnow()
        rows = list(zip([crm.source_name] * int(ok.sum()), oid[ok].tolist(),
                        df.loc[ok, "contact_id"].astype("string").tolist(), [None] * int(ok.sum()),
                        amount[ok].astype(float).tolist(), currency.tolist(), status.tolist(),
                        status.isin(REVENUE_STATUSES).tolist(), [t.to_pydatetime() for t in ordered[ok]],
                        [now] * int(ok.sum())))
        upd = _utc_naive(df["updated_at"])
        mark = df["updated_at"][upd.idxmax()] if upd.notna().any() else None
        with engine.begin() as conn:
            bulk_insert(conn, "orders", ORDER_FIELDS, rows, on_conflict="update",
                        conflict_columns=("source", "crm_order_id"),
                        update_columns=("crm_contact_id", "amount", "currency", "status", "revenue", "ordered_at",
                                        "stored_at"))
            write_quarantine(conn, quarantine)
            _link_contacts(conn, crm.source_name)
            if mark is not None and crm.ordered_by_updated_at:
                set_watermark(conn, key, str(mark), res.rows)
                res.watermark = str(mark)
        res.stored += len(rows)
        res.quarantined += len(quarantine)
    return res


def _link_contacts(conn, source: str) -> None:
    """Orders whose contact is known by now get its id (orders may arrive before their contact)."""
    conn.execute(text(
        "UPDATE orders SET contact_id = (SELECT MIN(c.id) FROM contacts c WHERE c.source = orders.source AND "
        "c.crm_id = orders.crm_contact_id) WHERE contact_id IS NULL AND source = :s"), {"s": source})


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="extract-orders", cache_policy=NO_CACHE)
def orders_task(crm: CrmSource, full_refresh: bool, database_url: str | None) -> OrdersResult:
    """The source's orders/deals since their watermark (the REST callers retry what can heal themselves)."""
    from store.db import get_engine

    return extract_orders(get_engine(database_url), crm, full_refresh)
