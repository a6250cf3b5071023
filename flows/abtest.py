"""Flows of A/B campaigns: render the test share (called by the campaign flow) and the wake-up that
looks at every open test, decides once and rolls the winner out to the rest (deployment
``ab-decide/hourly``: a scheduled run, nothing sleeps; rerunning it after a crash resumes)."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task

from smsflow.abtest import ABTest
from store.db import get_engine
from tasks.render import render_extra


def arm_templates(test: ABTest, template: str) -> dict[str, str]:
    """arm -> template (library name or absolute path: wake-up runs start elsewhere)."""
    def shared(t: str) -> str:
        p = Path(t)
        return str(p.resolve()) if p.is_file() else t

    return {v.name: shared(v.template or template) for v in test.variants}


@task(name="render-ab")
def render_ab_task(engine_url, **kw) -> dict:
    from tasks.abtest import plan_ab

    return plan_ab(get_engine(engine_url), **kw)


@flow(name="render-ab")
def render_ab(campaign: str, template: str, test: ABTest, source: str, segment: str, price_per_segment: float,
              gateway: str | None, policy=None, ends_at: datetime | None = None, sender_name: str | None = None,
              currency: str = "RUB", now: datetime | None = None, database_url: str | None = None) -> dict:
    """The test phase: each test arm rendered with its variant, the holdout recorded, the rest waiting."""
    from smsflow.settings import get_settings
    from smsflow.abtest import ROLLOUT
    from tasks.abtest import arm_sizes, load_test, sample_size_note, start_test
    from tasks.render import open_campaign

    engine = get_engine(database_url)
    cid, tpl = open_campaign(engine, name=campaign, template=template, source=source, segment=segment,
                             price_per_segment=price_per_segment, gateway=gateway, policy=policy, ends_at=ends_at,
                             sender_name=sender_name, currency=currency)
    templates = arm_templates(test, template)
    start_test(engine, cid, test, templates, now or datetime.now(timezone.utc))
    _, row = load_test(engine, cid)
    phase = "test" if row["phase"] == "test" else "rollout"
    res = render_ab_task(database_url, campaign_id=cid, campaign=campaign, source=source, segment=segment, test=test,
                         templates=templates, price_per_segment=price_per_segment, gateway=gateway,
                         sender_name=sender_name, extra=render_extra(campaign), batch_size=get_settings().batch_size,
                         phase=phase, winner=row["winner"])
    sizes = arm_sizes(engine, cid, res["arms"].get(ROLLOUT, 0) if phase == "test" else 0)  # reruns count all
    res.update(currency=currency, campaign=campaign, campaign_id=cid, ab=sample_size_note(test, sizes))
    if "warning" in res["ab"]:
        get_run_logger().warning("A/B %s: %s", campaign, res["ab"]["warning"])
    return res


@flow(name="ab-decide")
def ab_decide(campaign: str | None = None, now: datetime | None = None, wait_for_receipts_s: float = 0.0,
              rate: float | None = None, database_url: str | None = None) -> dict:
    """Look at every open A/B test (or ``campaign``'s): log the look, decide once (winner or deadline),
    then render and send the rest the winner. Safe to rerun at any moment."""
    from flows.reconcile import reconcile
    from flows.send import send
    from tasks.abtest import finish_rollout, load_test, look, open_tests, plan_ab
    from tasks.accounting import close_campaign
    from smsflow.settings import get_settings
    from sqlalchemy import text

    log = get_run_logger()
    engine = get_engine(database_url)
    clock = now or datetime.now(timezone.utc)
    out = {}
    for cid, name in open_tests(engine, campaign):
        seen = look(engine, cid, clock)
        log.info("A/B %s: %s", name, seen["verdict"])
        test, row = load_test(engine, cid)
        entry = {"phase": row["phase"], "winner": row["winner"], "verdict": row["verdict"] or seen["verdict"]}
        if row["phase"] == "decided":
            with engine.connect() as conn:
                c = conn.execute(text("SELECT source, segment, gateway, price_per_segment FROM campaigns WHERE id = :c"),
                                 {"c": cid}).one()
            gateway = c[2] or "sandbox"
            from blocks.registry import load_gateway

            gw = load_gateway(gateway)
            r = plan_ab(engine, campaign_id=cid, campaign=name, source=c[0], segment=c[1], test=test,
                        templates=row["templates"], price_per_segment=float(c[3]), gateway=gateway,
                        sender_name=gw.sender_id, extra=render_extra(name), batch_size=get_settings().batch_size,
                        phase="rollout", winner=row["winner"])
            entry["rollout"] = {"planned": r["planned"], "arms": r["arms"]}
            entry["send"] = send(name, gateway, rate, database_url, now)
            if wait_for_receipts_s:
                reconcile(gateway, name, wait_for_receipts_s, None, database_url)
            finish_rollout(engine, cid)
            close_campaign(engine, cid, sent=True)
            entry["phase"] = "rolled_out"
        out[name] = entry
    return out
