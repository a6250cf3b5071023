"""Journeys against the store: CRM events -> instances -> steps due -> the outbox.

Every guarantee lives in the store, not in a running process:

* one instance per (journey, entity): a repeated or duplicated trigger starts nothing twice;
* one step row per (instance, step), and one outbox row per step (idempotency key
  ``journey:<journey>:<entity>:<step>``): each step sends at most once, across retries,
  reruns, duplicate webhooks and concurrent flow runs (a step moves ``scheduled -> planned``
  with a guarded UPDATE in the same transaction as its outbox insert);
* a delayed step is a row with ``due_at``; nothing sleeps. The flow asks Prefect for a
  scheduled "wake-up" run of its deployment at that minute (``flows/journey.py``); a catch-up
  schedule covers a lost wake-up;
* an exit (the order is cancelled, the customer replied or bought) cancels the later steps and
  withdraws messages still waiting in the outbox (e.g. deferred by a quiet window);
* quiet windows, consent, opt-outs and caps are the send path's (``tasks.policy``): a step due
  at night is planned now and deferred by the policy to the window's opening.

Events are processed in arrival order under a lock (SQLite: its single writer; PostgreSQL: an
advisory transaction lock), so two flow runs never interleave one entity's events.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.engine import Connection

from store.db import is_postgres
from store.models import JourneyInstance, JourneyStep
from tasks.journey_defs import EventMatch, Journey, Step, evaluate
from blocks.registry import load_crm
from smsflow.sms_encoding import sms_info
from store.db import get_engine
from store.events import insert_ignore, record_event  # noqa: F401 - record_event: the journeys' event writer
from store.models import Campaign
from tasks.policy import load_policy, resolve_timezone, zone
from smsflow.templates import RenderError, render_contact_links
from tasks.render import SHORT_LINK_FIELDS, render_extra, short_link_rows
from smsflow.phones import normalize_phones

ACTIVE, COMPLETED, EXITED = "active", "completed", "exited"
TERMINAL_STEP_STATES = ("planned", "skipped", "cancelled", "failed")
_RESERVED = {"id", "type", "entity_id", "data"}
_LOCK_KEY = 784_311_002  # PostgreSQL advisory lock of the journey processor


@dataclass
class JourneyStats:
    events: int = 0
    started: int = 0
    scheduled: int = 0
    exited: int = 0
    planned: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: int = 0
    withdrawn: int = 0
    completed: int = 0
    campaigns: list[str] = field(default_factory=list)  # journey campaigns with messages to send

    def add(self, other: "JourneyStats") -> None:
        for k, v in vars(other).items():
            if isinstance(v, int):
                setattr(self, k, getattr(self, k) + v)
        self.campaigns = sorted(set(self.campaigns) | set(other.campaigns))


def _naive(dt: datetime | None) -> datetime:
    dt = dt or datetime.now(timezone.utc)
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt


def _dt(v: Any) -> datetime | None:
    if v is None or isinstance(v, datetime):
        return v
    return datetime.fromisoformat(str(v))


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else (v or {})


def _lock(conn: Connection) -> None:
    """Serialise journey processing (SQLite already holds its write lock: BEGIN IMMEDIATE)."""
    if is_postgres(conn):
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})


def _insert_ignore(conn: Connection, table, values: dict[str, Any]) -> bool:
    """INSERT .. ON CONFLICT DO NOTHING; True when the row is new."""
    return insert_ignore(conn, table, values) is not None


# ----------------------------------------------------------------------------- events


def event_fields(event_type: str, payload: Any) -> dict[str, Any]:
    """The entity data an event carries: its top-level fields plus a nested ``data`` mapping."""
    p = _json(payload)
    out = {k: v for k, v in p.items() if k not in _RESERVED} if isinstance(p, dict) else {}
    if isinstance(p, dict) and isinstance(p.get("data"), dict):
        out.update(p["data"])
    out["event_type"] = event_type
    return out


def entity_key(source: str, entity_id: str) -> str:
    return f"{source}:{entity_id}"


def _resolve_contact(conn: Connection, j: Journey, source: str, fields: dict[str, Any],
                     entity_id: str | None = None) -> tuple[int | None, str | None, str | None]:
    """(contact id, E.164 phone, language) of the customer an event names: by CRM id (same source
    preferred), else by phone number; an unknown customer with a phone still gets transactional
    messages (the send-time policy decides)."""

    crm_id = fields.get(j.contact.crm_id) if j.contact.crm_id else None
    lang = fields.get(j.contact.language) if j.contact.language else None
    raw_phone = fields.get(j.contact.phone) if j.contact.phone else None
    if crm_id in (None, "") and not raw_phone and j.contact.crm_block:
        found = _crm_block(j.contact.crm_block).event_customer(
            str(fields.get("event_type")), entity_id, fields) or {}
        crm_id, raw_phone, lang = found.get("crm_id"), found.get("phone"), found.get("language") or lang
    row = None
    if crm_id not in (None, ""):
        row = conn.execute(text(
            "SELECT id, phone_e164, language FROM contacts WHERE crm_id = :c AND status = 'valid' "
            "ORDER BY CASE WHEN source = :s THEN 0 ELSE 1 END, id LIMIT 1"), {"c": str(crm_id), "s": source}).first()
    phone = None
    if row is None and raw_phone:
        import pandas as pd

        phone = normalize_phones(pd.Series([str(raw_phone)]))["phone_e164"].iloc[0] or None
        if phone:
            row = conn.execute(text("SELECT id, phone_e164, language FROM contacts WHERE phone_e164 = :p "
                                    "AND status = 'valid' ORDER BY id LIMIT 1"), {"p": phone}).first()
    if row is not None:
        return int(row[0]), row[1], row[2] or lang
    return None, phone, lang


_BLOCKS: dict[str, Any] = {}


def _crm_block(name: str):
    """A CRM source Block, loaded once per process."""
    if name not in _BLOCKS:

        _BLOCKS[name] = load_crm(name)
    return _BLOCKS[name]


def _schedule(conn: Connection, instance_id: int, step: Step, at: datetime, now: datetime) -> bool:
    return _insert_ignore(conn, JourneyStep.__table__, dict(
        instance_id=instance_id, step=step.name, due_at=at + step.delay, status="scheduled",
        created_at=now, updated_at=now))


def start_instance(conn: Connection, j: Journey, entity: str, source: str | None, contact: tuple, data: dict,
                   started_at: datetime, now: datetime, stats: JourneyStats) -> int | None:
    """Create the instance (once per entity) and schedule the steps that start with it."""
    contact_id, phone, lang = contact
    new = _insert_ignore(conn, JourneyInstance.__table__, dict(
        journey=j.name, entity_id=entity, source=source, contact_id=contact_id, phone_e164=phone, language=lang,
        data=data, status=ACTIVE, started_at=started_at, updated_at=now))
    if not new:
        return None
    iid = conn.execute(select(JourneyInstance.id).where(JourneyInstance.journey == j.name,
                                                        JourneyInstance.entity_id == entity)).scalar_one()
    stats.started += 1
    for step in j.steps:
        if step.wait_for is None and _schedule(conn, iid, step, started_at, now):
            stats.scheduled += 1
    return iid


def exit_instance(conn: Connection, instance_id: int, reason: str, now: datetime, stats: JourneyStats) -> None:
    """Stop an instance: later steps cancelled, its messages still waiting in the outbox withdrawn
    (state 'expired', JOURNEY_EXITED). Messages already handed to the gateway are not recalled."""
    done = conn.execute(update(JourneyInstance).where(JourneyInstance.id == instance_id, JourneyInstance.status == ACTIVE)
                        .values(status=EXITED, exit_reason=reason, ended_at=now, updated_at=now)).rowcount
    if not done:
        return
    stats.exited += 1
    stats.cancelled += conn.execute(
        update(JourneyStep).where(JourneyStep.instance_id == instance_id, JourneyStep.status == "scheduled")
        .values(status="cancelled", reason=f"journey exited: {reason}", updated_at=now)).rowcount or 0
    planned = conn.execute(select(JourneyStep.id, JourneyStep.outbox_key).where(
        JourneyStep.instance_id == instance_id, JourneyStep.status == "planned")).all()
    for sid, key in planned:
        n = conn.execute(text(
            "UPDATE outbox SET state = 'expired', error_code = 'JOURNEY_EXITED', hold_rule = 'journey_exited', "
            "last_error = :r, final_at = :now, updated_at = :now WHERE idempotency_key = :k AND state = 'planned'"),
            {"r": f"journey exited before sending: {reason}", "now": now, "k": key}).rowcount
        if n:
            stats.withdrawn += 1
            conn.execute(update(JourneyStep).where(JourneyStep.id == sid).values(
                status="cancelled", reason=f"withdrawn from the outbox: {reason}", updated_at=now))


def _apply_event(conn: Connection, journeys: list[Journey], ev, now: datetime, stats: JourneyStats) -> None:
    _, source, etype, entity_id, payload, received_at = ev
    at = _dt(received_at) or now
    fields = event_fields(etype, payload)
    for j in journeys:
        contact = None
        if entity_id is not None:
            ent = entity_key(source, str(entity_id))
            inst = conn.execute(select(JourneyInstance.id, JourneyInstance.status, JourneyInstance.data).where(
                JourneyInstance.journey == j.name, JourneyInstance.entity_id == ent)).first()
            if inst is None:
                if j.trigger.kind == "event" and j.trigger.as_match().matches(etype, fields):
                    contact = _resolve_contact(conn, j, source, fields, entity_id)
                    start_instance(conn, j, ent, source, contact, fields, at, now, stats)
            elif inst.status == ACTIVE:
                data = {**_json(inst.data), **fields}
                conn.execute(update(JourneyInstance).where(JourneyInstance.id == inst.id).values(data=data, updated_at=now))
                rule = next((r for r in j.exit if r.scope == "entity" and r.matches(etype, data)), None)
                if rule is not None:
                    exit_instance(conn, inst.id, f"{etype} ({rule.describe()})", now, stats)
                else:
                    for step in j.steps:
                        if step.wait_for is not None and step.wait_for.scope == "entity" and step.wait_for.matches(etype, data) \
                                and _schedule(conn, inst.id, step, at, now):
                            stats.scheduled += 1
        contact_rules = [r for r in j.exit if r.scope == "contact" and r.matches(etype, fields)]
        if contact_rules:
            cid, phone, _ = contact or _resolve_contact(conn, j, source, fields, entity_id)
            if cid is None and not phone:
                continue
            cond = JourneyInstance.contact_id == cid if cid is not None else JourneyInstance.phone_e164 == phone
            for (iid,) in conn.execute(select(JourneyInstance.id).where(
                    JourneyInstance.journey == j.name, JourneyInstance.status == ACTIVE, cond,
                    JourneyInstance.started_at <= at)).all():
                exit_instance(conn, iid, f"{etype} ({contact_rules[0].describe()})", now, stats)


def process_events(engine, journeys: list[Journey], now: datetime | None = None, batch: int = 500) -> JourneyStats:
    """Apply every unprocessed CRM event, oldest first, in batches (one transaction each)."""
    now = _naive(now)
    stats = JourneyStats()
    while True:
        with engine.begin() as conn:
            _lock(conn)
            evs = conn.execute(text(
                "SELECT id, source, event_type, entity_id, payload, received_at FROM crm_events "
                "WHERE processed_at IS NULL ORDER BY id LIMIT :n"), {"n": batch}).all()
            for ev in evs:
                _apply_event(conn, journeys, ev, now, stats)
            if evs:
                ids = ",".join(str(int(e[0])) for e in evs)
                conn.execute(text(f"UPDATE crm_events SET processed_at = :now WHERE id IN ({ids})"), {"now": now})
        stats.events += len(evs)
        if len(evs) < batch:
            return stats


def _exit_matching(engine, journeys: list[Journey], wanted, query, reason: str, now: datetime | None,
                   keep=lambda rows: {int(r[0]) for r in rows}) -> JourneyStats:
    """Exit the active instances of the journeys ``wanted(journey)`` selects that ``query(marks)`` finds
    (its first column the instance id; ``keep(rows)`` picks the ids)."""
    now = _naive(now)
    stats = JourneyStats()
    names = [j.name for j in journeys if wanted(j)]
    if not names:
        return stats
    with engine.begin() as conn:
        _lock(conn)
        marks = ",".join(f":j{i}" for i in range(len(names)))
        rows = conn.execute(query(marks), {f"j{i}": n for i, n in enumerate(names)}).all()
        for iid in sorted(keep(rows)):
            exit_instance(conn, iid, reason, now, stats)
    return stats


def exit_on_replies(engine, journeys: list[Journey], now: datetime | None = None) -> JourneyStats:
    """Journeys with ``exit_on_reply``: an SMS from the customer after the journey started ends it."""
    return _exit_matching(engine, journeys, lambda j: j.exit_on_reply, lambda marks: text(
        "SELECT DISTINCT i.id FROM journey_instances i JOIN inbound_messages m ON m.from_e164 = i.phone_e164 "
        f"WHERE i.journey IN ({marks}) AND i.status = 'active' AND m.received_at >= i.started_at"),
        "the customer replied", now)


def exit_on_clicks(engine, journeys: list[Journey], now: datetime | None = None) -> JourneyStats:
    """Journeys with ``exit_on_click``: a person's click on a link of one of the instance's messages ends
    it (what counts as a person: tasks/clicks.py; previews and bots do not)."""
    from sqlalchemy import DateTime

    from tasks.clicks import is_human

    return _exit_matching(engine, journeys, lambda j: j.exit_on_click, lambda marks: text(
        "SELECT i.id, c.at, c.bot_reason, o.final_at, o.state FROM journey_instances i "
        "JOIN journey_steps s ON s.instance_id = i.id JOIN short_links l ON l.outbox_key = s.outbox_key "
        "JOIN clicks c ON c.code = l.code LEFT JOIN outbox o ON o.idempotency_key = l.outbox_key "
        f"WHERE i.journey IN ({marks}) AND i.status = 'active' AND c.bot_reason IS NULL")
        .columns(at=DateTime, final_at=DateTime), "the customer clicked the link", now,
        keep=lambda rows: {int(iid) for iid, at, bot, fin, state in rows
                           if is_human(bot, at, fin, state)})


# ----------------------------------------------------------------------------- date and inactivity triggers


def _local_date_trigger(value: Any, today: date) -> bool:
    """Does a stored date (YYYY-MM-DD...) fall on ``today`` (29 Feb counts on 28 Feb in other years)?"""
    try:
        d = date.fromisoformat(str(value)[:10])
    except ValueError:
        return False
    if (d.month, d.day) == (today.month, today.day):
        return True
    leap = today.year % 4 == 0 and (today.year % 100 != 0 or today.year % 400 == 0)
    return (d.month, d.day) == (2, 29) and not leap and (today.month, today.day) == (2, 28)


def _candidates(conn: Connection, t, now: datetime) -> list[tuple]:
    """Contacts that may fire a date or inactivity trigger now, narrowed in SQL so a scan every few
    minutes does not walk every contact: a date field whose month-day is within a day of today's
    (every time zone's local date is), or a last activity on or before ``now - inactive_days``.
    The exact local-time check is the caller's."""
    attribute = t.date_field or t.activity_field
    expr = "attributes ->> :a" if is_postgres(conn) else "json_extract(attributes, '$.' || :a)"
    params: dict[str, Any] = {"a": attribute}
    if t.kind == "date":
        days = {(now.date() + timedelta(days=d)).strftime("%m-%d") for d in (-1, 0, 1)} | {"02-29"}
        params.update({f"d{i}": d for i, d in enumerate(sorted(days))})
        narrow = f"substr({expr}, 6, 5) IN ({','.join(f':d{i}' for i in range(len(days)))})"
    else:
        params["cut"] = (now - timedelta(days=t.inactive_days)).date().isoformat()
        narrow = f"substr({expr}, 1, 10) <= :cut"
    return conn.execute(text(
        f"SELECT id, phone_e164, language, timezone, {expr} FROM contacts WHERE status = 'valid' "
        f"AND {expr} IS NOT NULL AND {expr} <> '' AND {narrow}"), params).all()


def scan_contact_triggers(engine, journeys: list[Journey], now: datetime | None = None) -> JourneyStats:
    """Date triggers (a birthday at ``at`` local time, once a year) and inactivity triggers
    (no activity for N days, once per quiet spell): instances keyed by contact and anchor.
    A value that is not a date is skipped (CRM data must not stop the scan)."""

    now = _naive(now)
    aware = now.replace(tzinfo=timezone.utc)
    stats = JourneyStats()
    for j in journeys:
        t = j.trigger
        if t.kind == "event":
            continue
        default_tz = load_policy(j.policy).default_timezone
        with engine.begin() as conn:
            _lock(conn)
            started = set()
            if t.kind == "inactivity":  # long-quiet contacts match every scan: skip known spells in one query
                started = set(conn.execute(select(JourneyInstance.entity_id).where(
                    JourneyInstance.journey == j.name)).scalars())
            for cid, phone, lang, tz, value in _candidates(conn, t, now):
                tz_name, _ = resolve_timezone(tz, phone, default_tz)
                if t.kind == "date":
                    local = aware.astimezone(zone(tz_name))
                    if not _local_date_trigger(value, local.date()):
                        continue
                    ent = f"contact:{cid}:{t.date_field}:{local.year}"
                    start = datetime.combine(local.date(), t.at, tzinfo=zone(tz_name)).astimezone(timezone.utc)
                else:
                    try:
                        last = _dt(str(value)[:19].replace(" ", "T"))
                    except ValueError:
                        continue
                    if now - last < timedelta(days=t.inactive_days):
                        continue
                    ent = f"contact:{cid}:inactive:{last.date().isoformat()}"
                    if ent in started:
                        continue
                    start = aware  # from when we notice: a late scan must not fire every step at once
                # once per entity: start_instance inserts with ON CONFLICT DO NOTHING
                start_instance(conn, j, ent, "contacts", (int(cid), phone, lang), {}, _naive(start), now, stats)
    return stats


# ----------------------------------------------------------------------------- due steps -> outbox


def _campaign_id(conn: Connection, j: Journey, step: Step, gateway: str | None, now: datetime) -> int:

    name = j.campaign_name(step)
    _insert_ignore(conn, Campaign.__table__, dict(
        name=name, source="journey", segment="-", template_name=f"{j.name}.{step.name}", kind=j.kind_of(step),
        gateway=j.gateway or gateway, price_per_segment=j.price_per_segment, status="running",
        params={"journey": j.name, "step": step.name}, created_at=now, started_at=now,
        **({"policy": j.policy} if j.policy is not None else {})))
    return int(conn.execute(select(Campaign.id).where(Campaign.name == name)).scalar_one())


def _contact_context(conn: Connection, contact_id: int | None) -> dict[str, Any]:
    if contact_id is None:
        return {}
    row = conn.execute(text("SELECT first_name, last_name, email, language, timezone, attributes, phone_e164 "
                            "FROM contacts WHERE id = :i"), {"i": contact_id}).mappings().first()
    if row is None:
        return {}
    out = dict(row)
    out["attributes"] = _json(out["attributes"]) or None
    return out


def _plan_one(conn: Connection, j: Journey, step: Step, row, gateway: str | None, now: datetime,
              stats: JourneyStats) -> None:

    def finish(status: str, reason: str | None = None, key: str | None = None) -> bool:
        return bool(conn.execute(update(JourneyStep).where(JourneyStep.id == row.step_id, JourneyStep.status == "scheduled")
                                 .values(status=status, reason=reason, outbox_key=key, updated_at=now)).rowcount)

    contact = _contact_context(conn, row.contact_id)
    data = _json(row.data)
    ctx = {**contact, **data}
    if not ctx.get("language"):
        ctx["language"] = contact.get("language") or row.language
    ok, why = evaluate(step.condition, {**(contact.get("attributes") or {}), **ctx})
    if not ok:
        if finish("skipped", why or f"condition false: {step.condition}"):
            stats.skipped += 1
        return
    phone = contact.get("phone_e164") or row.phone_e164
    if not phone:
        if finish("failed", "no phone number for this customer"):
            stats.failed += 1
        return
    try:
        lang, body, links = render_contact_links(ctx, j.template_for(step), render_extra(None))
    except RenderError as exc:
        if finish("failed", str(exc)):
            stats.failed += 1
        return
    key = f"journey:{j.name}:{row.entity_id}:{step.name}"
    if not finish("planned", None, key):
        return  # another run planned (or cancelled) it in the meantime: nothing twice
    cid = _campaign_id(conn, j, step, gateway, now)
    link_rows = None
    if links:  # tracked short links: a taken code is replaced in the text before it is stored
        msg = {"contact_id": row.contact_id or 0, "links": links, "text": body}
        link_rows = short_link_rows(conn, [msg], cid, step.name, now, key=lambda _c: key)
        body = msg["text"]
    info = sms_info(body)
    conn.execute(text(
        "INSERT INTO outbox (idempotency_key, campaign_id, contact_id, step, phone_e164, language, text, encoding, "
        "segments, cost, state, attempts, gateway, planned_at, updated_at) VALUES (:k, :c, :ct, :st, :p, :l, :t, :e, "
        ":s, :cost, 'planned', 0, :g, :now, :now) ON CONFLICT (idempotency_key) DO NOTHING"),
        {"k": key, "c": cid, "ct": row.contact_id, "st": step.name[:60], "p": phone, "l": lang, "t": body,
         "e": info.encoding, "s": info.segments, "cost": info.segments * j.price_per_segment,
         "g": j.gateway or gateway, "now": now})
    if link_rows:
        from store.db import bulk_insert

        bulk_insert(conn, "short_links", SHORT_LINK_FIELDS, link_rows, on_conflict="ignore",
                    conflict_columns=("code",))
    stats.planned += 1
    stats.campaigns = sorted(set(stats.campaigns) | {j.campaign_name(step)})


def plan_due_steps(engine, journeys: list[Journey], now: datetime | None = None, gateway: str | None = None,
                   batch: int = 1000) -> JourneyStats:
    """Every step due by ``now`` of an active instance: condition on current data, render, outbox."""
    now = _naive(now)
    by_name = {j.name: j for j in journeys}
    stats = JourneyStats()
    while True:
        with engine.begin() as conn:
            _lock(conn)
            rows = conn.execute(text(
                "SELECT s.id AS step_id, s.step, i.id AS instance_id, i.journey, i.entity_id, i.contact_id, "
                "i.phone_e164, i.language, i.data FROM journey_steps s JOIN journey_instances i ON i.id = s.instance_id "
                "WHERE s.status = 'scheduled' AND s.due_at <= :now AND i.status = 'active' ORDER BY s.due_at, s.id "
                "LIMIT :n"), {"now": now, "n": batch}).all()
            for row in rows:
                j = by_name.get(row.journey)
                step = next((s for s in j.steps if s.name == row.step), None) if j else None
                if step is None:
                    conn.execute(update(JourneyStep).where(JourneyStep.id == row.step_id).values(
                        status="skipped", reason="journey or step no longer defined", updated_at=now))
                    stats.skipped += 1
                    continue
                _plan_one(conn, j, step, row, gateway, now, stats)
        if len(rows) < batch:
            break
    stats.completed = complete_instances(engine, journeys, now)
    return stats


def complete_instances(engine, journeys: list[Journey], now: datetime | None = None) -> int:
    """Active instances whose every step has reached a final step state are completed."""
    now = _naive(now)
    n = 0
    with engine.begin() as conn:
        for j in journeys:
            marks = ",".join(f"'{s}'" for s in TERMINAL_STEP_STATES)
            n += conn.execute(text(
                "UPDATE journey_instances SET status = 'completed', ended_at = :now, updated_at = :now "
                "WHERE journey = :j AND status = 'active' AND (SELECT COUNT(*) FROM journey_steps s WHERE "
                f"s.instance_id = journey_instances.id AND s.status IN ({marks})) >= :k"),
                {"now": now, "j": j.name, "k": len(j.steps)}).rowcount or 0
    return n


def journey_campaigns_due(engine, now: datetime | None = None) -> list[tuple[str, str | None]]:
    """(name, gateway) of journey campaigns with planned messages due now (deferred ones whose window opened too)."""
    now = _naive(now)
    with engine.begin() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT DISTINCT c.name, c.gateway FROM campaigns c JOIN outbox o ON o.campaign_id = c.id WHERE c.source = 'journey' "
            "AND o.state = 'planned' AND (o.send_after IS NULL OR o.send_after <= :now) ORDER BY c.name"), {"now": now})]


