"""Flow: receipts -> final outbox states; messages without a final receipt after the TTL expire."""
from __future__ import annotations

from prefect import flow, get_run_logger
from sqlalchemy import text

from blocks.registry import load_gateway
from smsflow.settings import get_settings
from store.db import get_engine
from tasks.reconcile import reconcile_task


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
    get_run_logger().info("reconcile: %d receipts received, %d applied, %d ignored (stale/duplicate), %d expired, %d waiting",
                          s.received, s.applied, s.ignored, s.expired, s.pending)
    return {"received": s.received, "applied": s.applied, "ignored": s.ignored, "expired": s.expired,
            "pending_receipts": s.pending, "by_status": s.by_status}


if __name__ == "__main__":
    reconcile()
