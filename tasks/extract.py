"""CRM extract: CRM rows -> contacts in the store, incremental by an updated-at watermark."""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_str
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Connection

from smsflow.exports import CONTACT_COLUMNS
from store.db import Columns, bulk_insert, json_text, read_chunks, refresh_statistics, utcnow
from store.quarantine import write_quarantine
from smsflow.values import truthy
from smsflow.keyflags import KeyFlags
from smsflow.phones import PhoneClassifier
from tasks.expectations import ExtractSchemaError, warm_up
from tasks.validate import BatchValidation, apply_verdicts, check_values
from smsflow.settings import get_settings
from store.db import executemany, get_engine, is_postgres

if TYPE_CHECKING:  # a Block; the preview reads an export through smsflow.exports.ExportSource, without Prefect
    from blocks.crm import CrmSource

REQUIRED_COLUMNS = ("id", "phone")
_CONTACT_FIELDS = (
    "source",
    "crm_id",
    "first_name",
    "last_name",
    "email",
    "phone_raw",
    "language",
    "timezone",
    "sms_consent",
    "consent_at",
    "consent_method",
    "consent_source",
    "consent_text_version",
    "attributes",
    "crm_updated_at",
    "status",
    "status_reason",
    "phone_e164",
    "phone_region",
    "duplicate_of",
    "validated_at",
    "updated_at",
)
# On re-import the CRM wins for its own fields; opted_out_at (set by SMS replies) is never touched.
_UPDATE_FIELDS = tuple(f for f in _CONTACT_FIELDS if f not in ("source", "crm_id"))


@dataclass
class ExtractStats:
    rows: int = 0
    upserted: int = 0
    quarantined: int = 0
    duplicate_ids: int = 0
    watermark: str | None = None
    start_watermark: str | None = None  # where this run started
    analyzed_at: int = 0  # contacts upserted when the store's statistics were last refreshed
    reasons: dict[str, int] = field(default_factory=dict)
    validated: int = 0  # contacts validated during the extract (the rest stay 'new' for validate_and_dedup)
    reader_seconds: dict[str, float] = field(default_factory=dict)  # reading/preparing time by phase (bench)


@dataclass
class ContactBatch:
    """CRM rows ready for the store, one per CRM id: plain column lists aligned by position.

    No DataFrame: the rows go to the driver column by column, and the validate columns
    (status, phone_e164, ...) are replaced as whole lists once the phones are classified."""

    columns: dict[str, list]
    watermark: str | None = None  # the largest updated-at of the source batch, in the source's own format

    def __len__(self) -> int:
        return len(self.columns["crm_id"])

    def __getitem__(self, name: str) -> list:
        return self.columns[name]

    def __setitem__(self, name: str, values: list) -> None:
        self.columns[name] = values


def check_columns(df: pd.DataFrame, source: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ExtractSchemaError(
            f"CRM source '{source}': required column(s) {', '.join(repr(c) for c in missing)} missing from the "
            f"extract; columns present: {', '.join(map(str, df.columns))}. Fix the query or the column_map."
        )


def _digest(values: list[Any]) -> str:
    return hashlib.blake2b("\x1f".join(map(str, values)).encode(), digest_size=12).hexdigest()


def _clean(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, str):
        v = value.strip()
        return v or None
    return value


_JSON_PLAIN = frozenset({type(None), str, int, bool, float})


def _clean_list(values: list) -> list:
    """``_clean`` over a column (fast path for text, None and ints)."""
    return [(v.strip() or None) if type(v) is str else (v if type(v) is int else (None if v is None else _clean(v)))
            for v in values]


def _memo_map(fn, values: list) -> list:
    """``[fn(v) for v in values]``, computing each distinct (type, value) once."""
    memo: dict = {}
    out = []
    for v in values:
        key = (type(v), v)
        try:
            r = memo[key]
        except KeyError:
            r = memo[key] = fn(v)
        except TypeError:  # unhashable
            r = fn(v)
        out.append(r)
    return out


def _dt_array(ts: pd.Series) -> np.ndarray:
    """Naive datetime64 Series -> numpy datetime64[us] array (NaT for missing): the store's bulk writer
    turns such a column into driver values in C (``store.db``)."""
    return ts.to_numpy(dtype="datetime64[us]")


def _to_utc_naive(series: pd.Series) -> pd.Series:
    """Timestamps as naive UTC. ISO 8601 (what CRMs and databases give) is parsed vectorised; only the
    values that are not ISO are parsed again one by one (``format="mixed"``), with the same result."""
    ts = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601")
    retry = (ts.isna() & series.notna()).to_numpy(dtype=bool)
    if retry.any():
        ts = ts.copy()
        ts[retry] = pd.to_datetime(series[retry], errors="coerce", utc=True, format="mixed")
    return ts.dt.tz_localize(None)


def _json_safe(v: Any) -> Any:
    if isinstance(v, (pd.Timestamp,)):
        return v.isoformat()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):
        return v.item()
    return v


