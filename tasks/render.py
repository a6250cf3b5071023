"""Render a campaign into the outbox: one planned message per (campaign, contact, step).

Creating a message twice is a no-op (unique idempotency key), so a rerun only renders the
contacts that have no message yet. Contacts without consent or opted out are not planned;
a template that fails for one contact quarantines that message with the reason.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from datetime import datetime, timezone
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from sqlalchemy import bindparam, text

from smsflow.templates import MessageTemplate, init_render_worker, load_template, render_batch, worker_args  # noqa: F401
from store.db import Columns, bulk_insert, get_engine, read_frame, refresh_statistics, utcnow
from store.quarantine import write_quarantine
from tasks.accounting import ensure_campaign
from tasks.extract import gc_paused

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
    "variant",
)


def open_campaign(engine, *, name: str, template: str, source: str, segment: str, price_per_segment: float,
                  gateway: str | None, policy=None, ends_at: datetime | None = None, sender_name: str | None = None,
                  currency: str = "RUB") -> tuple[int, MessageTemplate]:
    """The campaign (created, or reopened when rerun by name) and its template, loaded and checked first:
    a broken template fails here, before any contact is rendered. A marketing template without its own
    sender name gets the gateway's (marketing always names its sender)."""
    tpl = campaign_template(template, sender_name)
    cid = ensure_campaign(engine, name=name, source=source, segment=segment, template_name=tpl.name, kind=tpl.kind,
                          gateway=gateway, price_per_segment=price_per_segment,
                          policy=policy.model_dump(mode="json") if policy else None, ends_at=_naive_utc(ends_at),
                          currency=currency)
    return cid, tpl


def campaign_template(template: str, sender_name: str | None = None) -> MessageTemplate:
    """The template loaded and checked; a marketing one without its own sender name gets ``sender_name``."""
    tpl = load_template(template)
    if tpl.uses_links:  # one clear error before anything is rendered, not a quarantined row per contact
        from smsflow.links import check_base
        from smsflow.settings import get_settings
        from smsflow.templates import TemplateLoadError

        try:
            check_base(get_settings().link_base_url)
        except ValueError as exc:
            raise TemplateLoadError(f"template {tpl.name!r}: {exc}", template=tpl.name, path=tpl.origin) from None
    if tpl.kind == "marketing" and not tpl.sender_name and sender_name:
        tpl = dataclasses.replace(tpl, sender_name=sender_name)
    return tpl


def render_extra(campaign: str | None, utm: dict[str, str] | None = None) -> dict[str, Any]:
    """Campaign-wide values of a render: ``campaign`` for templates, the short-link base and UTM for link()."""
    from smsflow.settings import get_settings

    return {**({"campaign": campaign} if campaign else {}), "link_base": get_settings().link_base_url,
            "utm": utm or None}


def _naive_utc(t: datetime | None) -> datetime | None:
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(timezone.utc).replace(tzinfo=None)


def idempotency_key(campaign_id: int, contact_id: int, step: str = "main") -> str:
    return f"c{campaign_id}:{contact_id}:{step}"


@dataclass
class PlanStats:
    candidates: int = 0
    no_consent: int = 0
    planned: int = 0
    already_planned: int = 0
    render_failed: int = 0
    global_holdout: int = 0  # kept from all marketing (SMSFLOW_GLOBAL_HOLDOUT)
    segments: int = 0
    cost: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def result(self, currency: str) -> dict[str, Any]:
        """What the render step reports (the render flow, the dry run): counts, parts and planned cost."""
        return {"planned": self.planned, "no_consent": self.no_consent, "render_failed": self.render_failed,
                "parts": self.segments, "cost_planned": round(self.cost, 4), "currency": currency,
                **({"global_holdout": self.global_holdout} if self.global_holdout else {})}


def _render_chunk(args: tuple[list[dict[str, Any]], MessageTemplate, float, dict[str, Any]]):
    contacts, template, price, extra = args
    return render_batch(contacts, template, price_per_segment=price, extra=extra)