# ----------------------------------------------------------------------------- wake-ups (Prefect scheduled runs)


def _ceil_minute(dt: datetime) -> datetime:
    floor = dt.replace(second=0, microsecond=0)
    return floor if floor == dt else floor + timedelta(minutes=1)


def wakeups_needed(engine, now: datetime | None = None) -> dict[datetime, list[int]]:
    """Future moments something becomes due, by minute: steps without a wake-up run yet (with
    their ids), and messages deferred by the contact policy (no ids: idempotent by time)."""
    now = _naive(now)
    out: dict[datetime, list[int]] = {}
    with engine.begin() as conn:
        for sid, due in conn.execute(text("SELECT id, due_at FROM journey_steps WHERE status = 'scheduled' "
                                          "AND due_at > :now AND wake_run_id IS NULL"), {"now": now}):
            out.setdefault(_ceil_minute(_dt(due)), []).append(int(sid))
        for (after,) in conn.execute(text(
                "SELECT DISTINCT o.send_after FROM outbox o JOIN campaigns c ON c.id = o.campaign_id WHERE "
                "c.source = 'journey' AND o.state = 'planned' AND o.send_after > :now"), {"now": now}):
            out.setdefault(_ceil_minute(_dt(after)), [])
    return out


def set_wake_run(engine, step_ids: list[int], run_id: str) -> None:
    if step_ids:
        with engine.begin() as conn:
            conn.execute(update(JourneyStep).where(JourneyStep.id.in_(step_ids)).values(wake_run_id=run_id))