def _watermark_of(raw: pd.Series, ts: pd.Series) -> str | None:
    """The raw updated-at value (the source's own format) of the latest parsed one."""
    if ts.notna().sum() == 0:
        return None
    value = raw.iloc[int(ts.to_numpy().argmax())] if ts.isna().sum() == 0 else raw.loc[ts.idxmax()]
    return value.isoformat(sep=" ") if hasattr(value, "isoformat") else str(value)


def _attributes_json(d: pd.DataFrame, take, n: int) -> list[str]:
    """The CRM's other columns as one JSON object per contact, as text (missing values left out), the text of
    ``json_text(_attributes(...))``. When every value is text (a CSV export) the objects are put together column
    by column: each present value's ``"key": "value"`` once, then joined per contact (1M contacts: ~1.2 CPU s
    less than building a dict per contact and dumping it)."""
    extra_cols = _extra_columns(d)
    raws = [take(d[c].tolist()) for c in extra_cols]
    if not all(set(map(type, raw)) <= _TEXT for raw in raws):
        return [json_text(a) for a in _attributes(d, take, n)]
    if not extra_cols:
        return ["{}"] * n
    parts = []
    for c, raw in zip(extra_cols, raws):
        key = _json_str(str(c)) + ": "
        parts.append([None if k is None else key + _json_str(v) for v, k in zip(raw, _clean_list(raw))])
    return ["{" + ", ".join([f for f in row if f is not None]) + "}" for row in zip(*parts)]


_TEXT = frozenset({type(None), str})


def _extra_columns(d: pd.DataFrame) -> list:
    return [c for c in d.columns if c not in CONTACT_COLUMNS and c not in ("consent_method", "consent_text_version")]


def _attributes(d: pd.DataFrame, take, n: int) -> list[dict]:
    """The CRM's other columns as one dict per contact (missing values left out)."""
    extra_cols = _extra_columns(d)
    if not extra_cols:
        return [{} for _ in range(n)]
    # per column: the JSON-safe value, or None where the cleaned value is missing (left out of the dict)
    extra_vals = []
    for c in extra_cols:
        raw = take(d[c].tolist())
        keep_mask = _clean_list(raw)
        if set(map(type, raw)) <= _JSON_PLAIN:
            extra_vals.append([None if k is None else v for v, k in zip(raw, keep_mask)])
        else:
            extra_vals.append([None if k is None else _json_safe(v) for v, k in zip(raw, keep_mask)])
    return [{k: v for k, v in zip(extra_cols, row) if v is not None} for row in zip(*extra_vals)]


