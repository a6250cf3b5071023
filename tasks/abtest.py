"""A/B campaigns: render the test arms (and record the holdout), look at the results, decide once, roll
the winner out to the rest. The statistics and the assignment are in smsflow/abtest.py.

Phases (``ab_tests.phase``): ``test`` (the test share is rendered and sent; every look is logged in
``ab_looks``) -> ``decided`` (one UPDATE guarded on the phase: two lookers never decide twice) ->
``rolled_out`` (the rest got the winner). Every message of an A/B campaign is keyed
``c<campaign>:<contact>:ab`` whatever its arm or phase, and a candidate is a contact without a message
of the campaign, so no contact ever gets two variants, across reruns and crashes.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import text

from smsflow.abtest import (HOLDOUT, ROLLOUT, ABTest, ab_size, ab_stats, assign, diff_ci, more_needed,
                            sequential_look)
from store.db import bulk_insert, read_frame, utcnow
from tasks.render import PlanStats, candidate_pages, campaign_template, needs_attributes, render_batch, write_chunk

STEP = "ab"
METRIC_WORDS = {"click_rate": "clicks", "conversion_rate": "conversions", "reply_rate": "replies"}


class ABDesignChanged(ValueError):
    pass


def _naive(t: datetime) -> datetime:
    """UTC without a zone, as the store keeps times."""
    return t if t.tzinfo is None else t.astimezone(timezone.utc).replace(tzinfo=None)


def start_test(engine, campaign_id: int, test: ABTest, templates: dict[str, str], now: datetime) -> dict[str, Any]:
    """The campaign's test row (created once; a rerun with another design is refused, as it would move
    contacts between arms). ``templates``: arm -> template (library name or absolute path)."""
    spec = {**test.model_dump(mode="json"), "templates": templates}
    with engine.begin() as conn:
        row = conn.execute(text("SELECT spec, phase FROM ab_tests WHERE campaign_id = :c"), {"c": campaign_id}).first()
        if row is None:
            conn.execute(text("INSERT INTO ab_tests (campaign_id, spec, phase, started_at) VALUES (:c, :s, 'test', :t)"),
                         {"c": campaign_id, "s": json.dumps(spec), "t": _naive(now)})
            return {"phase": "test"}
    old = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    if {k: v for k, v in old.items() if k != "templates"} != {k: v for k, v in spec.items() if k != "templates"}:
        raise ABDesignChanged("this campaign's A/B design differs from the one it started with; a running test "
                              "cannot change (contacts would move between arms): use a new campaign name")
    return {"phase": row[1]}


def load_test(engine, campaign_id: int) -> tuple[ABTest, dict[str, Any]] | None:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT spec, phase, started_at, decided_at, winner, verdict FROM ab_tests "
                                "WHERE campaign_id = :c"), {"c": campaign_id}).mappings().first()
    if row is None:
        return None
    spec = row["spec"] if isinstance(row["spec"], dict) else json.loads(row["spec"])
    test = ABTest.model_validate({k: v for k, v in spec.items() if k != "templates"})
    return test, {**row, "templates": spec.get("templates", {}), "started_at": _dt(row["started_at"]),
                  "decided_at": _dt(row["decided_at"])}


def _dt(v):
    return datetime.fromisoformat(v) if isinstance(v, str) else v


def plan_ab(engine, *, campaign_id: int, campaign: str, source: str, segment: str, test: ABTest,
            templates: dict[str, str], price_per_segment: float, gateway: str | None, sender_name: str | None,
            extra: dict[str, Any], batch_size: int, phase: str, winner: str | None = None) -> dict[str, Any]:
    """Render one phase. ``test``: the test arms get their variant, the holdout is recorded, the rest
    waits. ``rollout``: every candidate outside the holdout gets ``winner`` (nothing when None)."""
    tpl = {arm: campaign_template(t, sender_name) for arm, t in templates.items()}
    stats = PlanStats()
    arms: dict[str, int] = {}
    now = utcnow()
    for records in candidate_pages(engine, campaign_id, source, segment, batch_size, stats,
                                   marketing=tpl[test.control_name].kind == "marketing",
                                   attributes=needs_attributes(*tpl.values())):
        groups: dict[str, list[dict]] = {}
        for r, arm in zip(records, assign(test, campaign, [r["phone_e164"] for r in records])):
            if arm != HOLDOUT and phase == "rollout":
                arm = winner or ROLLOUT
            groups.setdefault(arm, []).append(r)
        with engine.begin() as conn:
            for arm, recs in groups.items():
                arms[arm] = arms.get(arm, 0) + len(recs)
                if arm == HOLDOUT:
                    bulk_insert(conn, "ab_members", ("campaign_id", "contact_id", "phone_e164", "arm", "assigned_at"),
                                [(campaign_id, int(r["contact_id"]), r["phone_e164"], HOLDOUT, now) for r in recs],
                                on_conflict="ignore", conflict_columns=("campaign_id", "contact_id"))
                    continue
                if arm == ROLLOUT:  # waits for the decision (test phase) or gets nothing (no winner)
                    continue
                rendered, failed = render_batch(recs, tpl[arm], price_per_segment=price_per_segment, extra=extra)
                write_chunk(conn, rendered, failed, stats, campaign_id, source, segment, tpl[arm], gateway,
                            {int(r["contact_id"]): r["phone_e164"] for r in recs}, variant=arm, step=STEP,
                            label=f"{STEP}-{phase}")
    return {**stats.result("RUB"), "arms": arms, "phase": phase}


def arm_sizes(engine, campaign_id: int, waiting: int = 0) -> dict[str, int]:
    """Contacts in each test arm (their messages) and in the holdout, as stored; ``waiting``: the rest."""
    with engine.connect() as conn:
        out = {str(a): int(n) for a, n in conn.execute(text(
            "SELECT variant, COUNT(*) FROM outbox WHERE campaign_id = :c AND step = 'ab-test' GROUP BY variant"),
            {"c": campaign_id})}
        out[HOLDOUT] = int(conn.execute(text("SELECT COUNT(*) FROM ab_members WHERE campaign_id = :c"),
                                        {"c": campaign_id}).scalar())
    out[ROLLOUT] = waiting
    return out


def sample_size_note(test: ABTest, arm_sizes: dict[str, int]) -> dict[str, Any]:
    """What a dry run shows: the size each arm needs for the design's effect and power, and a warning."""
    need = ab_size(test.baseline, test.mde, test.alpha, test.power)
    sizes = {v.name: arm_sizes.get(v.name, 0) for v in test.variants}
    small = [n for n, k in sizes.items() if k < need]
    out = {"per_arm_needed": need, "arms": sizes, "holdout": arm_sizes.get(HOLDOUT, 0),
           "rollout": arm_sizes.get(ROLLOUT, 0)}
    if small:
        out["warning"] = (f"audience too small for a {test.mde * 100:g} pp effect at {test.power:.0%} power: "
                          f"{', '.join(f'{n} has {sizes[n]}' for n in small)} of {need} needed per arm")
    return out