_CANDIDATES_SQL = (
    "SELECT c.id AS contact_id, c.first_name, c.last_name, c.email, c.language, c.timezone, "
    "c.phone_e164, c.sms_consent, c.opted_out_at, {attributes} AS attributes "
    "FROM segment_memberships m JOIN contacts c ON c.id = m.contact_id "
    "WHERE m.segment = :g AND c.source = :s AND c.status = 'valid' "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.campaign_id = :cid AND o.contact_id = c.id) "
    "AND m.contact_id > :lo AND c.id > :lo "
)

# the id that closes a page: the page_size-th member after the last page (an index-only range of the
# membership key), so each page's query has both id bounds
_PAGE_END_SQL = ("SELECT contact_id FROM segment_memberships WHERE segment = :g AND contact_id > :lo "
                 "ORDER BY contact_id LIMIT 1 OFFSET :skip")


def _page_end(engine, segment: str, lo: int, page_size: int) -> int | None:
    """The contact id closing the page of ``page_size`` segment members after ``lo``; None: fewer are left."""
    with engine.connect() as conn:
        return conn.execute(text(_PAGE_END_SQL), {"g": segment, "lo": lo, "skip": page_size - 1}).scalar()


# names a template can read that never come from a contact's CRM attributes: the extract keeps its contact
# columns out of them (tasks.extract._attributes); contact_id and phone_e164 of a candidate are never empty, so
# they always win over an attribute of that name; link() is set after the contact's keys
_NEVER_ATTRIBUTES = frozenset({"first_name", "last_name", "email", "language", "timezone", "contact_id",
                               "phone_e164", "link"})


def needs_attributes(*templates: MessageTemplate) -> bool:
    """Whether rendering these templates can read a contact's CRM attributes (any name outside
    ``_NEVER_ATTRIBUTES``, ``attributes`` itself included). When not, the candidates are read without them:
    the JSON is neither sent by the store nor parsed here (1M contacts, a first-name template: ~1.5 CPU s per
    render worker in JSON parsing alone)."""
    return any(not t.variables <= _NEVER_ATTRIBUTES for t in templates)


def _contacts_for(engine, campaign_id: int, source: str, segment: str, lo: int = -1, hi: int | None = None,
                  attributes: bool = True):
    """Candidates of the campaign with ids in (``lo``, ``hi``], in id order. Both bounds apply to the
    membership key and to the contacts' key: each page reads its id range from both indexes (with only a
    lower bound and a LIMIT, PostgreSQL scanned the segment's whole membership once per page: quadratic).
    Without ``attributes`` (see :func:`needs_attributes`) their column is NULL."""
    sql = _CANDIDATES_SQL.format(attributes="c.attributes" if attributes else "NULL")
    params: dict[str, Any] = {"g": segment, "s": source, "cid": campaign_id, "lo": lo}
    if hi is not None:
        sql += "AND m.contact_id <= :hi AND c.id <= :hi "
        params["hi"] = hi
    sql += "ORDER BY c.id"
    with engine.begin() as conn:
        return read_frame(conn, sql, params, objects=True)  # object columns: no str-dtype round trip


def _records(df) -> list[dict[str, Any]]:
    """Contacts with consent as render records; attributes stay JSON text (the renderer parses them)."""
    cols = list(df.columns)
    ids = df["contact_id"].astype("int64").tolist()
    values = [ids if c == "contact_id" else _plain(df[c]) for c in cols]
    out = [dict(zip(cols, row)) for row in zip(*values)]
    for r in out:
        a = r["attributes"]
        if not a:
            r["attributes"] = {}
    return out


def _plain(col) -> list:
    """Column values with every missing one as None."""
    values = col.tolist()
    if col.dtype == object and all(v is None or type(v) in (str, int) for v in values):
        return values
    return col.astype(object).where(col.notna(), None).tolist()


def _holdout(marketing: bool) -> tuple[float, str]:
    """The global holdout's share (0 outside marketing) and salt (setting SMSFLOW_GLOBAL_HOLDOUT)."""
    from smsflow.settings import get_settings

    s = get_settings()
    return (s.global_holdout if marketing else 0.0), s.global_holdout_salt


