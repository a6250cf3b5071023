"""CRM extract: CRM rows -> contacts in the store, incremental by an updated-at watermark."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import Connection

from blocks.crm import CONTACT_COLUMNS, CrmSource
from store.db import bulk_insert, utcnow
from tasks.validate import ExtractSchemaError

REQUIRED_COLUMNS = ("id", "phone")
TRUTHY = {"1", "true", "t", "yes", "y", "да", "д", "on"}
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
    reasons: dict[str, int] = field(default_factory=dict)


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
    """``_clean`` over a column (fast path for text and None)."""
    return [(v.strip() or None) if type(v) is str else (None if v is None else _clean(v)) for v in values]


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


def _py_datetimes(ts: pd.Series) -> pd.Series:
    """datetime64 -> object Series of datetime.datetime (None for NaT), converted by numpy in C."""
    arr = ts.to_numpy(dtype="datetime64[us]").astype(object)
    return pd.Series(arr, index=ts.index, dtype=object)


def _to_utc_naive(series: pd.Series) -> pd.Series:
    ts = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    return ts.dt.tz_localize(None)


def _json_safe(v: Any) -> Any:
    if isinstance(v, (pd.Timestamp,)):
        return v.isoformat()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):
        return v.item()
    return v


def prepare_contacts(df: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """CRM rows -> store rows (one per CRM id, the latest wins) + quarantine rows.

    Rows without a CRM id are quarantined ('missing_crm_id'); older rows of a CRM id that
    appears twice are recorded as merged duplicates ('duplicate_crm_id'). Nothing is dropped
    silently.
    """
    check_columns(df, source)
    now = utcnow()
    df = df.reset_index(drop=True)
    ids = pd.Series([None if c is None else str(c) for c in _clean_list(df["id"].tolist())], index=df.index, dtype=object)
    updated = _to_utc_naive(df["updated_at"]) if "updated_at" in df.columns else pd.Series(pd.NaT, index=df.index)
    quarantine: list[dict[str, Any]] = []

    def source_row(i: int) -> dict[str, Any]:
        return {str(k): _json_safe(_clean(v)) for k, v in df.iloc[i].items() if _clean(v) is not None}

    no_id = ids.isna()
    for i in df.index[no_id]:
        quarantine.append(
            dict(step="extract", source=source, row_key=f"row:{_digest(df.iloc[i].tolist())}",
                 reason_code="missing_crm_id", reason="row has no CRM id", payload=source_row(i))
        )
    keep = ~no_id
    # latest updated_at per CRM id wins; ties keep the last row (later in the export)
    order = pd.DataFrame({"id": ids, "ts": updated, "pos": range(len(df))})[keep]
    order = order.sort_values(["id", "ts", "pos"], na_position="first")
    winners = order.drop_duplicates("id", keep="last")
    losers = order.index.difference(winners.index)
    for i in losers:
        quarantine.append(
            dict(step="extract", source=source, row_key=f"dup:{ids[i]}:{updated[i]}:{i}",
                 reason_code="duplicate_crm_id", reason=f"CRM id {ids[i]} appears more than once; the latest row was kept",
                 payload=source_row(i))
        )
    d = df.loc[winners.index.sort_values()]
    upd = updated.loc[d.index]

    def obj(values) -> pd.Series:  # object dtype: None stays None (pandas 3 would turn it into NaN)
        return pd.Series(list(values), index=d.index, dtype=object)

    n = len(d)
    cleaned: dict[str, list] = {}

    def values(name: str) -> list:
        if name not in cleaned:
            cleaned[name] = _clean_list(d[name].tolist()) if name in d.columns else [None] * n
        return cleaned[name]

    def col(name: str) -> pd.Series:
        return obj(values(name))

    consent_list = _memo_map(
        lambda v: v if isinstance(v, bool) else (str(v).strip().lower() in TRUTHY if v is not None else False),
        values("sms_consent"),
    )
    consent = obj(consent_list).astype(bool)
    consent_at = _to_utc_naive(col("consent_at")) if "consent_at" in d.columns else pd.Series(pd.NaT, index=d.index)
    lang = obj(_memo_map(lambda v: None if v is None else str(v).strip().lower()[:8], values("language")))
    extra_cols = [c for c in d.columns if c not in CONTACT_COLUMNS and c not in ("consent_method", "consent_text_version")]
    if extra_cols:
        # per column: the JSON-safe value, or None where the cleaned value is missing (left out of the dict)
        extra_vals = []
        for c in extra_cols:
            raw = d[c].tolist()
            keep_mask = _clean_list(raw)
            if set(map(type, raw)) <= _JSON_PLAIN:
                extra_vals.append([None if k is None else v for v, k in zip(raw, keep_mask)])
            else:
                extra_vals.append([None if k is None else _json_safe(v) for v, k in zip(raw, keep_mask)])
        attributes = [
            {k: v for k, v in zip(extra_cols, row) if v is not None}
            for row in zip(*extra_vals)
        ]
    else:
        attributes = [{} for _ in range(n)]
    method_list = [v or "import" for v in values("consent_method")]
    method = obj(method_list)

    rows = pd.DataFrame(
        {
            "source": source,
            "crm_id": ids.loc[d.index],
            "first_name": col("first_name"),
            "last_name": col("last_name"),
            "email": col("email"),
            "phone_raw": obj(v if v is None or type(v) is str else str(v) for v in values("phone")),
            "language": lang,
            "timezone": col("timezone"),
            "sms_consent": consent,
            "consent_at": _py_datetimes(consent_at),
            "consent_method": obj(m if c else None for m, c in zip(method_list, consent_list)),
            "consent_source": obj(source if c else None for c in consent_list),
            "consent_text_version": obj(v if c else None for v, c in zip(values("consent_text_version"), consent_list)),
            "attributes": attributes,
            "crm_updated_at": _py_datetimes(upd),
            "status": "new",
            "status_reason": None,
            "phone_e164": None,
            "validated_at": None,
            "updated_at": now,
        },
        index=d.index,
    )
    return rows, quarantine


def upsert_contacts(conn: Connection, rows: pd.DataFrame) -> int:
    return bulk_insert(
        conn,
        "contacts",
        _CONTACT_FIELDS,
        rows[list(_CONTACT_FIELDS)],  # read column by column
        on_conflict="update",
        conflict_columns=("source", "crm_id"),
        update_columns=_UPDATE_FIELDS,
        json_columns=("attributes",),
    )


QUARANTINE_FIELDS = ("step", "source", "row_key", "campaign_id", "contact_id", "reason_code", "reason", "payload")


def write_quarantine(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """Quarantine rows, idempotent per (step, source, row_key): a rerun does not count them twice."""
    if not rows:
        return 0
    return bulk_insert(
        conn,
        "quarantine",
        QUARANTINE_FIELDS,
        ((r.get(f) for f in QUARANTINE_FIELDS) for r in rows),
        on_conflict="update",
        conflict_columns=("step", "source", "row_key"),
        update_columns=("reason_code", "reason", "payload", "contact_id"),
    )


def audit_consent_changes(conn: Connection, source: str, rows: pd.DataFrame, known: dict[str, bool]) -> int:
    """One consent_changes row per contact whose CRM consent is new or different ('granted' /
    'revoked', method from the CRM or 'import'). ``known`` is updated in place."""
    from store.db import executemany, is_postgres

    now = utcnow()
    changes = []
    for crm_id, consent, method, version in zip(rows["crm_id"], rows["sms_consent"], rows["consent_method"],
                                                rows["consent_text_version"]):
        before = known.get(crm_id)
        if (before is None and consent) or (before is not None and before != bool(consent)):
            changes.append(("granted" if consent else "revoked", method or "import", version, crm_id))
        known[crm_id] = bool(consent)
    if not changes:
        return 0
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
    return len(changes)


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


def batch_watermark(df: pd.DataFrame) -> str | None:
    """The largest updated-at of a batch, in the source's own format."""
    if "updated_at" not in df.columns or df.empty:
        return None
    ts = pd.to_datetime(df["updated_at"], errors="coerce", utc=True, format="mixed")
    if ts.notna().sum() == 0:
        return None
    raw = df["updated_at"].iloc[int(ts.to_numpy().argmax())] if ts.isna().sum() == 0 else df["updated_at"].loc[ts.idxmax()]
    return raw.isoformat(sep=" ") if hasattr(raw, "isoformat") else str(raw)


