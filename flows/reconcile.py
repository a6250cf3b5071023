"""Flow: receipts -> final outbox states; messages without a final receipt after the TTL expire."""
from __future__ import annotations

from prefect import flow, get_run_logger
from sqlalchemy import text

from blocks.registry import load_gateway
from smsflow.settings import get_settings
from store.db import get_engine
from tasks.reconcile import reconcile_task
from tasks.inbound import store_and_apply
from tasks.validate import normalize_phones


def store_inbound(gw, database_url: str | None) -> int:
    """Replies pulled from a gateway (SMPP deliver_sm MO) go through the same keyword handling as the service's."""
    import pandas as pd


    msgs = gw.fetch_inbound()
    if not msgs:
        return 0
    phones = normalize_phones(pd.Series([m.get("from") for m in msgs]))["phone_e164"]
    with get_engine(database_url).begin() as conn:
        for m, e164 in zip(msgs, phones):
            store_and_apply(conn, gateway=gw.gateway_name, gateway_message_id=m.get("gateway_message_id"),
                            from_e164=e164 or m.get("from"), to=m.get("to"), body=m.get("text"), raw={"to": m.get("to")})
    return len(msgs)


@flow(name="reconcile")
def reconcile(gateway_block: str | None = "sandbox", campaign: str | None = None, wait_seconds: float = 0.0,
              ttl_seconds: float | None = None, database_url: str | None = None) -> dict:
    """Apply receipts (pulled from the gateway and/or stored by the callback service)."""
    gw = load_gateway(gateway_block) if gateway_block else None
    cid = None
    if campaign:
        with get_engine(database_url).begin() as conn:
            cid = conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": campaign}).scalar()
    ttl = ttl_seconds if ttl_seconds is not None else get_settings().receipt_ttl_seconds
    s = reconcile_task(gw, ttl, wait_seconds, cid, database_url)
    inbound = store_inbound(gw, database_url) if gw is not None and hasattr(gw, "fetch_inbound") else 0
    get_run_logger().info("reconcile: %d receipts received, %d applied, %d ignored (stale/duplicate), %d expired, %d waiting",
                          s.received, s.applied, s.ignored, s.expired, s.pending)
    return {"inbound": inbound, "received": s.received, "applied": s.applied, "ignored": s.ignored, "expired": s.expired,
            "pending_receipts": s.pending, "by_status": s.by_status}


if __name__ == "__main__":
    reconcile()
