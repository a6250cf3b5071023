"""The ``smsflow validate`` command: a CRM export in, the same rows out with each phone normalised
to E.164 and marked (ok, invalid, not_mobile, duplicate, missing). Uses the phone and duplicate
logic of ``tasks.validate``; reads exports through ``smsflow.exports``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from smsflow.exports import ExportError, ExportFormat, missing_columns_hint, read_export, read_header, sniff
from smsflow.duplicates import find_duplicates
from smsflow.phones import normalize_phones_parallel

#: Statuses written by :func:`validate_csv` (the phone statuses plus ``duplicate``).
CSV_STATUSES: tuple[str, ...] = ("ok", "invalid", "not_mobile", "duplicate", "missing")
#: Columns appended by :func:`validate_csv`.
CSV_OUTPUT_COLUMNS: tuple[str, ...] = ("phone_e164", "phone_status", "reason", "duplicate_of")

class ValidationInputError(ValueError):
    """Bad input for validate_csv; the message is meant to be shown to the user as is."""


def validate_csv(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    default_region: str = "RU",
    phone_column: str = "phone",
    fmt: ExportFormat | None = None,
) -> dict[str, int]:
    """Validate and deduplicate the phone numbers of a CRM export.

    Reads ``in_path`` (CSV in any usual encoding and delimiter, detected unless ``fmt`` says, or
    XLSX; see ``smsflow.exports``) with every column as text and
    writes ``out_path`` with every input row in order and every input column
    unchanged, plus ``phone_e164``, ``phone_status`` (``ok``, ``invalid``,
    ``not_mobile``, ``duplicate``, ``missing``), ``reason`` and
    ``duplicate_of``.  Among ``ok`` rows with the same number, one row is
    kept (latest ``updated_at`` if that column exists, else the first); the
    others become ``duplicate`` with ``duplicate_of`` = 0-based data-row index
    of the kept row and reason ``"same number as row N"`` (same 0-based N).

    If the input already contains all four output columns (a previous
    output), they are replaced; a partial clash raises
    :class:`ValidationInputError`.  Returns ``{status: count}`` for all five
    statuses.  Raises :class:`ValidationInputError` with a user-facing
    message for a missing/unreadable file or a missing phone column.
    """
    src = Path(in_path)
    shown = str(in_path)
    try:
        fmt = fmt or sniff(src)
        header = read_header(src, fmt)
    except ExportError as exc:
        raise ValidationInputError(str(exc)) from None
    if phone_column not in header:
        raise ValidationInputError(f"column '{phone_column}' not found in {shown}; columns: {', '.join(header)}"
                                   f"{missing_columns_hint(header)}")
    clash = [c for c in CSV_OUTPUT_COLUMNS if c in header]
    if clash and len(clash) != len(CSV_OUTPUT_COLUMNS):
        raise ValidationInputError(
            f"{shown} already has column(s) {', '.join(clash)} which validate would overwrite; rename them first"
        )
    try:
        df = read_export(src, fmt)
    except ExportError as exc:
        raise ValidationInputError(str(exc)) from None
    if df.shape[1] != len(header):  # pragma: no cover - csv and pandas disagree on the header
        raise ValidationInputError(f"could not read {shown}: header has {len(header)} fields, parsed {df.shape[1]}")
    df.columns = pd.RangeIndex(len(header))  # positional; restores duplicate header names on write
    if clash:  # re-validating a previous output: drop the old derived columns
        keep = [i for i, h in enumerate(header) if h not in CSV_OUTPUT_COLUMNS]
        df = df[keep]
        header = [header[i] for i in keep]
        df.columns = pd.RangeIndex(len(header))
    df = df.reset_index(drop=True)

    phone_pos = header.index(phone_column)
    norm = normalize_phones_parallel(df[phone_pos], default_region)
    status = norm["phone_status"].to_numpy(dtype=object).copy()
    reason = norm["reason"].to_numpy(dtype=object).copy()
    e164 = norm["phone_e164"]

    updated = df[header.index("updated_at")] if "updated_at" in header else None
    dup = find_duplicates(e164.where(norm["phone_status"] == "ok"), updated)
    dup_mask = dup.notna().to_numpy()
    duplicate_of = np.full(len(df), "", dtype=object)
    if dup_mask.any():
        kept = dup[dup_mask].astype("int64").astype("str").to_numpy(dtype=object)
        status[dup_mask] = "duplicate"
        reason[dup_mask] = ("same number as row " + pd.Series(kept, dtype="str")).to_numpy(dtype=object)
        duplicate_of[dup_mask] = kept

    n_in = len(header)
    df[n_in] = e164.fillna("").to_numpy(dtype=object)
    df[n_in + 1] = status
    df[n_in + 2] = reason
    df[n_in + 3] = duplicate_of
    out_header = [*header, *CSV_OUTPUT_COLUMNS]

    dst = Path(out_path)
    if not dst.parent.exists():
        raise ValidationInputError(f"output directory does not exist: {dst.parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            df.to_csv(fh, index=False, header=out_header, lineterminator="\n")
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

    counts = pd.Series(status).value_counts()
    return {s: int(counts.get(s, 0)) for s in CSV_STATUSES}
