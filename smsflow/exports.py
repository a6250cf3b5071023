"""Reading CRM exports as data teams have them, every value as text.

CSV in UTF-8 (with or without BOM), UTF-16 (Excel's "Unicode text") or a single-byte code page
(cp1251 from Russian Excel and 1C), separated by ``,``, ``;``, tab or ``|``; XLSX (openpyxl);
Parquet. What is not given is detected: the encoding by the byte-order mark, strict UTF-8, then
charset-normalizer; the delimiter by ``csv.Sniffer``, checked against the first lines (the
sniffer alone is fooled by commas inside phone numbers and addresses). ``ExportFormat.describe()``
says what was read and what was detected, for the run's log.
"""
from __future__ import annotations

from collections.abc import Iterator

import codecs
import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SAMPLE_BYTES = 1 << 20
DELIMITERS = ",;\t|"
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
PARQUET_SUFFIXES = (".parquet", ".pq")
# charset-normalizer's names, in order of preference when a sample fits several
CODE_PAGES = ("utf_16", "utf_32", "cp1251", "koi8_r", "cp1252", "cp866", "koi8_u", "mac_cyrillic", "iso8859_5",
              "cp1250", "iso8859_15", "latin_1", "iso8859_2", "cp1253", "cp1254", "cp1257")
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


class ExportError(ValueError):
    """An export that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class ExportFormat:
    kind: str  # csv | xlsx | parquet
    encoding: str | None = None
    delimiter: str | None = None
    sheet: str | None = None
    detected: tuple[str, ...] = field(default=())  # which of encoding / delimiter were detected

    def describe(self) -> str:
        if self.kind == "xlsx":
            return f"XLSX, sheet {self.sheet!r}" if self.sheet else "XLSX, first sheet"
        if self.kind == "parquet":
            return "Parquet"
        enc = f"encoding {shown_encoding(self.encoding)}" + (" (detected)" if "encoding" in self.detected else "")
        dlm = f"delimiter {_DELIMITER_NAMES.get(self.delimiter or ',', repr(self.delimiter))}" + (
            " (detected)" if "delimiter" in self.detected else "")
        return f"CSV, {enc}, {dlm}"


def shown_encoding(name: str | None) -> str:
    """``utf-8-sig`` (UTF-8, a BOM skipped if there is one) is shown as ``utf-8``."""
    return "utf-8" if name == "utf-8-sig" else str(name)


def delimiter_option(value: str | None) -> str | None:
    """``--delimiter`` as people type it: ``;``, ``,``, ``tab``/``\\t``, ``|``; empty/``auto`` = detect."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    v = {"tab": "\t", "\\t": "\t", "semicolon": ";", "comma": ",", "pipe": "|"}.get(value.strip().lower(), value)
    if len(v) != 1:
        raise ExportError(f"delimiter must be one character (or 'tab'), got {value!r}")
    return v


def encoding_option(value: str | None) -> str | None:
    """``--encoding``: any Python codec name (``cp1251``, ``utf-16``, ``utf-8``); empty/``auto`` = detect."""
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    try:
        name = codecs.lookup(value.strip()).name
    except LookupError:
        raise ExportError(f"unknown encoding {value!r} (try cp1251, utf-8, utf-16)") from None
    return "utf-8-sig" if name == "utf-8" else name  # a BOM is never part of the first column's name


