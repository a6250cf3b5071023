"""Great Expectations checks of a raw CRM extract (the data-quality gate of validate-and-dedup).

The suite is built once per run and validates batches of contacts; ``check_extract`` returns what
failed and which rows, so the validate step can quarantine them with a reason.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ExtractCheckResult", "ExtractSchemaError", "check_extract", "check_values"]

# ---------------------------------------------------------------------------
# Great Expectations check of the raw extract
# ---------------------------------------------------------------------------


class ExtractSchemaError(ValueError):
    """A required column is missing from the extract (the run must stop)."""


@dataclass
class ExtractCheckResult:
    """Outcome of :func:`check_extract`.

    ``success`` is False when any *critical* expectation failed (broken
    extract: caller should stop the run).  ``warning`` expectations (e.g.
    duplicate CRM ids, unknown languages) are reported but never fail.
    Each entry of ``results``: ``expectation``, ``column``, ``success``,
    ``unexpected_count``, ``unexpected_percent`` plus ``severity``
    (``critical``/``warning``), ``description``, ``mostly`` and ``error``.
    """

    success: bool
    results: list[dict] = field(default_factory=list)
    row_count: int = 0

    def to_dict(self) -> dict:
        """JSON-safe form (stored with the extract batch it was computed on)."""
        return {"success": self.success, "results": self.results, "row_count": self.row_count}

    @classmethod
    def from_dict(cls, data: dict) -> "ExtractCheckResult":
        return cls(success=bool(data["success"]), results=list(data.get("results") or []),
                   row_count=int(data.get("row_count") or 0))

    @classmethod
    def combine(cls, parts: "Sequence[ExtractCheckResult]") -> "ExtractCheckResult | None":
        """One result for an extract checked chunk by chunk: counts are summed, percentages and
        ``mostly`` verdicts recomputed over all rows (a weighted mean: when every chunk passes a
        ``mostly`` expectation, so does the whole). Expectations without ``mostly`` pass when every
        chunk passed them (id uniqueness is thus checked within chunks only, as documented)."""
        parts = [p for p in parts if p is not None]
        if len(parts) <= 1:
            return parts[0] if parts else None
        groups: dict[tuple, list[dict]] = {}
        for part in parts:
            for r in part.results:
                groups.setdefault((r["expectation"], r["column"], r["description"]), []).append(r)
        results = [_combine_entries(entries) for entries in groups.values()]
        success = all(r["success"] for r in results if r["severity"] == "critical")
        return cls(success=success, results=results, row_count=sum(p.row_count for p in parts))

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.results if not r["success"] and r["severity"] == "critical"]

    @property
    def warnings(self) -> list[dict]:
        return [r for r in self.results if not r["success"] and r["severity"] != "critical"]

    def summary(self) -> str:
        """One-line message, e.g. for stopping a run."""
        if self.success and not self.warnings:
            return f"extract check passed ({self.row_count} rows)"
        parts = []
        for r in self.failures + self.warnings:
            txt = f"{r['description']}"
            if r.get("unexpected_percent") is not None:
                txt += f" ({r['unexpected_count']} rows, {r['unexpected_percent']:.1f}% unexpected)"
            if r.get("error"):
                txt += f" (error: {r['error']})"
            parts.append(("FAILED: " if r["severity"] == "critical" else "warning: ") + txt)
        head = "extract check failed" if not self.success else "extract check passed with warnings"
        return f"{head} ({self.row_count} rows): " + "; ".join(parts)

    def markdown(self) -> str:
        """Markdown table (for a Prefect artifact)."""
        head = "**Extract check: {}** ({} rows)\n\n".format("passed" if self.success else "FAILED", self.row_count)
        lines = [
            "| result | severity | check | column | unexpected | unexpected % |",
            "|---|---|---|---|---:|---:|",
        ]
        for r in self.results:
            mark = "pass" if r["success"] else ("FAIL" if r["severity"] == "critical" else "warn")
            cnt = "" if r.get("unexpected_count") is None else str(r["unexpected_count"])
            pct = "" if r.get("unexpected_percent") is None else f"{r['unexpected_percent']:.2f}"
            desc = r["description"] + (f" (error: {r['error']})" if r.get("error") else "")
            desc = desc.replace("|", "\\|")
            lines.append(f"| {mark} | {r['severity']} | {desc} | {r['column'] or ''} | {cnt} | {pct} |")
        return head + "\n".join(lines) + "\n"


def _combine_entries(entries: list[dict]) -> dict:
    """One expectation's results over several chunks (see :meth:`ExtractCheckResult.combine`)."""
    out = dict(entries[0])
    counts = [e.get("unexpected_count") for e in entries]
    checked = [e.get("checked_count") for e in entries]
    error = next((e["error"] for e in entries if e.get("error")), None)
    out["error"] = error
    if all(c is None for c in counts):
        out["success"] = all(e["success"] for e in entries)
        return out
    unexpected = sum(c or 0 for c in counts)
    out["unexpected_count"] = unexpected
    if all(c is not None for c in checked):
        total = sum(checked)
        out["checked_count"] = total
        out["unexpected_percent"] = 100.0 * unexpected / total if total else 0.0
        mostly = out.get("mostly")
        if mostly is not None:
            out["success"] = error is None and (not total or 1.0 - unexpected / total >= mostly)
            return out
    out["success"] = all(e["success"] for e in entries)
    return out


