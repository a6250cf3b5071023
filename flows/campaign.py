"""The campaign: extract -> validate -> segment -> render -> send -> reconcile -> report.

Each step is its own flow (runnable alone from the UI); this one composes them. Rerunning a
campaign by name resumes it: the outbox makes every step idempotent.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from blocks.registry import load_crm, load_gateway
from smsflow import progress
from smsflow.abtest import ABTest
from smsflow.settings import get_settings
from flows.abtest import render_ab
from flows.crm_extract import crm_extract
from flows.reconcile import reconcile
from flows.render import render
from flows.report import report
from flows.segment import segment as segment_flow
from flows.send import send
from flows.shards import render_sharded, send_sharded
from flows.validate_and_dedup import validate_and_dedup
from store.db import get_engine
from tasks.policy import ContactPolicy
from smsflow.templates import template_library
from tasks.accounting import close_campaign, record_planned, set_attribution


class CampaignParams(BaseModel):
    name: str = Field(description="Campaign name; rerunning the same name resumes it.", min_length=1, max_length=200)
    source_block: str = Field(default="demo-crm", description="CRM source Block name.")
    template: str = Field(description="Template from the project's library (templates/*.yaml, e.g. demo_promo); "
                          "the CLI may give any template file's path.",
                          json_schema_extra={"enum": template_library()})
    segment: str = Field(default="all", description="Audience: 'all' or a segment from the segments file.")
    segments_file: str | None = Field(default=None, description="YAML file with segment definitions.")
    gateway_block: str = Field(default="sandbox", description="SMS gateway Block name.")
    rate: float | None = Field(default=None, gt=0, description="Messages per second (default: the gateway's).")
    dry_run: bool = Field(default=False, description="Plan and price the messages, send nothing.")
    wait_for_receipts_s: float = Field(default=30.0, ge=0, description="How long to wait for final receipts.")
    full_refresh: bool = Field(default=False, description="Ignore the extract watermark.")
    policy: ContactPolicy = Field(default_factory=ContactPolicy, description="Send windows, caps, consent rules "
                                  "(default: marketing 10:00-21:00 local, not on Russian public holidays).")
    ends_at: datetime | None = Field(default=None, description="Messages not sent by then expire.")
    now: datetime | None = Field(default=None, description="The clock for policy decisions (previews and tests).")
    attribution_delivery_days: float | None = Field(default=None, gt=0, description="Orders within this many days "
                                                    "after delivery count for this campaign (default: the setting, 7).")
    attribution_click_days: float | None = Field(default=None, gt=0, description="Orders within this many days "
                                                 "after a person's click count (default: the setting, 7).")
    ab: ABTest | None = Field(default=None, description="An A/B/n test: variants, split, metric, holdout, test share "
                              "(the rest gets the winner after ab-decide decides).")


def _shared_path(template: str) -> str:
    """A template file as an absolute path (shard runs start in the project directory, not ours)."""
    p = Path(template)
    return str(p.resolve()) if p.is_file() else template


@flow(name="campaign")
def campaign(params: CampaignParams) -> dict:
    """The whole campaign. The store is the worker's (SMSFLOW_DATABASE_URL), never a form field."""
    database_url = None
    log = get_run_logger()
    source = load_crm(params.source_block).source_name
    gw = load_gateway(params.gateway_block)
    progress.step("campaign", f"{params.name}: extract from {params.source_block}, then validate, segment, render"
                  + ("" if params.dry_run else ", send, reconcile, report"))
    ex = crm_extract(params.source_block, params.full_refresh, database_url)
    progress.step("extract", progress.extracted_line(ex["rows"], ex["quarantined"]))
    va = validate_and_dedup(source, database_url=database_url)
    progress.step("validate", progress.validated_line(va))
    seg = segment_flow(source, params.segment, params.segments_file, database_url)
    progress.step("segment", f"{seg['segment']}: {seg['members']} contacts")
    distributed = get_settings().mode == "distributed"
    if params.ab is not None:  # the test share now; the rest when ab-decide has a winner (flows/abtest.py)
        rendered = render_ab(params.name, _shared_path(params.template), params.ab, source, params.segment,
                             gw.price_per_segment, params.gateway_block, params.policy, params.ends_at, gw.sender_id,
                             getattr(gw, "currency", "RUB"), params.now)
    elif distributed:  # shards as deployment runs on the pool's workers (flows/shards.py)
        rendered = render_sharded(params.name, _shared_path(params.template), source, params.segment,
                                  gw.price_per_segment, params.gateway_block, params.policy, params.ends_at,
                                  gw.sender_id, getattr(gw, "currency", "RUB"))
    else:
        rendered = render(params.name, params.template, source, params.segment, gw.price_per_segment,
                          params.gateway_block, database_url, params.policy, params.ends_at, gw.sender_id,
                          getattr(gw, "currency", "RUB"))
    engine = get_engine(database_url)
    cid = rendered["campaign_id"]
    record_planned(engine, cid, rendered)
    set_attribution(engine, cid, params.attribution_delivery_days, params.attribution_click_days)
    progress.step("render", progress.rendered_line(rendered))
    result: dict = {"ab": rendered["ab"]} if "ab" in rendered else {}
    if not params.dry_run:
        if distributed:
            result["send"] = send_sharded(params.name, cid, params.gateway_block, params.rate, params.now)
        else:
            result["send"] = send(params.name, params.gateway_block, params.rate, database_url, params.now)
        progress.step("send", f"{result['send'].get('submitted', 'all')} handed to {params.gateway_block}")
        progress.step("reconcile", f"waiting up to {params.wait_for_receipts_s:.0f} s for final receipts")
        result["reconcile"] = reconcile(params.gateway_block, params.name, params.wait_for_receipts_s, None, database_url)
        result["report"] = report(params.name, None, database_url)["html"]
        progress.step("report", "written")
    summary = close_campaign(engine, cid, sent=not params.dry_run)
    log.info("campaign %s: %s", params.name, summary)
    return {"summary": summary, "campaign_id": cid, **result}


if __name__ == "__main__":
    import sys

    campaign(CampaignParams(name=sys.argv[1], template=sys.argv[2]))