def prepare_contacts(df: pd.DataFrame, source: str) -> tuple[ContactBatch, list[dict[str, Any]]]:
    """CRM rows -> store rows (one per CRM id, the latest wins) + quarantine rows.

    Rows without a CRM id are quarantined ('missing_crm_id'); older rows of a CRM id that
    appears twice are recorded as merged duplicates ('duplicate_crm_id'). Nothing is dropped
    silently. The validate columns start as 'new' (see ``tasks.validate.apply_verdicts``).
    """
    check_columns(df, source)
    now = utcnow()
    df = df.reset_index(drop=True)
    ids = [None if c is None else str(c) for c in _clean_list(df["id"].tolist())]
    if "updated_at" in df.columns:
        updated = _to_utc_naive(df["updated_at"])
        watermark = _watermark_of(df["updated_at"], updated) if len(df) else None
    else:
        updated, watermark = pd.Series(pd.NaT, index=df.index), None
    quarantine: list[dict[str, Any]] = []

    def source_row(i: int) -> dict[str, Any]:
        return {str(k): _json_safe(_clean(v)) for k, v in df.iloc[i].items() if _clean(v) is not None}

    no_id = [i for i, c in enumerate(ids) if c is None]
    for i in no_id:
        quarantine.append(
            dict(step="extract", source=source, row_key=f"row:{_digest(df.iloc[i].tolist())}",
                 reason_code="missing_crm_id", reason="row has no CRM id", payload=source_row(i))
        )
    if not no_id and len(set(ids)) == len(ids):
        pos = None  # the usual case: every row has its own CRM id, all are kept in order
    else:
        # latest updated_at per CRM id wins; ties keep the last row (later in the export)
        keep = pd.Series([c is not None for c in ids], index=df.index)
        id_s = pd.Series(ids, index=df.index, dtype=object)
        order = pd.DataFrame({"id": id_s, "ts": updated, "pos": range(len(df))})[keep]
        order = order.sort_values(["id", "ts", "pos"], na_position="first")
        winners = order.drop_duplicates("id", keep="last")
        for i in order.index.difference(winners.index):
            quarantine.append(
                dict(step="extract", source=source, row_key=f"dup:{ids[i]}:{updated[i]}:{i}",
                     reason_code="duplicate_crm_id", reason=f"CRM id {ids[i]} appears more than once; the latest row was kept",
                     payload=source_row(i))
            )
        pos = winners.index.sort_values().to_numpy().tolist()

    def take(values: list) -> list:
        return values if pos is None else [values[i] for i in pos]

    n = len(ids) if pos is None else len(pos)
    cleaned: dict[str, list] = {}

    def values(name: str) -> list:
        if name not in cleaned:
            cleaned[name] = _clean_list(take(df[name].tolist())) if name in df.columns else [None] * n
        return cleaned[name]

    consent = _memo_map(
        truthy,
        values("sms_consent"),
    )
    if "consent_at" in df.columns:
        consent_at = _dt_array(_to_utc_naive(pd.Series(values("consent_at"), dtype=object)))
    else:
        consent_at = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")
    crm_updated_at = _dt_array(updated)
    method = [v or "import" for v in values("consent_method")]
    columns = {
        "source": [source] * n,
        "crm_id": take(ids),
        "first_name": values("first_name"),
        "last_name": values("last_name"),
        "email": values("email"),
        "phone_raw": [v if v is None or type(v) is str else str(v) for v in values("phone")],
        "language": _memo_map(lambda v: None if v is None else str(v).strip().lower()[:8], values("language")),
        "timezone": values("timezone"),
        "sms_consent": consent,
        "consent_at": consent_at,
        "consent_method": [m if c else None for m, c in zip(method, consent)],
        "consent_source": [source if c else None for c in consent],
        "consent_text_version": [v if c else None for v, c in zip(values("consent_text_version"), consent)],
        "attributes": _attributes_json(df, take, n),  # JSON text: cheaper to ship and write
        "crm_updated_at": crm_updated_at if pos is None else crm_updated_at[pos],
        # the validate step's columns: 'new' until the phones are classified
        "status": ["new"] * n,
        "status_reason": [None] * n,
        "phone_e164": [None] * n,
        "phone_region": [None] * n,
        "duplicate_of": [None] * n,
        "validated_at": [None] * n,
        "updated_at": [now] * n,
    }
    return ContactBatch(columns, watermark), quarantine


def upsert_contacts(conn: Connection, rows: ContactBatch, likely_new: bool = False) -> int:
    """One write per contact: the CRM's fields and the validate step's verdict together
    (``likely_new``: none of the batch's CRM ids was in the store when the extract began)."""
    return bulk_insert(
        conn,
        "contacts",
        _CONTACT_FIELDS,
        Columns([rows[f] for f in _CONTACT_FIELDS]),
        on_conflict="update",
        conflict_columns=("source", "crm_id"),
        update_columns=_UPDATE_FIELDS,
        json_columns=("attributes",),
        likely_new=likely_new,
    )


