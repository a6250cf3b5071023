"""Flow: delivery states, opt-outs and replies -> back to the CRM (notes, opt-out field)."""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retrying import retry_if_transient

from blocks.crm_writeback import CrmWriteBack
from blocks.registry import load_crm
from store.db import get_engine
from tasks.writeback import write_back


@task(name="crm-write-back", retries=2, retry_delay_seconds=30,
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def writeback_task(block, database_url: str | None):
    return write_back(get_engine(database_url), block, block.source_name)


@flow(name="crm-writeback")
def crm_writeback(source_block: str, database_url: str | None = None) -> dict:
    block = load_crm(source_block)
    if not isinstance(block, CrmWriteBack):
        raise ValueError(f"CRM source '{source_block}' ({type(block).__name__}) cannot be written back to")
    s = writeback_task(block, database_url)
    get_run_logger().info("write-back %s: %d queued, %d written, %d failed, %d pending", source_block, s.queued,
                          s.written, s.failed, s.pending)
    return vars(s)
