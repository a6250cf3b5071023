"""Duplicate numbers: which row keeps a number that several rows share (pure pandas, a leaf).

Used by the validate step on the store (``tasks/dedup.py``) and by the CLI's CSV validator.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["find_duplicates"]

# ---------------------------------------------------------------------------
# find_duplicates
# ---------------------------------------------------------------------------


def _to_utc(values: pd.Series) -> pd.Series:
    """Parse timestamps to UTC; unparseable/missing -> NaT.  ISO 8601 is vectorised,
    anything else (e.g. "25.11.2025 10:00", day first) is retried per element."""
    if isinstance(values.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(values.dtype):
        return pd.to_datetime(values, utc=True)
    values = values.reset_index(drop=True)
    ts = pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")
    present = np.array(values.notna(), dtype=bool)
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        text = values.astype("str").str.strip()
        present &= np.array((text != "").fillna(False), dtype=bool)
    retry = present & np.array(ts.isna(), dtype=bool)
    if retry.any():
        again = pd.to_datetime(values[retry], utc=True, errors="coerce", format="mixed", dayfirst=True)
        ts = ts.copy()
        ts[retry] = again
    return ts


def find_duplicates(e164: pd.Series, updated_at: pd.Series | None = None) -> pd.Series:
    """Mark rows whose E.164 number already occurs in another, preferred row.

    Rows with the same non-null (and non-empty) ``e164`` form a group; the
    kept row of a group is the one with the latest ``updated_at`` (parsed
    with ``utc=True``; unparseable or missing timestamps count as oldest),
    ties broken by the first row in order; without ``updated_at`` the first
    row is kept.  ``updated_at`` is aligned by position and must have the
    same length.

    Returns a Series with ``e164``'s index: for each duplicate row the index
    label of the kept row, ``<NA>`` otherwise (kept rows, unique numbers,
    nulls).  The dtype is nullable ``Int64`` for integer indexes, ``object``
    otherwise.
    """
    n = len(e164)
    index = e164.index
    values = e164.to_numpy(dtype=object)
    valid = ~pd.isna(values)
    if valid.any():
        valid &= values != ""
    pos = np.flatnonzero(valid)
    keeper = np.full(n, -1, dtype=np.int64)
    if pos.size:
        codes, _ = pd.factorize(values[pos])
        if updated_at is not None:
            if len(updated_at) != n:
                raise ValueError(f"updated_at has {len(updated_at)} rows, e164 has {n}")
            upd = updated_at if isinstance(updated_at, pd.Series) else pd.Series(updated_at)
            ts = _to_utc(upd.reset_index(drop=True).iloc[pos])
            # native resolution (pandas 3 may use us/s): no overflow for years < 1677 or > 2262
            ts_int = np.asarray(ts.dt.tz_convert(None).to_numpy()).view(np.int64)
            nat = np.array(ts.isna(), dtype=bool)
            # ascending sort key: latest first, NaT last
            ts_key = np.where(nat, np.iinfo(np.int64).max, -ts_int)
            order = np.lexsort((pos, ts_key, codes))
        else:
            order = np.lexsort((pos, codes))
        sorted_codes = codes[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = sorted_codes[1:] != sorted_codes[:-1]
        keeper_for_code = np.empty(int(codes.max()) + 1, dtype=np.int64)
        keeper_for_code[sorted_codes[first]] = pos[order[first]]
        k = keeper_for_code[codes]
        dup = k != pos
        keeper[pos[dup]] = k[dup]
    is_dup = keeper >= 0
    if pd.api.types.is_integer_dtype(index.dtype):
        labels = np.zeros(n, dtype=np.int64)
        labels[is_dup] = index.to_numpy()[keeper[is_dup]]
        return pd.Series(pd.arrays.IntegerArray(labels, ~is_dup), index=index, name="duplicate_of")
    out = np.full(n, pd.NA, dtype=object)
    out[is_dup] = index.to_numpy(dtype=object)[keeper[is_dup]]
    return pd.Series(out, index=index, dtype=object, name="duplicate_of")