def detect_encoding(head: bytes) -> str:
    """The encoding of a file starting with ``head``."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if head.count(0) > len(head) // 8:  # UTF-16 without a BOM: ASCII characters carry a zero byte
        odd = head[1::2].count(0)
        return "utf-16-le" if odd >= head[0::2].count(0) else "utf-16-be"
    try:  # strict UTF-8; the sample may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8-sig"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    # Candidates are the code pages CRM exports come in (others: --encoding); on short samples
    # several decode equally well, and then the Russian-market default wins (cp1251, then koi8-r).
    # (tabs count as noise to charset-normalizer: a tab-separated export would look like binary)
    matches = list(from_bytes(head.replace(b"\t", b" "), cp_isolation=list(CODE_PAGES), threshold=0.5))
    if not matches:
        raise ExportError("cannot tell the text encoding (is it a binary file? give it with --encoding)")
    least = min(m.chaos for m in matches)
    tied = {m.encoding for m in matches if m.chaos <= least + 0.01}
    return next(cp for cp in CODE_PAGES if cp in tied)

def _consistent_fields(lines: list[str], delimiter: str) -> int:
    """Fields per line when every sampled line has the same number (> 1), else 0."""
    counts = {len(r) for r in csv.reader(lines, delimiter=delimiter) if r}
    return counts.pop() if len(counts) == 1 and min(counts or {0}) > 1 else 0


def detect_delimiter(text: str) -> str:
    """The delimiter of CSV text (its first lines); ``,`` when the file has a single column."""
    lines = text.splitlines()[:50]
    if len(lines) > 1 and not text.endswith(("\n", "\r")):
        lines = lines[:-1]  # the sample may cut the last line
    try:
        sniffed = csv.Sniffer().sniff("\n".join(lines), delimiters=DELIMITERS).delimiter
    except csv.Error:
        sniffed = None
    if sniffed and _consistent_fields(lines, sniffed):
        return sniffed
    scores = {d: _consistent_fields(lines, d) for d in DELIMITERS}
    best = max(scores, key=lambda d: scores[d])
    if scores[best]:
        return best
    header = lines[0] if lines else ""
    return max(DELIMITERS, key=header.count) if any(d in header for d in DELIMITERS) else ","


def sniff(path: str | Path, encoding: str | None = None, delimiter: str | None = None,
          sheet: str | None = None) -> ExportFormat:
    """The format of the export at ``path``; what is given is taken as is, the rest detected."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in EXCEL_SUFFIXES:
        return ExportFormat("xlsx", sheet=sheet)
    if suffix in PARQUET_SUFFIXES:
        return ExportFormat("parquet")
    if suffix == ".xls":
        raise ExportError(f"{p.name}: old Excel (.xls) files are not read; save it as .xlsx or CSV")
    try:
        with open(p, "rb") as f:
            head = f.read(SAMPLE_BYTES)
    except FileNotFoundError:
        raise ExportError(f"input file not found: {p}") from None
    except IsADirectoryError:
        raise ExportError(f"{p} is a directory, not an export file") from None
    if head.startswith(b"PK\x03\x04"):
        raise ExportError(f"{p.name} is a ZIP/XLSX file: name it .xlsx to read it as Excel")
    if not head.strip():
        raise ExportError(f"{p.name} is empty")
    detected = []
    if encoding is None:
        encoding = detect_encoding(head)
        detected.append("encoding")
    if delimiter is None:
        try:
            text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(head, final=False)
        except LookupError:
            raise ExportError(f"unknown encoding {encoding!r}") from None
        delimiter = detect_delimiter(text)
        detected.append("delimiter")
    return ExportFormat("csv", encoding=encoding, delimiter=delimiter, detected=tuple(detected))


_READ_ERRORS = (FileNotFoundError, UnicodeDecodeError, pd.errors.EmptyDataError, ValueError, KeyError,
                pd.errors.ParserError, OSError)


def _read_error(exc: BaseException, p: Path, fmt: ExportFormat) -> ExportError:
    """One line, with the file's name and a hint, for what a reader (pandas, openpyxl, csv) raised."""
    if isinstance(exc, FileNotFoundError):
        return ExportError(f"input file not found: {p}")
    if isinstance(exc, UnicodeDecodeError):
        return ExportError(f"{p.name} is not valid {shown_encoding(fmt.encoding)} ({exc.reason} at byte {exc.start}); "
                           "give the file's encoding with --encoding (e.g. cp1251, utf-16)")
    if isinstance(exc, pd.errors.EmptyDataError):
        return ExportError(f"{p.name} is empty (no header row)")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ExportError(f"cannot read {p.name} ({fmt.describe()}): {msg}")


def _read_csv(p: Path, fmt: ExportFormat, **options) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """pandas' CSV reader as every export is read: all text, empty cells ``""``, no index column. ``object``, not
    ``str``: the same Python strings, without pandas 3's detour through Arrow strings and back (1M rows of the
    demo export: 2.8-4.4 s instead of 5.7-8.0 s)."""
    return pd.read_csv(p, dtype=object, keep_default_na=False, na_filter=False, sep=fmt.delimiter, encoding=fmt.encoding,
                       index_col=False, **options)


def _as_text_frame(df: pd.DataFrame) -> pd.DataFrame:
    df.columns = [str(c).strip() for c in df.columns]
    return df.astype(object)


def read_export(path: str | Path, fmt: ExportFormat | None = None, nrows: int | None = None) -> pd.DataFrame:
    """The export as a DataFrame of text (``object`` columns, empty cells ``""``; Parquet keeps
    its types, missing values ``None``). Raises ExportError with the file's name and a hint."""
    p = Path(path)
    fmt = fmt or sniff(p)
    try:
        if fmt.kind == "parquet":
            df = pd.read_parquet(p)
            df = (df.head(nrows) if nrows else df).astype(object)
            return df.where(df.notna(), None)
        if fmt.kind == "xlsx":
            df = pd.read_excel(p, sheet_name=fmt.sheet or 0, dtype=str, keep_default_na=False, na_filter=False,
                               nrows=nrows, engine="openpyxl")
        else:
            df = _read_csv(p, fmt, nrows=nrows)
    except _READ_ERRORS as exc:
        raise _read_error(exc, p, fmt) from None
    return _as_text_frame(df)