def _ranges(engine, segment: str, page_size: int, ids: tuple[int, int] | None = None):
    """(lo, hi) id ranges of ``page_size`` segment members each, in id order (only ids lo..hi when given);
    the last range's ``hi`` is None when no upper id bound was given."""
    lo = ids[0] - 1 if ids else -1
    upto = ids[1] if ids else None
    while True:
        end = _page_end(engine, segment, lo, page_size)
        if end is None or (upto is not None and end >= upto):
            yield lo, upto
            return
        yield lo, end
        lo = end


def _page(engine, campaign_id: int, source: str, segment: str, lo: int, hi: int | None, stats: PlanStats,
          holdout: tuple[float, str], attributes: bool = True) -> list[dict[str, Any]]:
    """The consenting candidates with ids in (``lo``, ``hi``] as render records (counted in ``stats``);
    marketing leaves out the global holdout (smsflow/abtest.py)."""
    from smsflow.abtest import in_global_holdout

    share, salt = holdout
    df = _contacts_for(engine, campaign_id, source, segment, lo=lo, hi=hi, attributes=attributes)
    n_raw = len(df)
    stats.candidates += n_raw
    if n_raw:
        consent = df["sms_consent"].astype(bool) & df["opted_out_at"].isna()
        stats.no_consent += int((~consent).sum())
        df = df[consent.to_numpy()]
    if share and len(df):
        keep = [not in_global_holdout(share, salt, p) for p in df["phone_e164"]]
        stats.global_holdout += len(keep) - sum(keep)
        df = df[keep]
    return _records(df) if len(df) else []


def _pages(engine, campaign_id: int, source: str, segment: str, page_size: int, stats: PlanStats,
           ids: tuple[int, int] | None = None, marketing: bool = False, attributes: bool = True):
    """Consenting candidates, page by page (bounded memory), in id order (only ids lo..hi when given).
    Marketing leaves out the global holdout (setting SMSFLOW_GLOBAL_HOLDOUT, smsflow/abtest.py).
    ``attributes``: :func:`needs_attributes` of the templates the pages are rendered with."""
    holdout = _holdout(marketing)
    for lo, hi in _ranges(engine, segment, page_size, ids):
        records = _page(engine, campaign_id, source, segment, lo, hi, stats, holdout, attributes)
        if records:
            yield records


candidate_pages = _pages  # A/B campaigns (tasks/abtest.py) split the same pages by arm


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
    """Render the segment's consenting contacts into planned outbox messages (see the module doc)."""
    with gc_paused():  # millions of short-lived records: no collector passes over the whole heap
        return _plan_messages(engine, campaign_id, source, segment, template, price_per_segment, gateway,
                              batch_size, processes, extra, on_batch)


def _plan_messages(engine, campaign_id, source, segment, template, price_per_segment, gateway, batch_size,
                   processes, extra, on_batch) -> PlanStats:
    stats = PlanStats()
    extra = extra or {}
    page_size = max(1, int(batch_size))
    holdout = _holdout(template.kind == "marketing")
    if processes > 1 and _page_end(engine, segment, -1, _POOL_FROM + 1) is not None:
        # CPU-bound and big enough for a worker pool (spawn: safe beside Prefect's threads). Each worker reads,
        # renders and writes whole pages of members (id ranges) on its own connection: this process only hands
        # out the ranges, so nothing is pickled but the range and the page's counts, and reading and writing run
        # in every worker at once instead of one after the other here (1M contacts on PostgreSQL: the main
        # process read, pickled and COPYed every page while the workers rendered, ~1.4 of 2 cores busy).
        # At most 2 pages per worker in flight, so memory does not grow with the campaign.
        url = engine.url.render_as_string(hide_password=False)
        with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn"),
                                 initializer=init_render_worker,
                                 initargs=(template, price_per_segment, extra)) as pool:
            inflight: deque = deque()
            for lo, hi in _ranges(engine, segment, page_size):
                inflight.append(pool.submit(plan_range, url, campaign_id, source, segment, gateway, holdout, lo, hi))
                if len(inflight) >= 2 * processes:
                    _merge(stats, inflight.popleft().result(), on_batch)
            while inflight:
                _merge(stats, inflight.popleft().result(), on_batch)
    else:
        for lo, hi in _ranges(engine, segment, page_size):
            if _plan_page(engine, campaign_id, source, segment, template, price_per_segment, extra, gateway, holdout,
                          lo, hi, stats, per=page_size) and on_batch:
                on_batch(stats)
    if stats.planned or stats.render_failed:
        refresh_statistics(engine, "outbox", "quarantine")
    return stats


