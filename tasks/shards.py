"""A campaign in shards (distributed mode): each shard a flow run of a deployment, on whichever worker is free.

* **Render shards** are contact-id ranges of the campaign's candidates (``shard_size`` contacts each, cut
  when the campaign is first rendered; a rerun adds shards only for contacts that arrived since, with
  higher ids). A shard renders its range and writes its messages and its ``done`` mark in ONE store
  transaction: a shard killed half-way wrote nothing, a shard run twice (a rerun of the parent, Dask
  running a task again after a worker died) finds itself done, or loses the race and rolls back.
* **Send shards** are senders, ``senders`` of the gateway (one per bind; ``store.leases.SlotLease``); a send
  shard is done when its flow run completed (the outbox makes every send idempotent).
* :func:`dispatch` starts each pending shard with ``run_deployment(..., idempotency_key=
  "smsflow:<campaign>:<step>:<shard>:<attempt>")`` and waits: rerunning the parent finds the same runs;
  a run that crashed or failed without finishing its shard is replaced by the next attempt. Runs whose
  process died with their worker are marked Crashed by the Prefect automations of
  ``deployments/automations.py`` (missing heartbeats), not by us.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from store.db import utcnow
from tasks.render import PlanStats, _pages, _render_chunk, needs_attributes, write_chunk

log = logging.getLogger("smsflow.shards")

RENDER, SEND = "render", "send"
MAX_ATTEMPTS = 5  # runs of one shard that ended without finishing it, before the campaign gives up


class ShardFailed(RuntimeError):
    pass


def _insert_shards(conn, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    conn.execute(
        text("INSERT INTO campaign_shards (campaign_id, step, shard, lo_id, hi_id, contacts, state, attempts, "
             "created_at) VALUES (:campaign_id, :step, :shard, :lo_id, :hi_id, :contacts, 'pending', 0, :now) "
             "ON CONFLICT (campaign_id, step, shard) DO NOTHING"),
        [{**r, "now": utcnow()} for r in rows],
    )


def shards(engine, campaign_id: int, step: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT shard, lo_id, hi_id, contacts, state, attempts, flow_run_id, stats FROM campaign_shards "
                 "WHERE campaign_id = :c AND step = :s ORDER BY shard"), {"c": campaign_id, "s": step}).mappings()
        return [dict(r) for r in rows]


def plan_render_shards(engine, campaign_id: int, source: str, segment: str, shard_size: int) -> list[dict[str, Any]]:
    """The campaign's render shards: the ones cut before, plus new ones over candidates (contacts of the
    segment without a message of the campaign) with ids above every earlier shard. Safe to run twice at
    once (the key of a shard is its number)."""
    size = max(1, int(shard_size))
    with engine.begin() as conn:
        top = conn.execute(text("SELECT MAX(hi_id), MAX(shard) FROM campaign_shards WHERE campaign_id = :c AND "
                                "step = 'render'"), {"c": campaign_id}).first()
        after = -1 if top[0] is None else int(top[0])
        first = 0 if top[1] is None else int(top[1]) + 1
        cut = conn.execute(text(
            "SELECT k, MIN(id) AS lo, MAX(id) AS hi, COUNT(*) AS n FROM ("
            " SELECT c.id, (ROW_NUMBER() OVER (ORDER BY c.id) - 1) / :size AS k"
            " FROM segment_memberships m JOIN contacts c ON c.id = m.contact_id"
            " WHERE m.segment = :g AND c.source = :s AND c.status = 'valid' AND c.id > :after"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.campaign_id = :cid AND o.contact_id = c.id)"
            ") ranked GROUP BY k ORDER BY k"),
            {"size": size, "g": segment, "s": source, "after": after, "cid": campaign_id}).all()
        _insert_shards(conn, [dict(campaign_id=campaign_id, step=RENDER, shard=first + i, lo_id=int(lo), hi_id=int(hi),
                                   contacts=int(n)) for i, (_k, lo, hi, n) in enumerate(cut)])
    return shards(engine, campaign_id, RENDER)


def plan_send_shards(engine, campaign_id: int, senders: int) -> list[dict[str, Any]]:
    """One send shard per sender; the shards of an earlier run that are not done yet are sent again."""
    with engine.begin() as conn:
        n = conn.execute(text("SELECT COUNT(*) FROM campaign_shards WHERE campaign_id = :c AND step = 'send' "
                              "AND state = 'pending'"), {"c": campaign_id}).scalar_one()
        first = conn.execute(text("SELECT COALESCE(MAX(shard), -1) + 1 FROM campaign_shards WHERE campaign_id = :c "
                                  "AND step = 'send'"), {"c": campaign_id}).scalar_one()
        _insert_shards(conn, [dict(campaign_id=campaign_id, step=SEND, shard=int(first) + i, lo_id=None, hi_id=None,
                                   contacts=0) for i in range(max(0, senders - int(n)))])
    return shards(engine, campaign_id, SEND)


class _Done(Exception):
    """Another run finished this shard first: roll our writes back."""


def render_shard(engine, campaign_id: int, shard: int, template, extra: dict[str, Any] | None = None,
                 page_size: int = 50_000) -> dict[str, Any]:
    """Render one shard into the outbox; its messages and its done mark in one transaction. Returns the
    shard's stats (the stored ones when it was done already)."""
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT s.lo_id, s.hi_id, s.state, s.stats, c.source, c.segment, c.gateway, c.price_per_segment, c.currency "
            "FROM campaign_shards s JOIN campaigns c ON c.id = s.campaign_id "
            "WHERE s.campaign_id = :c AND s.step = 'render' AND s.shard = :n"), {"c": campaign_id, "n": shard}).first()
    if row is None:
        raise ShardFailed(f"campaign {campaign_id} has no render shard {shard}")
    if row.state == "done":
        return dict(_loads(row.stats), already_done=True)
    stats = PlanStats()
    chunks = []
    for records in _pages(engine, campaign_id, row.source, row.segment, page_size, stats,
                          ids=(int(row.lo_id), int(row.hi_id)), marketing=template.kind == "marketing",
                          attributes=needs_attributes(template)):
        rendered, failed = _render_chunk((records, template, float(row.price_per_segment or 0.0), extra or {}))
        chunks.append((rendered, failed, {int(r["contact_id"]): r["phone_e164"] for r in records}))
    try:
        with engine.begin() as conn:
            for rendered, failed, phones in chunks:
                write_chunk(conn, rendered, failed, stats, campaign_id, row.source, row.segment, template, row.gateway,
                            phones)
            result = {**stats.result(row.currency or "RUB"), "candidates": stats.candidates}
            marked = conn.execute(text(
                "UPDATE campaign_shards SET state = 'done', stats = :st, done_at = :now WHERE campaign_id = :c "
                "AND step = 'render' AND shard = :n AND state <> 'done'"),
                {"st": _json(result), "now": utcnow(), "c": campaign_id, "n": shard}).rowcount
            if marked != 1:
                raise _Done
    except _Done:
        return dict(shards_stats(engine, campaign_id, RENDER).get(shard) or {}, already_done=True)
    return result


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value)


