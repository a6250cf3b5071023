"""Flow: a template over a segment -> planned messages in the outbox (text, encoding, segments, cost)."""
from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger

from smsflow.settings import get_settings
from tasks.render import open_campaign, plan_task, render_extra
from tasks.policy import ContactPolicy
from store.db import get_engine


@flow(name="render")
def render(campaign: str, template: str, source: str = "demo-crm", segment: str = "all",
           price_per_segment: float = 0.0, gateway: str | None = None, database_url: str | None = None,
           policy: ContactPolicy | None = None, ends_at: datetime | None = None, sender_name: str | None = None,
           currency: str = "RUB") -> dict:
    """Render the campaign's messages; contacts already in the outbox are skipped (idempotent)."""
    s = get_settings()
    cid, tpl = open_campaign(get_engine(database_url), name=campaign, template=template, source=source, segment=segment,
                             price_per_segment=price_per_segment, gateway=gateway, policy=policy, ends_at=ends_at,
                             sender_name=sender_name, currency=currency)
    stats = plan_task(cid, source, segment, tpl, price_per_segment, gateway, s.batch_size, s.workers, database_url,
                      render_extra(campaign))
    get_run_logger().info("render %s: %d planned, %d no consent, %d failed to render, %d parts, planned cost %.2f %s",
                          campaign, stats.planned, stats.no_consent, stats.render_failed, stats.segments, stats.cost,
                          currency)
    return {"campaign": campaign, "campaign_id": cid, **stats.result(currency)}


if __name__ == "__main__":
    import sys

    render(sys.argv[1], sys.argv[2])
