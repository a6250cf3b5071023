"""Flow: planned messages -> the gateway, throttled, at most once per idempotency key."""
from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from blocks.registry import load_gateway
from store.db import get_engine, utcnow
from store.outbox import unsent_count
from tasks.send import CLAIM_LEASE_S, SendStats, campaigns_to_send, next_takeover, send_task

SEND_CHUNK = 100_000  # messages per task run: task runs grow with volume / SEND_CHUNK, never per message


def _send_campaign(cid: int, name: str, gw, rate: float | None, database_url: str | None, now: datetime | None) -> SendStats:
    engine = get_engine(database_url)
    todo = unsent_count(engine, cid)
    progress = create_progress_artifact(0.0, description=f"send {name}: {todo} to go")
    total = SendStats()
    waited = 0.0
    while True:
        s = send_task(int(cid), gw, rate or gw.rate_per_second, SEND_CHUNK, database_url, now)
        for f in ("claimed", "submitted", "rejected", "policy_blocked", "retry_later", "failed",
                  "recovered_submitted", "recovered_replanned"):
            setattr(total, f, getattr(total, f) + getattr(s, f))
        for attr in ("errors", "held"):
            for k, v in getattr(s, attr).items():
                getattr(total, attr)[k] = getattr(total, attr).get(k, 0) + v
        done = total.submitted + total.rejected + total.policy_blocked + total.failed
        update_progress_artifact(progress, min(100.0, 100.0 * done / max(1, todo)), description=f"{done} of {todo} handled")
        if s.claimed == 0 or (s.submitted == 0 and s.retry_later and s.rejected == 0):
            # messages a crashed run left in flight: wait for their claims to lapse (and, without an
            # authoritative lookup, for late receipts) when that is soon, then settle and send them
            at, n = next_takeover(engine, cid, gw)
            wait = max(0.0, (at - utcnow()).total_seconds()) if at is not None else None
            if s.claimed == 0 and wait is not None and waited + wait <= CLAIM_LEASE_S + gw.evidence_grace_s:
                get_run_logger().info("send %s: %d message(s) left in flight by an earlier run; settling them in %.0fs",
                                      name, n, wait)
                time.sleep(wait + 0.5)
                waited += wait + 0.5
                continue
            break
    update_progress_artifact(progress, 100.0, description=f"{total.submitted} submitted")
    get_run_logger().info("send %s via %s: %d submitted, %d rejected, %d held/deferred by policy %s, %d to retry",
                          name, gw.gateway_name, total.submitted, total.rejected, total.policy_blocked, total.held,
                          total.retry_later)
    return total


@flow(name="send")
def send(campaign: str | None = None, gateway_block: str = "sandbox", rate: float | None = None,
         database_url: str | None = None, now: datetime | None = None) -> dict:
    """Send a campaign's planned messages (rerunning resumes and never submits a message twice).
    Without a campaign: every campaign with messages due now (deferred ones whose window opened,
    auto-replies), each through its own gateway Block."""
    clock = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(tzinfo=None)
    rows = campaigns_to_send(get_engine(database_url), campaign, clock)
    results = {}
    for cid, name, gw_name in rows:
        gw = load_gateway(gateway_block if campaign is not None else (gw_name or gateway_block))
        results[name] = vars(_send_campaign(int(cid), name, gw, rate, database_url, now))
    if campaign is not None:
        return {"campaign": campaign, **results[campaign]}
    return {"campaigns": results}


if __name__ == "__main__":
    import sys

    send(sys.argv[1])