def orphan_wake_runs(engine) -> list[str]:
    """Wake-up runs no scheduled step needs any more (every step they were for was cancelled)."""
    with engine.begin() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT DISTINCT wake_run_id FROM journey_steps WHERE status IN ('cancelled', 'skipped') "
            "AND wake_run_id IS NOT NULL AND wake_run_id NOT IN (SELECT wake_run_id FROM journey_steps "
            "WHERE status = 'scheduled' AND wake_run_id IS NOT NULL)"))]


def forget_wake_runs(engine, run_ids: list[str]) -> None:
    if run_ids:
        with engine.begin() as conn:
            conn.execute(update(JourneyStep).where(JourneyStep.wake_run_id.in_(run_ids),
                                                   JourneyStep.status != "scheduled").values(wake_run_id=None))


def wake_run_name(at: datetime) -> str:
    return f"journey-wake-{at:%Y%m%dT%H%M}Z"


def schedule_wakeups(deployment_id, wakeups: dict[datetime, list[int]], engine) -> int:
    """One scheduled flow run of the journey deployment per due minute. Idempotent: the server
    returns the existing run for a repeated idempotency key. A wake-up for steps is keyed by its
    minute and first step (a cancelled wake-up is never handed to other steps); a wake-up for
    deferred messages by its minute alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    n = 0
    with get_client(sync_client=True) as client:
        for at, step_ids in sorted(wakeups.items()):
            name = wake_run_name(at)
            key = f"{name}:step-{min(step_ids)}" if step_ids else f"{name}:send"
            run = client.create_flow_run_from_deployment(
                deployment_id, state=Scheduled(scheduled_time=at.replace(tzinfo=timezone.utc)), name=name,
                idempotency_key=key, tags=["journey-wake"])
            set_wake_run(engine, step_ids, str(run.id))
            n += 1
    return n


def cancel_runs(run_ids: list[str]) -> int:
    """Cancel scheduled wake-up runs that nothing needs (only while they are still scheduled)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    n = 0
    with get_client(sync_client=True) as client:
        for rid in run_ids:
            run = client.read_flow_run(rid)
            if run.state is not None and run.state.is_scheduled():
                client.set_flow_run_state(rid, Cancelled(message="every journey step it was for was cancelled"))
                n += 1
    return n


# ----------------------------------------------------------------------------- Prefect tasks
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.retrying import retry_if_transient  # noqa: E402


@task(name="journey-events", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def journey_events_task(journeys: list[Journey], database_url: str | None, now: datetime | None) -> JourneyStats:
    """CRM events -> instances, step schedules and exits; replies end journeys that ask for it."""

    engine = get_engine(database_url)
    stats = process_events(engine, journeys, now)
    stats.add(exit_on_replies(engine, journeys, now))
    stats.add(exit_on_clicks(engine, journeys, now))
    return stats


@task(name="journey-contact-triggers", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def journey_triggers_task(journeys: list[Journey], database_url: str | None, now: datetime | None) -> JourneyStats:

    return scan_contact_triggers(get_engine(database_url), journeys, now)


@task(name="journey-due-steps", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def journey_plan_task(journeys: list[Journey], gateway: str, database_url: str | None, now: datetime | None) -> JourneyStats:
    """Due steps -> the outbox (a retry finds planned steps planned: nothing twice)."""

    return plan_due_steps(get_engine(database_url), journeys, now, gateway)