def audit_consent_changes(conn: Connection, source: str, rows: ContactBatch, known: dict[str, bool],
                          after_id: int | None = None) -> int:
    """One consent_changes row per contact whose CRM consent is new or different ('granted' /
    'revoked', method from the CRM or 'import'). ``known``: the consent in the store before this batch of
    the batch's contacts already there; updated in place (a CRM id twice in the batch compares with its
    earlier row).

    Contacts new to the store that consent are audited with one INSERT ... SELECT over the rows just
    inserted (ids above ``after_id``, the largest id before this batch's upsert in the same
    transaction): no per-row round trip, which matters on a first import where nearly every contact
    is 'granted'. Without ``after_id`` they go the general way, with the changed known contacts."""

    now = utcnow()
    changes = []
    new_granted = 0
    for crm_id, consent, method, version in zip(rows["crm_id"], rows["sms_consent"], rows["consent_method"],
                                                rows["consent_text_version"]):
        before = known.get(crm_id)
        if before is None and consent and after_id is not None:
            new_granted += 1
        elif (before is None and consent) or (before is not None and before != bool(consent)):
            changes.append(("granted" if consent else "revoked", method or "import", version, crm_id))
        known[crm_id] = bool(consent)
    if new_granted:
        conn.execute(
            text(
                "INSERT INTO consent_changes (contact_id, changed_at, change, method, source, text_version) "
                "SELECT id, :now, 'granted', COALESCE(consent_method, 'import'), source, consent_text_version "
                "FROM contacts WHERE id > :after AND source = :src AND sms_consent ORDER BY id"
            ),
            {"now": now, "src": source, "after": after_id},
        )
    if not changes:
        return new_granted
    # set-based: the changes into a temp table, then one INSERT ... SELECT joined on (source, crm_id)
    if is_postgres(conn):
        conn.exec_driver_sql(
            "CREATE TEMP TABLE IF NOT EXISTS _consent_audit (pos bigserial, change text, method text, "
            "text_version text, crm_id text) ON COMMIT DROP"
        )
        order = "t.pos"
    else:
        conn.exec_driver_sql(
            "CREATE TEMP TABLE IF NOT EXISTS _consent_audit (change TEXT, method TEXT, text_version TEXT, crm_id TEXT)"
        )
        order = "t.rowid"
    conn.exec_driver_sql("DELETE FROM _consent_audit")
    executemany(
        conn,
        "INSERT INTO _consent_audit (change, method, text_version, crm_id) VALUES (?, ?, ?, ?)",
        changes,
    )
    conn.execute(
        text(
            "INSERT INTO consent_changes (contact_id, changed_at, change, method, source, text_version) "
            "SELECT c.id, :now, t.change, t.method, :src, t.text_version FROM _consent_audit t "
            f"JOIN contacts c ON c.source = :src AND c.crm_id = t.crm_id ORDER BY {order}"
        ),
        {"now": now, "src": source},
    )
    conn.exec_driver_sql("DELETE FROM _consent_audit")
    return new_granted + len(changes)


def get_watermark(conn: Connection, source: str) -> str | None:
    return conn.execute(text("SELECT mark FROM watermarks WHERE source = :s"), {"s": source}).scalar()


def set_watermark(conn: Connection, source: str, mark: str | None, rows: int) -> None:
    bulk_insert(
        conn,
        "watermarks",
        ("source", "mark", "rows_seen", "updated_at"),
        [(source, mark, rows, utcnow())],
        on_conflict="update",
        conflict_columns=("source",),
        update_columns=("mark", "rows_seen", "updated_at"),
    )