def repeated_values(path: str | Path, fmt: ExportFormat, column: str, chunksize: int = 200_000):
    """Which rows of a CSV export share their (stripped, non-blank) ``column`` value with another row: a
    boolean array in file order, from one cheap pass over that column (a file that cannot be decoded fails
    here; a row with too many fields does not: pandas ignores fields it does not read).

    The values are kept as 64-bit hashes, not as text (10M CRM ids as Python strings held ~700 MB for the
    whole extract); two different values with the same hash would only mark both rows as repeated, which
    costs nothing but their place in the batch order."""
    p = Path(path)
    hashes, blank, columns = [], [], 1
    try:
        with _read_csv(p, fmt, usecols=lambda c: str(c).strip() == column, chunksize=chunksize) as reader:
            for df in reader:
                columns = df.shape[1]
                if columns != 1:
                    break
                values = df.iloc[:, 0].str.strip()
                hashes.append(pd.util.hash_pandas_object(values, index=False).to_numpy())
                blank.append((values == "").to_numpy())
    except _READ_ERRORS as exc:
        raise _read_error(exc, p, fmt) from None
    if columns != 1 or (not hashes and sum(h == column for h in read_header(p, fmt)) != 1):
        raise ExportError(f"{p.name}: no single column named {column!r}")
    if not hashes:
        return np.zeros(0, dtype=bool)
    h = np.concatenate(hashes)
    return pd.Series(h).duplicated(keep=False).to_numpy() & ~np.concatenate(blank)


def read_csv_chunks(path: str | Path, fmt: ExportFormat, chunksize: int) -> Iterator[pd.DataFrame]:
    """A CSV export in chunks of ``chunksize`` rows, each like :func:`read_export`'s frame; its index
    counts rows from the start of the file."""
    p = Path(path)
    try:
        with _read_csv(p, fmt, chunksize=chunksize) as reader:
            for df in reader:
                yield _as_text_frame(df)
    except _READ_ERRORS as exc:
        raise _read_error(exc, p, fmt) from None


def read_header(path: str | Path, fmt: ExportFormat | None = None) -> list[str]:
    """The column names of the export (CSV: the raw header, duplicates kept)."""
    p = Path(path)
    fmt = fmt or sniff(p)
    if fmt.kind != "csv":
        return list(read_export(p, fmt, nrows=1).columns)
    try:
        with open(p, newline="", encoding=fmt.encoding) as fh:
            header = next(csv.reader(fh, delimiter=fmt.delimiter), None)
    except UnicodeDecodeError as exc:
        raise _read_error(exc, p, fmt) from None
    except csv.Error as exc:
        raise ExportError(f"could not read the header of {p.name}: {exc}") from None
    if not header:
        raise ExportError(f"{p.name} is empty (no header row)")
    return [h.strip() for h in header]


def missing_columns_hint(columns: list[str]) -> str:
    """A hint when a file was read as one column (the delimiter given does not match)."""
    if len(columns) == 1 and any(d in columns[0] for d in DELIMITERS):
        found = next(d for d in DELIMITERS if d in columns[0])
        return (f" (the file was read as one column: it looks separated by {_DELIMITER_NAMES[found]}; "
                f"use --delimiter {'tab' if found == chr(9) else found!r})")
    return ""



# --------------------------------------------------------------------------- an export as a CRM source
CONTACT_COLUMNS = (
    "id",
    "first_name",
    "last_name",
    "phone",
    "email",
    "language",
    "timezone",
    "sms_consent",
    "consent_at",
    "updated_at",
)


class CrmSourceError(RuntimeError):
    """A CRM source that cannot be read (bad URL, missing file, broken query)."""


