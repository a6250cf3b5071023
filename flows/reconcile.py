"""Flow: receipts -> final outbox states; messages without a final receipt after the TTL expire."""
from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.registry import load_gateway
from smsflow.settings import get_settings
from store.db import get_engine
from tasks.accounting import campaign_id
from tasks.inbound import store_pulled_replies
from tasks.reconcile import reconcile_task


@flow(name="reconcile")
def reconcile(gateway_block: str | None = "sandbox", campaign: str | None = None, wait_seconds: float = 0.0,
              ttl_seconds: float | None = None, database_url: str | None = None) -> dict:
    """Apply receipts (pulled from the gateway and/or stored by the callback service)."""
    gw = load_gateway(gateway_block) if gateway_block else None
    cid = campaign_id(get_engine(database_url), campaign) if campaign else None
    ttl = ttl_seconds if ttl_seconds is not None else get_settings().receipt_ttl_seconds
    s = reconcile_task(gw, ttl, wait_seconds, cid, database_url)
    inbound = store_pulled_replies(get_engine(database_url), gw) if gw is not None and hasattr(gw, "fetch_inbound") else 0
    get_run_logger().info("reconcile: %d receipts received, %d applied, %d ignored (stale/duplicate), %d expired, %d waiting",
                          s.received, s.applied, s.ignored, s.expired, s.pending)
    return {"inbound": inbound, "received": s.received, "applied": s.applied, "ignored": s.ignored, "expired": s.expired,
            "pending_receipts": s.pending, "by_status": s.by_status}


if __name__ == "__main__":
    reconcile()