_POOL_FROM = 20_000  # segment members from which a worker pool pays off


def plan_range(url: str, campaign_id: int, source: str, segment: str, gateway: str | None,
               holdout: tuple[float, str], lo: int, hi: int | None) -> PlanStats:
    """Worker process (set up by ``init_render_worker``): read, render and write the candidates with ids in
    (``lo``, ``hi``]; the page's counts."""
    template, price, extra = worker_args()
    stats = PlanStats()
    with gc_paused():
        # a transaction per 10,000 messages, as the pool of render-only workers stored them
        _plan_page(get_engine(url), campaign_id, source, segment, template, price, extra, gateway, holdout, lo, hi,
                   stats, per=10_000)
    return stats


def _plan_page(engine, campaign_id, source, segment, template, price, extra, gateway, holdout, lo: int,
               hi: int | None, stats: PlanStats, per: int) -> int:
    """Read, render and store the page (``lo``, ``hi``], ``per`` messages a transaction; its consenting candidates."""
    records = _page(engine, campaign_id, source, segment, lo, hi, stats, holdout, needs_attributes(template))
    for i in range(0, len(records), per):
        c = records[i : i + per]
        rendered, failed = _render_chunk((c, template, price, extra))
        phones = {int(r["contact_id"]): r["phone_e164"] for r in c}
        _store_chunk(engine, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones)
    return len(records)


def _merge(stats: PlanStats, part: PlanStats, on_batch) -> None:
    """Add a worker's page counts to the run's (failures: the first 20 kept)."""
    for f in dataclasses.fields(PlanStats):
        if f.name != "failures":
            setattr(stats, f.name, getattr(stats, f.name) + getattr(part, f.name))
    stats.failures.extend(part.failures[: max(0, 20 - len(stats.failures))])
    if on_batch:
        on_batch(stats)


def _store_chunk(engine, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones) -> None:
    with engine.begin() as conn:
        write_chunk(conn, rendered, failed, stats, campaign_id, source, segment, template, gateway, phones)


def write_chunk(conn, rendered, failed, stats: PlanStats, campaign_id, source, segment, template, gateway,
                phones, variant: str | None = None, step: str | None = None, label: str | None = None) -> None:
    """Rendered messages into the outbox (and their short links) and failures into quarantine, in the
    caller's transaction. ``step`` (default: the template's name) keys the message: an A/B campaign uses
    one step for every arm and phase, so a contact can never get two variants; ``variant``: its arm;
    ``label``: the outbox's step column when it differs from the key's step (the A/B phase)."""
    now = utcnow()
    step = step or template.name
    links = _short_links(conn, rendered, campaign_id, step, now)
    n = len(rendered)
    cids = [int(r["contact_id"]) for r in rendered]
    segs = [int(r["segments"]) for r in rendered]
    costs = [float(r["cost"]) for r in rendered]
    rows = Columns([
        [idempotency_key(campaign_id, c, step) for c in cids],
        [campaign_id] * n,
        cids,
        [label or step] * n,
        [segment] * n,
        [phones[c] for c in cids],
        [r["language"] for r in rendered],
        [r["text"] for r in rendered],
        [r["encoding"] for r in rendered],
        segs,
        costs,
        ["planned"] * n,
        [0] * n,
        [gateway] * n,
        [now] * n,
        [now] * n,
        [variant] * n,
    ])
    quarantine = [
        dict(step="render", source=source, row_key=f"{campaign_id}:{int(f['contact_id'])}", campaign_id=campaign_id,
             contact_id=int(f["contact_id"]), reason_code="render_error", reason=str(f["reason"]),
             payload={"template": template.name})
        for f in failed
    ]
    # candidates are contacts without a message of this campaign: new rows, unless a concurrent run
    # rendered them meanwhile (then the unique key skips them, as always)
    bulk_insert(conn, "outbox", OUTBOX_INSERT_FIELDS, rows, on_conflict="ignore", conflict_columns=("idempotency_key",),
                likely_new=True)
    if links:
        bulk_insert(conn, "short_links", SHORT_LINK_FIELDS, links)
    write_quarantine(conn, quarantine)
    if rendered and _has_render_quarantine(conn, campaign_id):
        # contacts that failed in an earlier run and render now are no longer quarantined
        conn.execute(
            text("DELETE FROM quarantine WHERE step = 'render' AND campaign_id = :c AND contact_id IN "
                 "(SELECT contact_id FROM outbox WHERE campaign_id = :c)"),
            {"c": campaign_id},
        )
    stats.planned += len(rendered)
    stats.render_failed += len(failed)
    stats.segments += sum(segs)
    stats.cost += sum(costs)
    stats.failures.extend(failed[: max(0, 20 - len(stats.failures))])


