"""The validate-and-dedup step against the store: new contacts -> valid | quarantined | duplicate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import text

from store.db import bulk_update, read_frame, utcnow
from tasks.extract import write_quarantine
from tasks.validate import check_extract, find_duplicates, normalize_phones_parallel


class ExtractCheckFailed(RuntimeError):
    """The Great Expectations suite failed on the extract: the run stops before anything is sent."""


@dataclass
class ValidateStats:
    checked: int = 0
    valid: int = 0
    quarantined: int = 0
    duplicates: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    expectations_markdown: str = ""
    expectations_success: bool = True


def _payload(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if v is not None and k != "attributes"}


def validate_new_contacts(engine, source: str, default_region: str = "RU", processes: int = 1) -> ValidateStats:
    """Validate the contacts extracted since the last validation, then re-run dedup over the source."""
    stats = ValidateStats()
    with engine.begin() as conn:
        new = read_frame(
            conn,
            "SELECT id, crm_id, first_name, last_name, phone_raw, language, crm_updated_at FROM contacts "
            "WHERE source = :s AND status = 'new'",
            {"s": source},
        )
    stats.checked = len(new)
    if len(new):
        check = check_extract(new.drop(columns=["id"]).rename(columns={"crm_id": "id", "phone_raw": "phone"}))
        stats.expectations_markdown = check.markdown()
        stats.expectations_success = check.success
        if not check.success:
            raise ExtractCheckFailed(
                f"extract of '{source}' failed its checks, nothing was validated or sent: {check.summary()}. "
                "Fix the CRM query/export and rerun; the contacts stay in the store as 'new'."
            )
        norm = normalize_phones_parallel(new["phone_raw"], default_region=default_region, processes=processes)
        _apply_suppression(engine, norm)
        now = utcnow()
        ok = norm["phone_status"] == "ok"
        status = ok.map({True: "valid", False: "quarantined"})
        with engine.begin() as conn:
            bulk_update(
                conn,
                "contacts",
                "id",
                ("phone_e164", "phone_region", "status", "status_reason", "duplicate_of", "validated_at"),
                zip(
                    norm["phone_e164"].where(ok, None),
                    norm["region"].where(norm["region"] != "", None),
                    status,
                    norm["reason"].where(~ok, None),
                    [None] * len(new),
                    [now] * len(new),
                    new["id"].astype(int),
                ),
            )
            bad = new[~ok.to_numpy()]
            quarantine = [
                dict(step="validate", source=source, row_key=str(r["crm_id"]), campaign_id=None, contact_id=int(r["id"]),
                     reason_code=str(code), reason=str(reason), payload=_payload(r))
                for r, code, reason in zip(
                    bad.to_dict("records"), norm.loc[~ok, "phone_status"], norm.loc[~ok, "reason"]
                )
            ]
            conn.execute(
                text("DELETE FROM quarantine WHERE step = 'validate' AND source = :s AND contact_id IN "
                     "(SELECT id FROM contacts WHERE source = :s AND status = 'valid')"),
                {"s": source},
            )
            write_quarantine(conn, quarantine)
        counts = norm["phone_status"].value_counts().to_dict()
        stats.by_status = {str(k): int(v) for k, v in counts.items()}
        stats.quarantined = int((~ok).sum())
    stats.duplicates = dedup_source(engine, source)
    with engine.begin() as conn:
        stats.valid = int(conn.execute(text("SELECT COUNT(*) FROM contacts WHERE source=:s AND status='valid'"), {"s": source}).scalar())
    return stats


def _apply_suppression(engine, norm: pd.DataFrame) -> None:
    """Numbers of erased people (salted hashes on the suppression list) are never imported again."""
    from smsflow.privacy import phone_hash
    from tasks.erasure import suppressed_hashes

    with engine.begin() as conn:
        hashes = suppressed_hashes(conn)
    if not hashes:
        return
    ok = norm["phone_status"] == "ok"
    hit = ok & norm["phone_e164"].map(lambda p: bool(p) and phone_hash(p) in hashes).astype(bool)
    norm.loc[hit, "phone_status"] = "suppressed"
    norm.loc[hit, "reason"] = "erased person: the number is on the suppression list"


def dedup_source(engine, source: str) -> int:
    """Merge contacts of one source sharing an E.164 number: the most recently updated CRM record
    is kept (status valid), the others become 'duplicate' pointing at it. Returns the duplicates."""
    with engine.begin() as conn:
        df = read_frame(
            conn,
            "SELECT id, phone_e164, crm_updated_at, status, duplicate_of FROM contacts "
            "WHERE source = :s AND status IN ('valid', 'duplicate') ORDER BY id",
            {"s": source},
            parse_dates=["crm_updated_at"],
        )
        if df.empty:
            return 0
        df.index = df["id"].astype(int)
        kept = find_duplicates(df["phone_e164"], df["crm_updated_at"])
        ids = df.index.to_numpy(dtype=np.int64)
        is_dup = kept.notna().to_numpy(dtype=bool)
        new_dup = kept.fillna(-1).to_numpy(dtype=np.int64)
        old_dup = pd.to_numeric(df["duplicate_of"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
        old_is_dup = (df["status"] == "duplicate").to_numpy(dtype=bool)
        # only the rows whose status or keeper really changes are written (None vs None is no change)
        changed = (is_dup != old_is_dup) | (new_dup != old_dup)
        ch = np.flatnonzero(changed)
        if len(ch):
            d = is_dup[ch]
            keep = new_dup[ch]
            bulk_update(
                conn,
                "contacts",
                "id",
                ("status", "duplicate_of", "status_reason"),
                zip(
                    ["duplicate" if x else "valid" for x in d.tolist()],
                    [k if x else None for k, x in zip(keep.tolist(), d.tolist())],
                    [f"same number as contact {k}" if x else None for k, x in zip(keep.tolist(), d.tolist())],
                    ids[ch].tolist(),
                ),
            )
        is_dup = pd.Series(is_dup)
        return int(is_dup.sum())


# --------------------------------------------------------------------------- Prefect task
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402


@task(name="validate-and-dedup-contacts", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def validate_task(source: str, default_region: str, processes: int, database_url: str | None) -> ValidateStats:
    from prefect.artifacts import create_markdown_artifact

    from store.db import get_engine

    try:
        stats = validate_new_contacts(get_engine(database_url), source, default_region, processes)
    except ExtractCheckFailed as exc:
        create_markdown_artifact(f"# Extract checks FAILED for `{source}`\n\n{exc}", key="extract-checks", description=str(exc)[:200])
        raise
    if stats.expectations_markdown:
        create_markdown_artifact(stats.expectations_markdown, key="extract-checks",
                                 description=f"Great Expectations results for {source}")
    return stats