def _later(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    ta = pd.to_datetime(a, utc=True, format="mixed")
    tb = pd.to_datetime(b, utc=True, format="mixed")
    return b if tb > ta else a


@dataclass
class _Prepared:
    """One source batch between reading and writing."""

    rows: ContactBatch
    quarantine: list[dict[str, Any]]
    source_rows: int
    check: Any = None  # tasks.expectations.ExtractCheckResult when the batch was checked
    phones: Any = None  # callable -> normalize_phones DataFrame while the workers parse (not picklable)
    verdicts: Any = None  # tasks.validate.Verdicts once applied to ``rows``
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent reading and preparing it, by phase


class _Clock:
    """Adds the seconds spent in each phase of a batch to ``job.timings`` (reported by the extract stats,
    also when the batch was prepared in the reader process)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, timings: dict[str, float], phase: str) -> None:
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - self.t
        self.t = now


_PARALLEL_BATCH = 20_000  # a batch this big has its checks and phone parsing done by the workers (if any)


def _prepare_batch(df: pd.DataFrame, name: str, classifier) -> _Prepared:
    """Clean the batch; when validating, start the extract checks on it and the parsing of its phones.

    A big batch has both handed to the classifier's workers at once (the phones speculatively: their
    verdicts are dropped if the checks fail); a small one is checked here first, and its phones parsed
    only if it passed."""
    clock = _Clock()
    rows, quarantine = prepare_contacts(df, name)
    job = _Prepared(rows, quarantine, len(df))
    clock.lap(job.timings, "prepare")
    if classifier is not None and len(rows):
        parallel = len(rows) >= _PARALLEL_BATCH
        # a small batch is checked here, unless the command warmed up a worker for it (smsflow.warm): then
        # Great Expectations is never imported in this process
        job.check = classifier.call(check_values, rows["crm_id"], rows["phone_raw"], rows["language"],
                                    parallel=parallel or classifier.warm)
        clock.lap(job.timings, "checks (Great Expectations)")
        if parallel or job.check().success:
            job.phones = classifier.submit(pd.Series(rows["phone_raw"], dtype=object))
            clock.lap(job.timings, "phones (vectorised part)")
    return job


def _finish(job: _Prepared, suppressed) -> _Prepared:
    """Wait for the batch's checks and phones; if it passed, apply the verdicts (status, E.164, reason ...)."""
    if callable(job.check):
        clock = _Clock()
        job.check = job.check()
        norm = job.phones() if job.phones is not None and job.check.success else None
        job.phones = None
        clock.lap(job.timings, "checks and phones (waiting for the workers)")
        if norm is not None:
            job.verdicts = apply_verdicts(job.rows, norm, suppressed)
            clock.lap(job.timings, "verdicts")
    return job


def _read_batches(source: CrmSource, since: str | None, batch_size: int, classifier, suppressed) -> Iterator[_Prepared]:
    """Prepared batches in source order. The next batch is read and its phones handed to the workers
    *before* the current one is yielded, so they parse while the caller writes. A batch read before
    the source fails is still yielded (then the error is raised)."""
    pending: _Prepared | None = None
    try:
        clock = _Clock()
        for df in source.fetch(since=since, batch_size=batch_size):
            fetched = time.perf_counter() - clock.t
            job = _prepare_batch(df, source.source_name, classifier)
            job.timings["read from the CRM"] = fetched
            if pending is not None:
                yield _finish(pending, suppressed)
            pending = job
            clock = _Clock()
    except Exception:
        if pending is not None:
            yield _finish(pending, suppressed)
        raise
    if pending is not None:
        yield _finish(pending, suppressed)