def _loads(stats) -> dict[str, Any]:
    """A stats column as read through text(): a dict on PostgreSQL (jsonb), JSON text on SQLite."""
    return json.loads(stats) if isinstance(stats, str) else dict(stats or {})


def shards_stats(engine, campaign_id: int, step: str) -> dict[int, dict[str, Any]]:
    return {int(r["shard"]): _loads(r["stats"]) for r in shards(engine, campaign_id, step)}


def mark_done(engine, campaign_id: int, step: str, shard: int, stats: dict[str, Any] | None = None) -> bool:
    with engine.begin() as conn:
        return conn.execute(text(
            "UPDATE campaign_shards SET state = 'done', stats = :st, done_at = :now WHERE campaign_id = :c AND "
            "step = :s AND shard = :n AND state <> 'done'"),
            {"st": _json(stats or {}), "now": utcnow(), "c": campaign_id, "s": step, "n": shard}).rowcount == 1


def _next_attempt(engine, campaign_id: int, step: str, shard: int, seen: int) -> int:
    with engine.begin() as conn:
        conn.execute(text("UPDATE campaign_shards SET attempts = :a, flow_run_id = NULL WHERE campaign_id = :c AND "
                          "step = :s AND shard = :n AND attempts = :seen"),
                     {"a": seen + 1, "c": campaign_id, "s": step, "n": shard, "seen": seen})
        return int(conn.execute(text("SELECT attempts FROM campaign_shards WHERE campaign_id = :c AND step = :s AND "
                                     "shard = :n"), {"c": campaign_id, "s": step, "n": shard}).scalar_one())