@dataclass
class ExportSource:
    """A CRM export file read as a CRM source (the interface of ``blocks.crm.CrmSource``), without Prefect.

    ``blocks.crm.CsvCrm``, the Block users save and schedule, reads through it; ``smsflow campaign --dry-run``
    uses it directly, so a preview never imports Prefect (1.4-1.8 s of start-up on these machines)."""

    ordered_by_updated_at = False  # a file in any order: the watermark moves once the last batch is committed

    path: str
    source_name: str = "crm"
    column_map: dict[str, str] = field(default_factory=dict)
    delimiter: str | None = None
    encoding: str | None = None
    sheet: str | None = None
    orders_path: str | None = None
    logger: Any = field(default=None, repr=False, compare=False)  # where "reading X: format" goes

    @property
    def updated_at_field(self) -> str:
        return self.column_map.get("updated_at", "updated_at")

    @property
    def has_orders(self) -> bool:
        return bool(self.orders_path)

    def event_customer(self, event_type: str, entity_id: str | None, payload: dict) -> dict | None:
        return None  # an export answers no webhook

    def _error(self, what: str) -> CrmSourceError:
        return CrmSourceError(f"CSV CRM '{self.source_name}': {what}")

    def _rename(self, df: pd.DataFrame) -> pd.DataFrame:
        if not self.column_map:
            return df
        return df.rename(columns={theirs: ours for ours, theirs in self.column_map.items()})

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame] | None:
        """The orders export (its encoding and delimiter detected on their own), one batch; re-read whole each
        time (the upsert by order id makes that idempotent; a refund re-exported turns revenue off)."""
        if not self.orders_path:
            return None
        p = Path(self.orders_path)
        if not p.is_file():
            raise self._error(f"orders file not found: {p}")
        try:
            df = read_export(p, sniff(p))
        except ExportError as exc:
            raise self._error(f"orders: {exc}") from None
        df.columns = [str(c).strip() for c in df.columns]
        if "updated_at" not in df.columns and "ordered_at" in df.columns:
            df["updated_at"] = df["ordered_at"]
        return self._since(df, since)

    def export_format(self) -> ExportFormat:
        """What the file is, as given or detected (raises CrmSourceError)."""
        try:
            return sniff(self.path, encoding=encoding_option(self.encoding), delimiter=delimiter_option(self.delimiter),
                         sheet=self.sheet or None)
        except ExportError as exc:
            raise self._error(str(exc)) from None

    def estimate_rows(self, since: str | None = None) -> int | None:
        """Lines in the file (Parquet: rows in its metadata); ``since`` is ignored (an upper bound)."""
        p = Path(self.path)
        try:
            if p.suffix.lower() in PARQUET_SUFFIXES:
                import pyarrow.parquet as pq

                return int(pq.ParquetFile(p).metadata.num_rows)
            if p.suffix.lower() in EXCEL_SUFFIXES:
                return None
            with open(p, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except Exception:  # noqa: BLE001 - only a hint
            return None

    def read_all(self, nrows: int | None = None) -> pd.DataFrame:
        """The export, renamed to our columns (``nrows``: only its first rows, for a quick check)."""
        p, fmt = self._open(announce=nrows is None)
        return self._read(p, fmt, nrows)

    def _open(self, announce: bool) -> tuple[Path, ExportFormat]:
        """The file and its format (as given or detected); ``announce``: say in the log what is read."""
        p = Path(self.path)
        if not p.is_file():
            raise self._error(f"file not found: {p}")
        fmt = self.export_format()
        if announce:
            (self.logger or logging.getLogger("smsflow.crm")).info("reading %s: %s", p.name, fmt.describe())
        return p, fmt

    def _read(self, p: Path, fmt: ExportFormat, nrows: int | None = None) -> pd.DataFrame:
        try:
            return self._rename(read_export(p, fmt, nrows=nrows))
        except ExportError as exc:
            raise self._error(str(exc)) from None

    def fetch(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        """The export in batches of ``batch_size`` rows (CSV; XLSX and Parquet: one batch). The rows of
        a CRM id that appears more than once are held back and come together in the last batch, so the
        extract sees them side by side (the latest wins, the others are quarantined as merged)."""
        p, fmt = self._open(announce=True)
        if fmt.kind != "csv":
            yield from self._since(self._read(p, fmt), since)
            return
        id_column = self.column_map.get("id", "id")
        try:
            repeated = repeated_values(p, fmt, id_column)
            held: list[pd.DataFrame] = []
            for chunk in read_csv_chunks(p, fmt, max(1, int(batch_size))):
                mask = repeated[chunk.index.to_numpy()]
                if mask.any():
                    held.append(chunk[mask])
                    chunk = chunk[~mask]
                yield from self._since(self._rename(chunk), since)
        except ExportError as exc:
            raise self._error(str(exc)) from None
        if held:
            yield from self._since(self._rename(pd.concat(held)), since)

    @staticmethod
    def _since(df: pd.DataFrame, since: str | None) -> Iterator[pd.DataFrame]:
        if since is not None and "updated_at" in df.columns:
            ts = pd.to_datetime(df["updated_at"], errors="coerce", utc=True, format="mixed")
            mark = pd.to_datetime(since, utc=True, format="mixed")
            # rows without a parseable updated-at are always taken (the upsert is idempotent)
            df = df[ts.isna() | (ts >= mark)]
        if len(df):
            yield df
