"""Flows of distributed mode: a campaign rendered in shards and sent by senders, each a deployment run.

``render-sharded`` (the parent, called by the campaign flow when SMSFLOW_MODE=distributed) cuts the
campaign into contact-id shards and starts one ``render-shard`` deployment run per shard; any worker of
the pool takes it, and its render runs on Dask when SMSFLOW_DASK_ADDRESS is set. ``send-sharded`` starts
one ``send`` deployment run per gateway bind. tasks/shards.py says why no shard runs twice.
"""
from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger

from blocks.registry import load_gateway
from smsflow.settings import get_settings
from store.db import get_engine
from tasks.policy import ContactPolicy
from tasks.render import campaign_template, open_campaign, render_extra
from tasks.shards import (RENDER, SEND, dispatch, plan_render_shards, plan_send_shards, render_shard_task,
                          shard_task_runner, shards_stats)

RENDER_SHARD_DEPLOYMENT = "render-shard/render-shard"
SEND_DEPLOYMENT = "send/send-planned-now"


@flow(name="render-shard", task_runner=shard_task_runner())
def render_shard(campaign_id: int, shard: int, template: str, sender_name: str | None = None,
                 campaign: str | None = None) -> dict:
    """Render one shard of a campaign into the outbox (done once, whatever reruns it)."""
    tpl = campaign_template(template, sender_name)
    result = render_shard_task.submit(campaign_id, shard, tpl, render_extra(campaign)).result()
    get_run_logger().info("campaign %s shard %d: %s", campaign or campaign_id, shard, result)
    return result


@flow(name="render-sharded")
def render_sharded(campaign: str, template: str, source: str = "demo-crm", segment: str = "all",
                   price_per_segment: float = 0.0, gateway: str | None = None, policy: ContactPolicy | None = None,
                   ends_at: datetime | None = None, sender_name: str | None = None, currency: str = "RUB") -> dict:
    """The render flow's result, with the work done by render-shard deployment runs."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    engine = get_engine()
    cid, tpl = open_campaign(engine, name=campaign, template=template, source=source, segment=segment,
                             price_per_segment=price_per_segment, gateway=gateway, policy=policy, ends_at=ends_at,
                             sender_name=sender_name, currency=currency)
    cut = plan_render_shards(engine, cid, source, segment, get_settings().shard_size)
    before = {int(r["shard"]) for r in cut if r["state"] == "done"}
    progress = create_progress_artifact(0.0, description=f"render {campaign} in {len(cut)} shards")
    dispatch(engine, cid, RENDER, RENDER_SHARD_DEPLOYMENT,
             lambda r: {"campaign_id": cid, "shard": int(r["shard"]), "template": str(template),
                        "sender_name": sender_name, "campaign": campaign},
             on_progress=lambda d, t: update_progress_artifact(progress, 100.0 * d / max(1, t),
                                                               description=f"{d} of {t} shards rendered"))
    stats = {k: v for k, v in shards_stats(engine, cid, RENDER).items() if k not in before}
    out = {"campaign": campaign, "campaign_id": cid, "shards": len(stats), "planned": 0, "no_consent": 0,
           "render_failed": 0, "parts": 0, "cost_planned": 0.0, "currency": currency}
    for st in stats.values():
        for k in ("planned", "no_consent", "render_failed", "parts"):
            out[k] += int(st.get(k, 0))
        out["cost_planned"] = round(out["cost_planned"] + float(st.get("cost_planned", 0.0)), 4)
    get_run_logger().info("render %s in %d shards: %d planned, %d no consent, %d failed to render", campaign,
                          len(stats), out["planned"], out["no_consent"], out["render_failed"])
    return out


@flow(name="send-sharded")
def send_sharded(campaign: str, campaign_id: int, gateway_block: str = "sandbox", rate: float | None = None,
                 now: datetime | None = None) -> dict:
    """Send the campaign through send deployment runs, one per sender the gateway allows (``senders``: one
    per bind or connection of the provider; each holds its slot's lease and sends at its share of the rate)."""
    engine = get_engine()
    gw = load_gateway(gateway_block)
    plan_send_shards(engine, campaign_id, gw.senders)
    runs = dispatch(engine, campaign_id, SEND, SEND_DEPLOYMENT,
                    lambda r: {"campaign": campaign, "gateway_block": gateway_block, "rate": rate,
                               "now": now.isoformat() if now else None},
                    done_by_run=True)
    return {"campaign": campaign, "senders": len(runs), "flow_runs": sorted(runs.values())}