# ----------------------------------------------------------------------------- outcomes per arm

def arm_outcomes(engine, campaign_id: int) -> dict[str, dict[str, int]]:
    """Per test arm: sent, clickers (people), converters, repliers, opt-outs; messages of the roll-out
    (step 'ab-rollout') do not count."""
    from tasks.attribution import attributed_orders, attributed_replies, touches

    sql = ("SELECT o.idempotency_key AS key, o.variant, o.submitted_at, c.opted_out_at FROM outbox o "
           "LEFT JOIN contacts c ON c.id = o.contact_id WHERE o.campaign_id = :c AND o.variant IS NOT NULL "
           "AND o.submitted_at IS NOT NULL AND o.step = 'ab-test'")
    params: dict[str, Any] = {"c": campaign_id}
    with engine.connect() as conn:
        msgs = read_frame(conn, sql, params)
    clicked = set(touches(engine)[1]["key"])
    orders = attributed_orders(engine)
    revenue: dict[str, float] = {}
    for key, amount in zip(orders["key"], orders["amount"]):
        if isinstance(key, str):
            revenue[key] = revenue.get(key, 0.0) + float(amount)
    replied = set(attributed_replies(engine)["key"].dropna())
    out: dict[str, dict[str, int]] = {}
    for key, arm, sub, opted in zip(msgs["key"], msgs["variant"], msgs["submitted_at"], msgs["opted_out_at"]):
        a = out.setdefault(arm, {"sent": 0, "click_rate": 0, "conversion_rate": 0, "reply_rate": 0, "opt_outs": 0,
                                 "revenue": 0.0})
        a["sent"] += 1
        a["click_rate"] += key in clicked
        a["conversion_rate"] += key in revenue
        a["revenue"] += revenue.get(key, 0.0)
        a["reply_rate"] += key in replied
        if opted is not None and opted == opted and str(opted) > str(sub):
            a["opt_outs"] += 1
    return out


