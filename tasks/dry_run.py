"""The dry run of a campaign in this process: extract -> validate -> segment -> render into the outbox.

A preview: the same step functions the Prefect tasks call (``extract_source``, ``validate_new_contacts``,
``build_membership``, ``plan_messages``), in the same order, on the same store, with the same results
(contacts with their verdicts, quarantine, segment membership, planned messages, the campaign's
accounting and its ``campaign.dry_run`` event in the store's event log). What it does not do is talk to
Prefect: no flow or task runs, no artifacts, no Prefect events, no retries (a preview that fails is
simply run again). That keeps a preview of 1,000 contacts within a few seconds: a Prefect API costs
seconds to start and every run and artifact is an HTTP round trip. ``smsflow campaign --dry-run`` uses
it; the ``campaign`` deployment with ``dry_run`` runs the same steps as Prefect flows.

The campaign flow prints the same progress lines (``smsflow.progress``).
"""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from smsflow import progress
from smsflow.settings import get_settings
from store.db import utcnow
from tasks.accounting import close_campaign, record_planned
from tasks.extract import extract_source
from tasks.render import open_campaign, plan_messages, render_extra
from tasks.segment import build_membership, resolve_segment
from tasks.validate import validate_new_contacts

if TYPE_CHECKING:  # or smsflow.exports.ExportSource, the same interface without Prefect
    from blocks.crm import CrmSource


def dry_run_campaign(engine, source: CrmSource, *, name: str, template: str, segment: str = "all",
                     segments_file: str | None = None, gateway_name: str = "sandbox", price_per_segment: float = 0.0,
                     sender_name: str | None = None, currency: str = "RUB", policy=None,
                     ends_at: datetime | None = None) -> dict[str, Any]:
    """Plan and price a campaign into the outbox without sending (see the module doc); returns
    ``{"summary": campaign_accounting(...), "campaign_id": id}`` like the campaign flow."""
    s = get_settings()
    src = source.source_name
    definition = resolve_segment(segment, segments_file)  # a bad segment fails before anything is read
    progress.step("campaign", f"{name}: extract, validate, segment, render (dry run, in this process)")
    ex = extract_source(engine, source, batch_size=s.batch_size, default_region=s.default_region, processes=s.workers)
    progress.step("extract", progress.extracted_line(ex.rows, ex.quarantined))
    va = validate_new_contacts(engine, src, s.default_region, s.workers)
    progress.step("validate", progress.validated_line(vars(va)))
    members = build_membership(engine, src, definition, utcnow())
    progress.step("segment", f"{definition.name}: {members} contacts")
    cid, tpl = open_campaign(engine, name=name, template=template, source=src, segment=definition.name,
                             price_per_segment=price_per_segment, gateway=gateway_name, policy=policy,
                             ends_at=ends_at, sender_name=sender_name, currency=currency)
    st = plan_messages(engine, campaign_id=cid, source=src, segment=definition.name, template=tpl,
                       price_per_segment=price_per_segment, gateway=gateway_name, batch_size=s.batch_size,
                       processes=s.workers, extra=render_extra(name))
    rendered = st.result(currency)
    record_planned(engine, cid, rendered, emit=False)
    progress.step("render", progress.rendered_line(rendered))
    return {"summary": close_campaign(engine, cid, sent=False, emit=False), "campaign_id": cid}