SHORT_LINK_FIELDS = ("code", "campaign_id", "contact_id", "outbox_key", "target", "created_at", "expires_at")


def short_link_rows(conn, rendered, campaign_id: int, step: str, now: datetime, key=None) -> list[tuple] | None:
    """:func:`_short_links` for other writers of the outbox (journeys); ``key(contact_id)``: the message's
    idempotency key."""
    return _short_links(conn, rendered, campaign_id, step, now, key)


def _short_links(conn, rendered, campaign_id: int, step: str, now: datetime, key=None) -> list[tuple] | None:
    """The short-link rows of rendered messages; a code already in the store (or twice in the chunk) is
    replaced, in the text too, by a fresh one of the same length and alphabet (the parts do not change)."""
    if not any("links" in r for r in rendered):
        return None
    from datetime import timedelta

    from smsflow.links import new_code
    from smsflow.settings import get_settings

    codes = [c for r in rendered for c, _ in r.get("links", ())]
    taken: set[str] = set()
    for i in range(0, len(codes), 5_000):
        part = codes[i : i + 5_000]
        taken.update(conn.execute(text("SELECT code FROM short_links WHERE code IN :codes")
                                  .bindparams(bindparam("codes", expanding=True)), {"codes": part}).scalars())
    expires = now + timedelta(days=get_settings().link_ttl_days)
    rows, seen = [], set()
    for r in rendered:
        if "links" not in r:
            continue
        cid = int(r["contact_id"])
        for j, (code, target) in enumerate(r["links"]):
            while code in taken or code in seen:
                fresh = new_code()
                r["text"] = r["text"].replace(f"/{code}", f"/{fresh}", 1)
                r["links"][j] = (fresh, target)
                code = fresh
            seen.add(code)
            outbox_key = key(cid) if key else idempotency_key(campaign_id, cid, step)
            rows.append((code, campaign_id, cid, outbox_key, target, now, expires))
    return rows


def _has_render_quarantine(conn, campaign_id: int) -> bool:
    """Whether the campaign has quarantined renders at all: usually not, and then the clean-up below,
    which would scan the campaign's whole outbox once per chunk, is skipped."""
    return conn.execute(text("SELECT 1 FROM quarantine WHERE step = 'render' AND campaign_id = :c LIMIT 1"),
                        {"c": campaign_id}).first() is not None


# --------------------------------------------------------------------------- Prefect task
from smsflow.lazy_task import prefect_task  # noqa: E402 - Prefect itself only when a flow runs the task

from tasks.retrying import retry_if_transient  # noqa: E402


@prefect_task(name="render-into-outbox", retries=1, retry_delay_seconds=5,
              retry_condition_fn=retry_if_transient)
def plan_task(campaign_id: int, source: str, segment: str, template: MessageTemplate, price_per_segment: float,
              gateway: str | None, batch_size: int, processes: int, database_url: str | None,
              extra: dict[str, Any] | None = None) -> PlanStats:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact


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
