"""Flow: triggered journeys. CRM events (stored by the webhook service) -> journey instances ->
due steps -> the outbox -> the gateway. Delayed steps become scheduled runs of this flow's own
deployment (wake-ups), never a sleeping process; see tasks/journey.py for the guarantees."""
from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.send import send
from smsflow.settings import get_settings
from store.db import get_engine
from store.leases import StoreLease, process_holder
from tasks.journey import (
    JourneyStats,
    cancel_runs,
    forget_wake_runs,
    journey_campaigns_due,
    journey_events_task,
    journey_plan_task,
    journey_triggers_task,
    orphan_wake_runs,
    schedule_wakeups,
    wakeups_needed,
)
from tasks.journey_defs import load_journeys


# One journey run at a time, through a store lease rather than a Prefect deployment concurrency limit:
# Prefect renews a deployment slot's lease for 300 s, so a run killed with SIGKILL blocked the next
# journey run for up to 5 minutes; this lease is free JOURNEY_LEASE_S after its holder's last renewal.
JOURNEY_LEASE_S = 30.0


def _run_holder() -> str:
    from prefect.runtime import flow_run

    return process_holder(f"journey:{flow_run.id or 'local'}")


def _deployment_id():
    """The deployment this run belongs to (wake-ups are runs of it); None for a local run."""
    from prefect.runtime import deployment

    return deployment.id


@flow(name="journey")
def journey(journeys_dir: str | None = None, gateway_block: str = "sandbox", database_url: str | None = None,
            now: datetime | None = None, event: str | None = None) -> dict:
    """Process new CRM events and date/inactivity triggers, send every journey step that is due,
    and schedule a wake-up run for the next ones. Safe to run any number of times, concurrently
    too: each (journey, entity, step) sends at most once; runs take turns (a store lease) so that
    they do not repeat each other's work. ``event`` only labels a triggered run."""
    log = get_run_logger()
    journeys = load_journeys(journeys_dir or get_settings().journeys_dir)
    engine = get_engine(database_url)
    with StoreLease(engine, "journey-runs", _run_holder(), ttl_s=JOURNEY_LEASE_S):
        return _journey(log, journeys, engine, gateway_block, database_url, now, event)


def _journey(log, journeys, engine, gateway_block, database_url, now, event) -> dict:
    stats = JourneyStats()
    stats.add(journey_events_task(journeys, database_url, now))
    stats.add(journey_triggers_task(journeys, database_url, now))
    stats.add(journey_plan_task(journeys, gateway_block, database_url, now))

    sent = {}
    for name, gw in journey_campaigns_due(engine, now):
        sent[name] = send(campaign=name, gateway_block=gw or gateway_block, database_url=database_url, now=now)["submitted"]

    woken = cancelled = 0
    dep = _deployment_id()
    if dep is not None:
        woken = schedule_wakeups(dep, wakeups_needed(engine, now), engine)
        orphans = orphan_wake_runs(engine)
        cancelled = cancel_runs(orphans)
        forget_wake_runs(engine, orphans)
    summary = {**{k: v for k, v in vars(stats).items() if k != "campaigns"}, "submitted": sent,
               "wakeups_scheduled": woken, "wakeups_cancelled": cancelled, "journeys": [j.name for j in journeys]}
    log.info("journeys (%s): %d events, %d started, %d exited, %d steps planned, %d skipped, %d failed, "
             "%d cancelled, %d withdrawn; submitted %s; %d wake-up runs scheduled, %d cancelled",
             event or "scheduled", stats.events, stats.started, stats.exited, stats.planned, stats.skipped,
             stats.failed, stats.cancelled, stats.withdrawn, sent or "nothing", woken, cancelled)
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items() if isinstance(v, int))
    create_markdown_artifact(f"## Journeys\n\n| | count |\n|---|---|\n{rows}\n", key="journeys",
                             description="journey run summary")
    return summary


if __name__ == "__main__":
    journey()