DEFAULT_LANGUAGES: tuple[str, ...] = ("ru", "en")


def _blank_to_null(s: pd.Series) -> pd.Series:
    """Empty / whitespace-only strings count as null (CSV extracts read with keep_default_na=False)."""
    if s.dtype == object:
        # object columns are walked in Python: converting them to pandas' str dtype (Arrow) costs more
        blank = np.fromiter((type(v) is str and not v.strip() for v in s.tolist()), dtype=bool, count=len(s))
        if blank.any():
            s = s.where(~blank, None)
        return s
    if pd.api.types.is_string_dtype(s.dtype):
        stripped = s.astype("str").str.strip()
        blank = (stripped == "").to_numpy(dtype=bool, na_value=False)
        if blank.any():
            s = s.astype(object).where(~blank, None)
    return s


def check_extract(
    df: pd.DataFrame,
    phone_column: str = "phone",
    id_column: str = "id",
    *,
    language_column: str = "language",
    languages: Collection[str] = DEFAULT_LANGUAGES,
    min_phone_filled: float = 0.5,
    min_id_filled: float = 0.99,
    blanks_cleaned: bool = False,
) -> ExtractCheckResult:
    """Great Expectations check of a raw CRM extract (or one chunk of it).

    Raises :class:`ExtractSchemaError` (before touching GE) if ``id_column``
    or ``phone_column`` is missing.  Expectations (critical ones decide
    ``success``):

    * critical: id and phone columns exist; id not null (``mostly=min_id_filled``);
      phone not null (``mostly=min_phone_filled`` - a mostly-empty phone
      column means a broken extract); phone values contain >= 5 digits
      (``mostly=0.5`` - catches shifted/garbage columns);
    * warning: ids unique (CRM duplicates are reported, not fatal); language
      in ``languages`` (``mostly=0.95``, only if ``language_column`` exists);
      at least one row.

    Empty/whitespace strings count as null (``blanks_cleaned=True``: the caller already turned
    them into None, as the extract does, so they need not be looked for).  Stateless, so it can be run per
    chunk (note: id uniqueness is then only checked within each chunk).
    ``great_expectations`` is imported lazily (it takes seconds to import).
    """
    missing_cols = [c for c in (id_column, phone_column) if c not in df.columns]
    if missing_cols:
        present = ", ".join(map(str, df.columns)) or "(none)"
        which = " and ".join(f"'{c}'" for c in missing_cols)
        noun = "column" if len(missing_cols) == 1 else "columns"
        raise ExtractSchemaError(f"required {noun} {which} not found in extract; columns: {present}")

    checked = [id_column, phone_column]
    has_lang = language_column in df.columns and language_column not in checked
    if has_lang:
        checked.append(language_column)
    data = pd.DataFrame({c: df[c] if blanks_cleaned else _blank_to_null(df[c]) for c in checked})
    data.index = pd.RangeIndex(len(data))

    batch_def, suite = _suite(id_column, phone_column, language_column if has_lang else None, tuple(sorted(languages)),
                              min_phone_filled, min_id_filled)
    res = batch_def.get_batch(batch_parameters={"dataframe": data}).validate(suite)
    del data

    results: list[dict] = []
    for r in res.results:
        cfg = r.expectation_config
        meta = cfg.meta or {}
        info = r.exception_info or {}
        error = None
        if info.get("raised_exception"):
            error = info.get("exception_message")
        else:  # multiple metric errors are keyed by metric id
            for v in info.values():
                if isinstance(v, dict) and v.get("raised_exception"):
                    error = v.get("exception_message")
                    break
        result = r.result or {}
        pct = result.get("unexpected_percent")
        unexpected = result.get("unexpected_count")
        results.append(
            {
                "expectation": cfg.type,
                "column": cfg.kwargs.get("column"),
                "success": bool(r.success) and error is None,
                "unexpected_count": None if unexpected is None else int(unexpected),
                "unexpected_percent": None if pct is None else float(pct),
                "severity": meta.get("severity", "critical"),
                "description": meta.get("description", cfg.type),
                "mostly": cfg.kwargs.get("mostly"),
                "error": error,
                "checked_count": _checked_count(result),
            }
        )
    success = all(r["success"] for r in results if r["severity"] == "critical")
    return ExtractCheckResult(success=success, results=results, row_count=len(df))


_SUITES: dict[tuple, tuple] = {}


