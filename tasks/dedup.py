"""Dedup on the store: contacts of one source that share an E.164 number are merged; the most
recently updated CRM record keeps the number, the others become 'duplicate' pointing at it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from smsflow.duplicates import find_duplicates
from store.db import bulk_update, read_columns

__all__ = ["dedup_source"]


def dedup_source(engine, source: str) -> int:
    """Merge contacts of one source sharing an E.164 number: the most recently updated CRM record
    is kept (status valid), the others become 'duplicate' pointing at it. Returns the duplicates.

    Only numbers held by more than one contact can have duplicates: the store finds them (one GROUP BY,
    a hash aggregate on PostgreSQL) and returns those contacts and the current duplicates (which may have to
    become valid again); nothing else of the source is read here. 1M contacts (27k duplicates), the
    candidates: 1.4-1.6 s on either store, where reading every (id, number) pair and hashing the numbers
    here, then the candidates 500 ids a query, took ~4 s."""
    with engine.begin() as conn:
        df = _dedup_candidates(conn, source)
        if not len(df):
            return 0
        kept = find_duplicates(df["phone_e164"], df["crm_updated_at"])
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
                    df.index.to_numpy(dtype=np.int64)[ch].tolist(),
                ),
            )
        return int(is_dup.sum())


_MERGEABLE = "source = :s AND status IN ('valid', 'duplicate') AND phone_e164 IS NOT NULL"
# Two queries joined by UNION, not one WHERE with "status = 'duplicate' OR phone_e164 IN (...)": PostgreSQL
# runs such an OR'd IN as a subplan per row (> 10 min at 1M contacts). Plans at 1M: bench/notes/postgresql-plans.md.
_CANDIDATES_SQL = (
    f"SELECT id, phone_e164, crm_updated_at, status, duplicate_of FROM contacts WHERE {_MERGEABLE} "
    f"AND phone_e164 IN (SELECT phone_e164 FROM contacts WHERE {_MERGEABLE} GROUP BY phone_e164 HAVING COUNT(*) > 1) "
    "UNION SELECT id, phone_e164, crm_updated_at, status, duplicate_of FROM contacts "
    "WHERE source = :s AND status = 'duplicate' ORDER BY 1"
)


def _dedup_candidates(conn, source: str) -> pd.DataFrame:
    """Number, CRM updated-at, status and keeper of the contacts that share a number and of the current
    duplicates, indexed by id in id order."""
    cols = read_columns(conn, _CANDIDATES_SQL, {"s": source})
    return pd.DataFrame({
        "phone_e164": pd.Series(cols["phone_e164"], dtype=object),
        "crm_updated_at": pd.to_datetime(pd.Series(cols["crm_updated_at"], dtype=object), errors="coerce",
                                         format="mixed"),
        "status": pd.Series(cols["status"], dtype=object),
        "duplicate_of": pd.Series(cols["duplicate_of"], dtype=object),
    }).set_axis(pd.Index(np.asarray(cols["id"], dtype=np.int64)))