def holdout_lift(engine, campaign_id: int, started_at: datetime, days: float) -> dict[str, Any] | None:
    """Incremental effect against the holdout: the share of contacts who ordered and revenue per contact
    within ``days`` of the test's start, contacted (test arms) vs held out, with intervals (Newcombe for
    the difference of shares, Welch's t for revenue per contact; statsmodels)."""
    import numpy as np
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    end = started_at + timedelta(days=days)
    q = ("SELECT g.contact_id, COALESCE(SUM(CASE WHEN r.revenue AND r.ordered_at >= :s AND r.ordered_at < :e "
         "THEN r.amount END), 0) AS revenue, COUNT(CASE WHEN r.revenue AND r.ordered_at >= :s AND r.ordered_at < :e "
         "THEN 1 END) AS orders FROM ({g}) g LEFT JOIN orders r ON r.contact_id = g.contact_id GROUP BY g.contact_id")
    p = {"c": campaign_id, "s": started_at, "e": end}
    with engine.connect() as conn:
        held = read_frame(conn, q.format(g="SELECT contact_id FROM ab_members WHERE campaign_id = :c AND arm = 'holdout'"), p)
        sent = read_frame(conn, q.format(g="SELECT DISTINCT contact_id FROM outbox WHERE campaign_id = :c AND "
                                           "step = 'ab-test' AND submitted_at IS NOT NULL AND contact_id IS NOT NULL"), p)
    if len(held) < 2 or len(sent) < 2:
        return None
    k_s, k_h = int((sent["orders"] > 0).sum()), int((held["orders"] > 0).sum())
    rs, rh = sent["revenue"].astype(float).to_numpy(), held["revenue"].astype(float).to_numpy()
    cm = CompareMeans(DescrStatsW(rs), DescrStatsW(rh))
    low, high = cm.tconfint_diff(usevar="unequal") if (rs.var() + rh.var()) > 0 else (0.0, 0.0)
    return {"contacted": len(sent), "held_out": len(held), "conversion_contacted": k_s / len(sent),
            "conversion_held_out": k_h / len(held), "conversion_lift_ci": diff_ci(len(sent), k_s, len(held), k_h, 0.05),
            "revenue_per_contact_contacted": float(np.mean(rs)), "revenue_per_contact_held_out": float(np.mean(rh)),
            "revenue_per_contact_lift_ci": [float(low), float(high)], "days": days}


# ----------------------------------------------------------------------------- looks and the decision

def _verdict(test: ABTest, winner: str | None, arms: dict[str, tuple[int, int]], fixed: dict | None,
             reason: str) -> str:
    word = METRIC_WORDS[test.metric]
    ctl = test.control_name
    if winner and fixed and winner != ctl and winner in fixed["variants"]:
        v = fixed["variants"][winner]
        rc = arms[ctl][1] / arms[ctl][0]
        lo, hi = v["diff_ci"]
        return (f"{winner} wins: {(v['rate'] - rc) * 100:+.1f} pp {word} ({(1 - test.alpha):.0%} CI {lo * 100:+.1f} "
                f"to {hi * 100:+.1f} pp), {reason}")
    if winner:
        return f"{winner} wins: {reason}"
    more = more_needed([arms.get(v.name, (0, 0))[0] for v in test.variants], test.baseline, test.mde, test.alpha,
                       test.power)
    return f"not significant yet: about {more} more per arm needed ({reason})"


def _arms(test: ABTest, out: dict[str, dict]) -> tuple[dict[str, tuple[int, int]], dict | None]:
    """(arm -> (sent, events of the metric), the fixed-horizon ab_stats once every arm has sent)."""
    arms = {v.name: (out.get(v.name, {}).get("sent", 0), out.get(v.name, {}).get(test.metric, 0)) for v in test.variants}
    if not all(n > 0 for n, _ in arms.values()):
        return arms, None
    return arms, ab_stats([(n, *arms[n]) for n in arms], control=test.control_name, alpha=test.alpha,
                          split=test.shares())