def _suite(id_column: str, phone_column: str, language_column: str | None, languages: tuple[str, ...],
           min_phone_filled: float, min_id_filled: float):
    """The batch definition and the suite of these parameters, built once per process and reused for every
    batch. A new ephemeral context per batch was left behind as cyclic garbage holding the batch's rows
    (~6 MB per 50,000 rows, collected only by rare full collections: +1.2 GB in the checks' worker over
    10M contacts) and cost its set-up every time."""
    key = (id_column, phone_column, language_column, languages, min_phone_filled, min_id_filled)
    if key in _SUITES:
        return _SUITES[key]
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch_def = (
        ctx.data_sources.add_pandas(name="crm")
        .add_dataframe_asset(name="contacts")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name="contacts_suite"))
    E = gx.expectations

    def add(exp: Any, severity: str, description: str) -> None:
        exp.meta = {"severity": severity, "description": description}
        suite.add_expectation(exp)

    add(E.ExpectColumnToExist(column=id_column), "critical", f"column '{id_column}' exists")
    add(E.ExpectColumnToExist(column=phone_column), "critical", f"column '{phone_column}' exists")
    add(
        E.ExpectColumnValuesToNotBeNull(column=id_column, mostly=min_id_filled),
        "critical",
        f"'{id_column}' filled in >= {min_id_filled:.0%} of rows",
    )
    add(E.ExpectColumnValuesToBeUnique(column=id_column), "warning", f"'{id_column}' values unique")
    add(
        E.ExpectColumnValuesToNotBeNull(column=phone_column, mostly=min_phone_filled),
        "critical",
        f"'{phone_column}' filled in >= {min_phone_filled:.0%} of rows",
    )
    add(
        E.ExpectColumnValuesToMatchRegex(column=phone_column, regex=r"^\D*(?:\d\D*){5,}$", mostly=0.5),
        "critical",
        f"'{phone_column}' values contain >= 5 digits (>= 50% of filled rows)",
    )
    if language_column is not None:
        add(
            E.ExpectColumnValuesToBeInSet(column=language_column, value_set=sorted(languages), mostly=0.95),
            "warning",
            f"'{language_column}' in {{{', '.join(sorted(languages))}}} (>= 95% of filled rows)",
        )
    add(E.ExpectTableRowCountToBeBetween(min_value=1), "warning", "extract has at least one row")

    _SUITES[key] = batch_def, suite
    return batch_def, suite


def check_values(ids: list, phones: list, languages: list) -> ExtractCheckResult:
    """:func:`check_extract` on the three checked columns of an extract batch, as they will be stored (blank
    strings already None). Module level in a module that imports only pandas: it runs in a worker process
    (``smsflow.warm``) without importing the rest of the project there."""
    return check_extract(pd.DataFrame({
        "id": pd.Series(ids, dtype=object),
        "phone": pd.Series(phones, dtype=object),
        "language": pd.Series(languages, dtype=object),
    }), blanks_cleaned=True)


def warm_up() -> None:
    """What the worker ``smsflow.warm`` starts runs first: the checks on two rows, so that importing Great
    Expectations (~1.1 s) and its first context are done before the extract's first batch arrives."""
    check_values(["1", "2"], ["+7 916 123-45-67", None], ["ru", "en"])


def _checked_count(result: dict) -> int | None:
    """The rows an expectation's unexpected percent is relative to (non-missing rows where GE
    reports missing values separately), kept so that per-chunk results can be combined exactly."""
    if result.get("element_count") is None:
        return None
    return int(result["element_count"]) - int(result.get("missing_count") or 0)


# imported by Great Expectations, never used by these checks (one expectation's chart, two distribution tests)
GX_UNUSED_IMPORTS = ("altair", "scipy.stats")


def _in_worker_process() -> bool:
    """A process of ours started for the checks (smsflow.warm, the phones pool), with no other thread."""
    import multiprocessing
    import threading

    return multiprocessing.parent_process() is not None and threading.active_count() == 1


def _import_gx():
    import logging
    import sys

    # Keep GE quiet: no usage statistics, no INFO chatter.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if "great_expectations" not in sys.modules and _in_worker_process():
        import threading

        from tqdm import tqdm

        from smsflow.lazy_imports import defer

        defer(*GX_UNUSED_IMPORTS)  # ~1 s of the import on a slow machine (smsflow/lazy_imports.py)
        # GE's (disabled) progress bars would give tqdm its default lock, a named semaphore shared with other
        # processes; a worker killed at the end of a preview never unlinks it, and multiprocessing's resource
        # tracker then warns of a "leaked semaphore" on the user's terminal. No bar is shown here: a plain lock.
        tqdm.set_lock(threading.RLock())
    import great_expectations as gx
    from great_expectations.execution_engine import pandas_execution_engine

    # GE fingerprints every pandas batch below HASH_THRESHOLD bytes (an md5 of pandas' row hashes, kept only in
    # the result's batch markers, which these checks never read): 40 % of the checks' CPU (4.7 of 11.4 s for 1M
    # contacts, py-spy). Its own threshold turns that off; the verdicts do not depend on it.
    pandas_execution_engine.HASH_THRESHOLD = 0
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:  # don't override an explicit logging config
        gx_logger.setLevel(logging.WARNING)
    # this one sets itself to INFO and announces a temporary docs directory on every context
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx
