"""Render a campaign into the outbox: one planned message per (campaign, contact, step).

Creating a message twice is a no-op (unique idempotency key), so a rerun only renders the
contacts that have no message yet. Contacts without consent or opted out are not planned;
a template that fails for one contact quarantines that message with the reason.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from sqlalchemy import text

from store.db import bulk_insert, read_frame, utcnow
from tasks.extract import write_quarantine
from tasks.render import MessageTemplate, render_batch

OUTBOX_INSERT_FIELDS = (
    "idempotency_key",
    "campaign_id",
    "contact_id",
    "step",
    "segment",
    "phone_e164",
    "language",
    "text",
    "encoding",
    "segments",
    "cost",
    "state",
    "attempts",
    "gateway",
    "planned_at",
    "updated_at",
)


def idempotency_key(campaign_id: int, contact_id: int, step: str = "main") -> str:
    return f"c{campaign_id}:{contact_id}:{step}"


@dataclass
class PlanStats:
    candidates: int = 0
    no_consent: int = 0
    planned: int = 0
    already_planned: int = 0
    render_failed: int = 0
    segments: int = 0
    cost: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _render_chunk(args: tuple[list[dict[str, Any]], MessageTemplate, float, dict[str, Any]]):
    contacts, template, price, extra = args
    return render_batch(contacts, template, price_per_segment=price, extra=extra)


def _contacts_for(engine, campaign_id: int, source: str, segment: str):
    with engine.begin() as conn:
        return read_frame(
            conn,
            "SELECT c.id AS contact_id, c.first_name, c.last_name, c.email, c.language, c.timezone, "
            "c.phone_e164, c.sms_consent, c.opted_out_at, c.attributes "
            "FROM segment_memberships m JOIN contacts c ON c.id = m.contact_id "
            "WHERE m.segment = :g AND c.source = :s AND c.status = 'valid' "
            "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.campaign_id = :cid AND o.contact_id = c.id) "
            "ORDER BY c.id",
            {"g": segment, "s": source, "cid": campaign_id},
        )


def plan_messages(
    engine,
    *,
    campaign_id: int,
    source: str,
    segment: str,
    template: MessageTemplate,
    price_per_segment: float,
    gateway: str | None,
    batch_size: int = 50_000,
    processes: int = 1,
    extra: dict[str, Any] | None = None,
    on_batch=None,
) -> PlanStats:
    stats = PlanStats()
    df = _contacts_for(engine, campaign_id, source, segment)
    stats.candidates = len(df)
    consent = df["sms_consent"].astype(bool) & df["opted_out_at"].isna() if len(df) else df["sms_consent"]
    stats.no_consent = int((~consent).sum()) if len(df) else 0
    df = df[consent.to_numpy()] if len(df) else df
    records = df.to_dict("records")
    for r in records:
        a = r.get("attributes")
        r["attributes"] = a if isinstance(a, dict) else (json.loads(a) if a else {})
    phones = {int(r["contact_id"]): r["phone_e164"] for r in records}
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    extra = extra or {}
    if processes > 1 and len(records) > 20_000:
        # CPU-bound: spread chunks over processes (spawn: safe beside Prefect's threads)
        per = max(5_000, len(records) // (processes * 4) + 1)
        chunks = [records[i : i + per] for i in range(0, len(records), per)]
        with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
            results = pool.map(_render_chunk, [(c, template, price_per_segment, extra) for c in chunks])
            for rendered, failed in results:
                _store_chunk(engine, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones)
                if on_batch:
                    on_batch(stats)
    else:
        for c in chunks:
            rendered, failed = _render_chunk((c, template, price_per_segment, extra))
            _store_chunk(engine, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones)
            if on_batch:
                on_batch(stats)
    return stats


def _store_chunk(engine, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones) -> None:
    now = utcnow()
    step = template.name
    rows = (
        (
            idempotency_key(campaign_id, int(r["contact_id"]), step),
            campaign_id,
            int(r["contact_id"]),
            step,
            segment,
            phones[int(r["contact_id"])],
            r["language"],
            r["text"],
            r["encoding"],
            int(r["segments"]),
            float(r["cost"]),
            "planned",
            0,
            gateway,
            now,
            now,
        )
        for r in rendered
    )
    quarantine = [
        dict(step="render", source=source, row_key=f"{campaign_id}:{int(f['contact_id'])}", campaign_id=campaign_id,
             contact_id=int(f["contact_id"]), reason_code="render_error", reason=str(f["reason"]),
             payload={"template": template.name})
        for f in failed
    ]
    with engine.begin() as conn:
        bulk_insert(conn, "outbox", OUTBOX_INSERT_FIELDS, rows, on_conflict="ignore", conflict_columns=("idempotency_key",))
        write_quarantine(conn, quarantine)
        if rendered:
            # contacts that failed in an earlier run and render now are no longer quarantined
            conn.execute(
                text("DELETE FROM quarantine WHERE step = 'render' AND campaign_id = :c AND contact_id IN "
                     "(SELECT contact_id FROM outbox WHERE campaign_id = :c)"),
                {"c": campaign_id},
            )
    stats.planned += len(rendered)
    stats.render_failed += len(failed)
    stats.segments += sum(int(r["segments"]) for r in rendered)
    stats.cost += sum(float(r["cost"]) for r in rendered)
    stats.failures.extend(failed[: max(0, 20 - len(stats.failures))])


def default_processes() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="render-into-outbox", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_task(campaign_id: int, source: str, segment: str, template: MessageTemplate, price_per_segment: float,
              gateway: str | None, batch_size: int, processes: int, database_url: str | None,
              extra: dict[str, Any] | None = None) -> PlanStats:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from store.db import get_engine

    progress = create_progress_artifact(0.0, description="render into the outbox")
    engine = get_engine(database_url)

    def on_batch(s: PlanStats) -> None:
        done = s.planned + s.render_failed
        total = max(1, s.candidates - s.no_consent)
        update_progress_artifact(progress, min(100.0, 100.0 * done / total), description=f"{done} of {total} rendered")

    stats = plan_messages(engine, campaign_id=campaign_id, source=source, segment=segment, template=template,
                          price_per_segment=price_per_segment, gateway=gateway, batch_size=batch_size,
                          processes=processes, extra=extra, on_batch=on_batch)
    update_progress_artifact(progress, 100.0, description=f"{stats.planned} planned, {stats.render_failed} quarantined")
    return stats