def _reader_process(out, source: CrmSource, since, batch_size: int, region: str, processes: int, suppressed) -> None:
    """Child process: read, check and classify batches, hand them to the parent (which writes them).
    The checks and the phone parsing of big batches go to ``processes - 1`` more workers."""
    import pickle

    try:
        with gc_paused(), PhoneClassifier(region, processes, workers=max(1, processes - 1)) as classifier:
            # the workers import Great Expectations now, while this process scans the export and reads its first
            # batch: the first batch's checks no longer wait for that import (~2 s at the start of 1M contacts)
            classifier.call(warm_up)
            for job in _read_batches(source, since, batch_size, classifier, suppressed):
                out.put(("batch", job))
        out.put(("end", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        out.put(("error", exc))


def _batches_from_child(source: CrmSource, since, batch_size: int, region: str, processes: int, suppressed,
                        fallback=None):
    """``_read_batches`` run in a ``spawn`` child: reading the CRM and cleaning in the child, the Great
    Expectations checks and the phone parsing in ``processes - 1`` workers of its own, the writing here:
    three streams of work spread over the cores instead of one after the other. Batches are pickled
    across (about 0.1 s per 50,000 rows each way). Returns None when the source cannot be sent to a
    child process (then the caller reads in this process). If the child dies before it sent anything
    (e.g. ``spawn`` cannot re-import a ``__main__`` read from stdin), ``fallback()`` gives the batches."""
    import multiprocessing as mp
    import pickle
    import queue

    try:
        pickle.dumps(source)
    except Exception:  # noqa: BLE001 - e.g. a Block holding a client: read in this process instead
        return None
    ctx = mp.get_context("spawn")
    out = ctx.Queue(maxsize=2)
    proc = ctx.Process(target=_reader_process, name="smsflow-extract-reader",
                       args=(out, source, since, batch_size, region, processes, suppressed))
    proc.start()

    def messages():
        received = False
        try:
            while True:
                try:
                    kind, value = out.get(timeout=1.0)
                except queue.Empty:
                    if proc.is_alive():
                        continue
                    try:
                        kind, value = out.get(timeout=2.0)
                    except queue.Empty:
                        if not received and fallback is not None:
                            break
                        raise RuntimeError(f"the extract reader process died (exit code {proc.exitcode})") from None
                received = True
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
        finally:
            if proc.is_alive():  # the writer stopped early (an error): do not leave the reader behind
                proc.terminate()
            proc.join(timeout=30)
        yield from fallback()  # the reader never started: read here

    return messages()


def _write_batch(engine, name: str, job: _Prepared, known_consent: KeyFlags, validation, stats: ExtractStats,
                 move_watermark: bool = True) -> None:
    """One transaction per batch: contacts (with their verdicts), consent audit, quarantine, watermark
    (kept where it was when ``move_watermark`` is False: batches of a file come in any order).
    ``known_consent``: the consent of every contact of the source in the store, kept up to date."""
    mark = _later(stats.watermark, job.rows.watermark)
    crm = job.rows["crm_id"]
    was_known, before = known_consent.exchange(crm, [bool(c) for c in job.rows["sms_consent"]])
    prior = {c: f for c, k, f in zip(crm, was_known.tolist(), before.tolist()) if k}
    with engine.begin() as conn:
        after_id = conn.execute(text("SELECT COALESCE(MAX(id), 0) FROM contacts")).scalar()
        stats.upserted += upsert_contacts(conn, job.rows, likely_new=not prior)
        audit_consent_changes(conn, name, job.rows, prior, after_id)
        write_quarantine(conn, job.quarantine)
        if job.verdicts is not None:
            validation.store(conn, job.rows, job.verdicts, job.check)
        set_watermark(conn, name, mark if move_watermark else stats.start_watermark,
                      job.source_rows)
    stats.rows += job.source_rows
    stats.watermark = mark
    if stats.upserted >= 2 * stats.analyzed_at + 10_000:  # the table doubled: plan the next batch for its size
        refresh_statistics(engine, "contacts", "quarantine")
        stats.analyzed_at = stats.upserted
    stats.validated += len(job.rows) if job.verdicts is not None else 0
    for q in job.quarantine:
        stats.reasons[q["reason_code"]] = stats.reasons.get(q["reason_code"], 0) + 1
        if q["reason_code"] == "duplicate_crm_id":
            stats.duplicate_ids += 1
        else:
            stats.quarantined += 1


def extract_source(
    engine,
    source: CrmSource,
    *,
    full_refresh: bool = False,
    batch_size: int = 50_000,
    on_batch=None,
    validate: bool = True,
    default_region: str = "RU",
    processes: int = 1,
) -> ExtractStats:
    """Pull every batch newer than the watermark into the store; the watermark moves only
    after a batch is committed, so a crash re-extracts at most one batch (idempotent upsert).

    With ``validate`` (the default) each batch is also checked (the Great Expectations suite) and
    its phones classified *before* it is written, so every contact is written once, with its
    verdict; ``validate_and_dedup`` then only reports, merges duplicates and handles what stayed
    'new' (a batch that failed its checks). With ``processes`` > 1 the reading, checking and
    classifying run in a child process (and its phone workers) while this process writes."""
    stats = ExtractStats()
    name = source.source_name
    with engine.begin() as conn:
        since = None if full_refresh else get_watermark(conn, name)
        known_consent = _known_consent(conn, name)
        validation = BatchValidation.start(conn, name) if validate else None
    stats.watermark = stats.start_watermark = since
    suppressed = validation.suppressed if validation is not None else None
    with gc_paused(), PhoneClassifier(default_region, processes) if validate else _no_classifier() as classifier:
        def read_here():
            return _read_batches(source, since, batch_size, classifier, suppressed)

        batches = None
        if validate and processes > 1 and _reader_pays(source, since, batch_size):
            batches = _batches_from_child(source, since, batch_size, default_region, processes, suppressed, read_here)
        for job in batches if batches is not None else read_here():
            for phase, seconds in job.timings.items():
                stats.reader_seconds[phase] = stats.reader_seconds.get(phase, 0.0) + seconds
            _write_batch(engine, name, job, known_consent, validation, stats, source.ordered_by_updated_at)
            if on_batch is not None:
                on_batch(stats)
    if not source.ordered_by_updated_at and stats.rows:
        with engine.begin() as conn:  # every batch is committed: now the watermark may move
            set_watermark(conn, name, stats.watermark, stats.rows)
    if stats.upserted > stats.analyzed_at:
        refresh_statistics(engine, "contacts", "quarantine")
    return stats


def _known_consent(conn: Connection, source: str, chunk: int = 100_000) -> KeyFlags:
    """The consent of every contact of the source in the store, by CRM id, read in chunks (a compact map:
    10M CRM ids as a dict held ~1 GB for the whole extract)."""
    known = KeyFlags()
    for part in read_chunks(conn, "SELECT crm_id, sms_consent FROM contacts WHERE source = :s", {"s": source}, chunk):
        known.set([r[0] for r in part], [bool(r[1]) for r in part])
    return known


READER_MIN_BATCHES = 4  # measured: the reader process costs ~2 s to start; it wins from ~200k rows


def _reader_pays(source: CrmSource, since: str | None, batch_size: int) -> bool:
    """A separate reader process overlaps reading with writing; below a few batches its start-up
    (a spawned interpreter importing pandas and Great Expectations) costs more than it saves
    (100k demo rows: 6.2 s in-process vs 8.5 s with the reader; 300k: 16.8 vs 14.4)."""
    n = source.estimate_rows(since)
    return n is None or n > READER_MIN_BATCHES * batch_size


@contextmanager
def _no_classifier():
    yield None


@contextmanager
def gc_paused():
    """The cyclic garbage collector off for a bulk step. Such a step allocates millions of short-lived
    rows; every collection pass walks the whole (large) heap, which costs 10-15 % of the step's CPU.
    The rows themselves are freed by reference counting; cycles left behind are collected afterwards."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- Prefect task
from smsflow.lazy_task import prefect_task  # noqa: E402 - Prefect itself only when a flow runs the task

from tasks.retrying import retry_if_transient  # noqa: E402


@prefect_task(name="extract-crm-batches", retries=2, retry_delay_seconds=[5, 30],
              retry_condition_fn=retry_if_transient)
def extract_task(source: CrmSource, full_refresh: bool, batch_size: int, database_url: str | None,
                 default_region: str | None = None, processes: int | None = None) -> ExtractStats:
    """All new CRM batches into the store (one task run per source pull, not per row), each contact
    written once with its validation verdict (see :func:`extract_source`)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact


    progress = create_progress_artifact(0.0, description=f"extract {source.source_name}")

    def on_batch(s: ExtractStats) -> None:
        update_progress_artifact(progress, 50.0, description=f"{s.rows} rows extracted")


    settings = get_settings()
    stats = extract_source(get_engine(database_url), source, full_refresh=full_refresh, batch_size=batch_size,
                           on_batch=on_batch, default_region=default_region or settings.default_region,
                           processes=processes or settings.workers)
    update_progress_artifact(progress, 100.0, description=f"{stats.rows} rows extracted")
    return stats