def look(engine, campaign_id: int, now: datetime) -> dict[str, Any]:
    """One look: the numbers, the sequential verdict, logged; decides (once) on a winner or at the deadline."""
    loaded = load_test(engine, campaign_id)
    if loaded is None:
        raise ValueError(f"campaign {campaign_id} has no A/B test")
    test, row = loaded
    now = _naive(now)
    if row["phase"] != "test":
        return {"phase": row["phase"], "winner": row["winner"], "verdict": row["verdict"], "decided": False}
    out = arm_outcomes(engine, campaign_id)
    arms, fixed = _arms(test, out)
    opt_outs = {v.name: out.get(v.name, {}).get("opt_outs", 0) for v in test.variants}
    with engine.connect() as conn:
        last = conn.execute(text("SELECT numbers FROM ab_looks WHERE campaign_id = :c ORDER BY id DESC LIMIT 1"),
                            {"c": campaign_id}).scalar()
    last = (last if isinstance(last, dict) else json.loads(last)) if last else {}
    seq = sequential_look(arms, test, last.get("p_seq"), opt_outs, last.get("guard_p_seq"))
    winner, reason = seq["winner"], seq["reason"]
    deadline = row["started_at"] + timedelta(hours=test.deadline_hours)
    decide = winner is not None or now >= deadline
    verdict = _verdict(test, winner, arms, fixed, reason)
    if winner is None and decide:  # the deadline: what is known, and the configured fallback for the rest
        winner = test.control_name if test.fallback == "control" else None
        verdict = (f"no winner by the deadline ({verdict}); the rest gets "
                   + (f"the control {winner}" if winner else "nothing"))
    numbers = {**seq, "arms": {n: {"sent": a[0], "events": a[1], "opt_outs": opt_outs[n]} for n, a in arms.items()},
               "fixed": fixed, "metric": test.metric}
    decided = False
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO ab_looks (campaign_id, at, winner, reason, numbers) VALUES (:c, :t, :w, :r, :n)"),
                     {"c": campaign_id, "t": now, "w": winner if decide else None, "r": verdict,
                      "n": json.dumps(numbers, default=float)})
        if decide:
            decided = conn.execute(text("UPDATE ab_tests SET phase = 'decided', winner = :w, decided_at = :t, "
                                        "verdict = :v WHERE campaign_id = :c AND phase = 'test'"),
                                   {"w": winner, "t": now, "v": verdict, "c": campaign_id}).rowcount == 1
    return {"phase": "decided" if decide else "test", "winner": winner if decide else None, "verdict": verdict,
            "decided": decided, "numbers": numbers}


def finish_rollout(engine, campaign_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE ab_tests SET phase = 'rolled_out' WHERE campaign_id = :c AND phase = 'decided'"),
                     {"c": campaign_id})


def open_tests(engine, campaign: str | None = None) -> list[tuple[int, str]]:
    """(campaign id, name) of tests not rolled out yet."""
    sql = ("SELECT t.campaign_id, c.name FROM ab_tests t JOIN campaigns c ON c.id = t.campaign_id "
           "WHERE t.phase <> 'rolled_out'")
    params = {}
    if campaign:
        sql += " AND c.name = :n"
        params["n"] = campaign
    with engine.connect() as conn:
        return [(int(a), b) for a, b in conn.execute(text(sql + " ORDER BY t.campaign_id"), params)]


def ab_report(engine, campaign_id: int) -> dict[str, Any] | None:
    """Per test, for the report: arms with sizes and rates, the last look's numbers, the verdict, the
    decision log and the holdout lift."""
    from smsflow.settings import get_settings

    loaded = load_test(engine, campaign_id)
    if loaded is None:
        return None
    test, row = loaded
    with engine.connect() as conn:
        looks = conn.execute(text("SELECT at, winner, reason, numbers FROM ab_looks WHERE campaign_id = :c "
                                  "ORDER BY id"), {"c": campaign_id}).all()
        held = conn.execute(text("SELECT COUNT(*) FROM ab_members WHERE campaign_id = :c AND arm = 'holdout'"),
                            {"c": campaign_id}).scalar()
    out = arm_outcomes(engine, campaign_id)
    arms, fixed = _arms(test, out)
    last = looks[-1][3] if looks else None
    last = (last if isinstance(last, dict) else json.loads(last)) if last else {}
    return {"metric": test.metric, "control": test.control_name, "phase": row["phase"], "winner": row["winner"],
            "verdict": row["verdict"] or (looks[-1][2] if looks else "no look yet"),
            "arms": {n: {"sent": a[0], "events": a[1], "rate": (a[1] / a[0]) if a[0] else None,
                         "opt_outs": out.get(n, {}).get("opt_outs", 0),
                         "conversions": out.get(n, {}).get("conversion_rate", 0),
                         "revenue": round(out.get(n, {}).get("revenue", 0.0), 2)} for n, a in arms.items()},
            "held_out": int(held or 0), "fixed_horizon": fixed, "sequential_p": last.get("p_seq_adjusted"),
            "srm_p_value": (fixed or {}).get("srm_p_value"),
            "looks": [{"at": str(a), "winner": w, "verdict": r} for a, w, r, _ in looks],
            "holdout_lift": holdout_lift(engine, campaign_id, row["started_at"],
                                         get_settings().attribution_delivery_days) if held else None}
