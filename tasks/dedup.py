"""Dedup on the store: contacts of one source that share an E.164 number are merged; the most
recently updated CRM record keeps the number, the others become 'duplicate' pointing at it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import bindparam, text

from smsflow.duplicates import find_duplicates
from store.db import bulk_update, read_chunks, read_columns

__all__ = ["dedup_source"]


def dedup_source(engine, source: str) -> int:
    """Merge contacts of one source sharing an E.164 number: the most recently updated CRM record
    is kept (status valid), the others become 'duplicate' pointing at it. Returns the duplicates.

    Only numbers held by more than one contact can have duplicates, so the whole source is read as
    (id, number hash) pairs only, in chunks, and the numbers, timestamps and current state are read for
    the contacts that may share a number (and the current duplicates, which may have to become valid
    again). Two numbers with the same 64-bit hash only make both contacts candidates: the merge itself
    compares the numbers. (10M numbers read whole as text held ~1.5 GB.)"""
    with engine.begin() as conn:
        id_parts, hash_parts = [], []
        for part in read_chunks(conn, "SELECT id, phone_e164 FROM contacts WHERE source = :s "
                                "AND status IN ('valid', 'duplicate') AND phone_e164 IS NOT NULL", {"s": source}):
            id_parts.append(np.fromiter((r[0] for r in part), dtype=np.int64, count=len(part)))
            hash_parts.append(pd.util.hash_array(np.array([r[1] for r in part], dtype=object), categorize=False))
        current = read_columns(conn, "SELECT id FROM contacts WHERE source = :s AND status = 'duplicate'", {"s": source})["id"]
        all_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
        shared = pd.Series(np.concatenate(hash_parts) if hash_parts else [], dtype="uint64").duplicated(keep=False).to_numpy()
        ids = np.union1d(all_ids[shared], np.asarray(current, dtype=np.int64))  # sorted
        if not len(ids):
            return 0
        df = _dedup_candidates(conn, ids.tolist())
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


def _dedup_candidates(conn, ids: list[int], chunk: int = 500) -> pd.DataFrame:
    """Number, CRM updated-at, status and keeper of the given contacts, indexed by id in id order."""
    sql = text("SELECT id, phone_e164, crm_updated_at, status, duplicate_of FROM contacts WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    rows = []
    for i in range(0, len(ids), chunk):
        rows.extend(conn.execute(sql, {"ids": ids[i : i + chunk]}).all())
    rows.sort(key=lambda r: r[0])
    id_col, phone, updated, status, dup_of = (list(c) for c in zip(*rows))
    return pd.DataFrame({
        "phone_e164": pd.Series(phone, dtype=object),
        "crm_updated_at": pd.to_datetime(pd.Series(updated, dtype=object), errors="coerce", format="mixed"),
        "status": pd.Series(status, dtype=object),
        "duplicate_of": pd.Series(dup_of, dtype=object),
    }).set_axis(pd.Index(np.asarray(id_col, dtype=np.int64)))
