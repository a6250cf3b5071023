"""Flow: planned messages -> the gateway, throttled, at most once per idempotency key."""
from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from sqlalchemy import text

from blocks.registry import load_gateway
from store.db import get_engine
from tasks.send import SendStats, send_task

SEND_CHUNK = 50_000  # messages per task run: task runs grow with volume / SEND_CHUNK, never per message


def ensure_gateway_limit(gateway_name: str) -> str:
    """One sender at a time per gateway (the provider's rate limit is shared by all campaigns):
    a Prefect global concurrency limit ``gateway-<name>``, created with limit 1 if missing."""
    from prefect.client.orchestration import get_client

    name = f"gateway-{gateway_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except Exception:  # noqa: BLE001 - ObjectNotFound: create it
            client.upsert_global_concurrency_limit_by_name(name, 1)
    return name


@flow(name="send")
def send(campaign: str, gateway_block: str = "sandbox", rate: float | None = None, database_url: str | None = None,
         now: datetime | None = None) -> dict:
    """Send a campaign's planned messages; rerunning resumes and never submits a message twice."""
    gw = load_gateway(gateway_block)
    engine = get_engine(database_url)
    with engine.begin() as conn:
        cid = conn.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": campaign}).scalar()
    if cid is None:
        raise ValueError(f"no campaign named '{campaign}': render it first")
    ensure_gateway_limit(gw.gateway_name)
    with engine.begin() as conn:
        todo = conn.execute(text("SELECT COUNT(*) FROM outbox WHERE campaign_id = :c AND state IN ('planned', 'queued')"),
                            {"c": cid}).scalar() or 0
    progress = create_progress_artifact(0.0, description=f"send {campaign}: {todo} to go")
    total = SendStats()
    while True:
        s = send_task(int(cid), gw, rate or gw.rate_per_second, SEND_CHUNK, database_url, now)
        for f in ("claimed", "submitted", "rejected", "policy_blocked", "retry_later", "failed",
                  "recovered_submitted", "recovered_replanned"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        for k, v in s.errors.items():
            total.errors[k] = total.errors.get(k, 0) + v
        for k, v in s.held.items():
            total.held[k] = total.held.get(k, 0) + v
        done = total.submitted + total.rejected + total.policy_blocked + total.failed
        update_progress_artifact(progress, min(100.0, 100.0 * done / max(1, todo)), description=f"{done} of {todo} sent")
        if s.claimed == 0 or (s.submitted == 0 and s.retry_later and s.rejected == 0):
            break
    update_progress_artifact(progress, 100.0, description=f"{total.submitted} submitted")
    get_run_logger().info("send %s via %s: %d submitted, %d rejected, %d held/deferred by policy %s, %d to retry",
                          campaign, gw.gateway_name, total.submitted, total.rejected, total.policy_blocked, total.held,
                          total.retry_later)
    return {"campaign": campaign, **{k: v for k, v in vars(total).items()}}


if __name__ == "__main__":
    import sys

    send(sys.argv[1])