def _later(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    ta = pd.to_datetime(a, utc=True, format="mixed")
    tb = pd.to_datetime(b, utc=True, format="mixed")
    return b if tb > ta else a


def extract_source(
    engine,
    source: CrmSource,
    *,
    full_refresh: bool = False,
    batch_size: int = 50_000,
    on_batch=None,
) -> ExtractStats:
    """Pull every batch newer than the watermark into the store; the watermark moves only
    after a batch is committed, so a crash re-extracts at most one batch (idempotent upsert)."""
    stats = ExtractStats()
    name = source.source_name
    with engine.begin() as conn:
        since = None if full_refresh else get_watermark(conn, name)
        known_consent = {r[0]: bool(r[1]) for r in conn.execute(
            text("SELECT crm_id, sms_consent FROM contacts WHERE source = :s"), {"s": name})}
    stats.watermark = since

    def prepared():
        for df in source.fetch(since=since, batch_size=batch_size):
            rows, quarantine = prepare_contacts(df, name)
            yield len(df), rows, quarantine, batch_watermark(df)

    for n_rows, rows, quarantine, batch_mark in prepared():
        mark = _later(stats.watermark, batch_mark)
        with engine.begin() as conn:
            stats.upserted += upsert_contacts(conn, rows)
            audit_consent_changes(conn, name, rows, known_consent)
            write_quarantine(conn, quarantine)
            set_watermark(conn, name, mark, n_rows)
        stats.rows += n_rows
        stats.watermark = mark
        for q in quarantine:
            stats.reasons[q["reason_code"]] = stats.reasons.get(q["reason_code"], 0) + 1
            if q["reason_code"] == "duplicate_crm_id":
                stats.duplicate_ids += 1
            else:
                stats.quarantined += 1
        if on_batch is not None:
            on_batch(stats)
    return stats


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="extract-crm-batches", retries=2, retry_delay_seconds=[5, 30], cache_policy=NO_CACHE)
def extract_task(source: CrmSource, full_refresh: bool, batch_size: int, database_url: str | None) -> ExtractStats:
    """All new CRM batches into the store (one task run per source pull, not per row)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from store.db import get_engine

    progress = create_progress_artifact(0.0, description=f"extract {source.source_name}")

    def on_batch(s: ExtractStats) -> None:
        update_progress_artifact(progress, 50.0, description=f"{s.rows} rows extracted")

    stats = extract_source(get_engine(database_url), source, full_refresh=full_refresh, batch_size=batch_size, on_batch=on_batch)
    update_progress_artifact(progress, 100.0, description=f"{stats.rows} rows extracted")
    return stats
