"""Flow: CRM -> contacts in the store, incremental by the updated-at watermark."""
from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.registry import load_crm
from smsflow.settings import get_settings
from tasks.extract import extract_task
from tasks.orders import orders_task


@flow(name="crm-extract", log_prints=False)
def crm_extract(source_block: str = "demo-crm", full_refresh: bool = False, database_url: str | None = None) -> dict:
    """Pull new and changed CRM rows (since the watermark) into the store, each contact written once
    with its phone verdict; validate-and-dedup then reports the checks and merges duplicates."""
    source = load_crm(source_block)
    stats = extract_task(source, full_refresh, get_settings().batch_size, database_url)
    get_run_logger().info("extract %s: %d rows, %d validated on the way in, %d quarantined, %d repeated CRM ids, "
                          "watermark %s", source.source_name, stats.rows, stats.validated, stats.quarantined,
                          stats.duplicate_ids, stats.watermark)
    out = {"source": source.source_name, "rows": stats.rows, "validated": stats.validated,
           "quarantined": stats.quarantined, "duplicate_ids": stats.duplicate_ids, "watermark": stats.watermark}
    if source.has_orders:  # conversions and revenue (tasks/attribution.py) come from the same CRM
        o = orders_task(source, full_refresh, database_url)
        get_run_logger().info("orders %s: %d rows, %d stored, %d quarantined", source.source_name, o.rows, o.stored,
                              o.quarantined)
        out["orders"] = {"rows": o.rows, "stored": o.stored, "quarantined": o.quarantined}
    return out


if __name__ == "__main__":
    crm_extract()