def run_key(campaign_id: int, step: str, shard: int, attempt: int) -> str:
    return f"smsflow:{campaign_id}:{step}:{shard}:{attempt}"


def dispatch(engine, campaign_id: int, step: str, deployment: str, parameters: Callable[[dict[str, Any]], dict],
             *, done_by_run: bool = False, poll_s: float = 2.0, max_attempts: int = MAX_ATTEMPTS,
             on_progress: Callable[[int, int], None] | None = None) -> dict[int, str]:
    """Run every pending shard of ``step`` as a run of ``deployment`` and wait for all of them; returns
    shard -> flow run id of the runs of this call. ``done_by_run``: a completed run finishes its shard
    (send); otherwise only the shard's own transaction does (render)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    from prefect.context import FlowRunContext

    todo = {int(r["shard"]): r for r in shards(engine, campaign_id, step) if r["state"] != "done"}
    total = len(todo)
    runs: dict[int, str] = {}
    ctx = FlowRunContext.get()
    parent = [f"parent-{ctx.flow_run.id}"] if ctx and ctx.flow_run else []

    def start(shard: int) -> None:
        r = todo[shard]
        # not as a subflow: that would add a placeholder task run per shard to the parent (runs per 1M
        # contacts must stay few); the tags find a campaign's shards in the UI instead
        fr = run_deployment(name=deployment, parameters=parameters(r), timeout=0, as_subflow=False,
                            idempotency_key=run_key(campaign_id, step, shard, int(r["attempts"])),
                            tags=["smsflow", f"campaign-{campaign_id}", f"{step}-shard", *parent])
        runs[shard] = str(fr.id)
        with engine.begin() as conn:
            conn.execute(text("UPDATE campaign_shards SET flow_run_id = :f WHERE campaign_id = :c AND step = :s AND "
                              "shard = :n"), {"f": str(fr.id), "c": campaign_id, "s": step, "n": shard})

    for shard in sorted(todo):
        start(shard)
    waiting = set(todo)
    with get_client(sync_client=True) as client:
        while waiting:
            time.sleep(poll_s)
            done = {int(r["shard"]) for r in shards(engine, campaign_id, step) if r["state"] == "done"}
            flow_runs = {str(f.id): f for f in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[s] for s in waiting])))}
            for shard in sorted(waiting):
                state = flow_runs[runs[shard]].state if runs[shard] in flow_runs else None
                if shard in done:
                    waiting.discard(shard)
                    continue
                if state is None or not state.is_final():
                    continue
                if state.is_completed() and done_by_run:
                    mark_done(engine, campaign_id, step, shard)
                    waiting.discard(shard)
                    continue
                if shard in {int(r["shard"]) for r in shards(engine, campaign_id, step) if r["state"] == "done"}:
                    waiting.discard(shard)  # it committed after our first look
                    continue
                if state.is_cancelled():
                    raise ShardFailed(f"{step} shard {shard} of campaign {campaign_id} was cancelled (flow run "
                                      f"{runs[shard]}); rerun the campaign to continue")
                attempt = _next_attempt(engine, campaign_id, step, shard, int(todo[shard]["attempts"]))
                if attempt >= max_attempts:
                    raise ShardFailed(f"{step} shard {shard} of campaign {campaign_id} ended {state.name} "
                                      f"{attempt} times (last flow run {runs[shard]}: {state.message or ''})")
                log.warning("%s shard %d of campaign %d ended %s (flow run %s): starting attempt %d", step, shard,
                            campaign_id, state.name, runs[shard], attempt)
                todo[shard]["attempts"] = attempt
                start(shard)
            if on_progress:
                on_progress(total - len(waiting), total)
    return runs


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.retrying import retry_if_transient  # noqa: E402


@task(name="render-shard", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def render_shard_task(campaign_id: int, shard: int, template, extra: dict[str, Any] | None,
                      database_url: str | None = None) -> dict[str, Any]:
    """One shard, where the flow's task runner puts it (a Dask worker in distributed mode). Idempotent:
    Dask may run it again when a worker dies."""
    from store.db import get_engine

    return render_shard(get_engine(database_url), campaign_id, shard, template, extra)


def shard_task_runner():
    """Dask (``SMSFLOW_DASK_ADDRESS``) for a shard's CPU-heavy render, else threads in the flow-run process."""
    from smsflow.settings import get_settings

    address = get_settings().dask_address
    if not address:
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
