"""CRM sources as Prefect Blocks.

One abstract interface, ``CrmSource``: it yields batches (DataFrames) of CRM rows whose
columns are already renamed to our schema (``CONTACT_COLUMNS``), newer than a watermark.
``SqlCrm`` reads any SQLAlchemy URL with a configurable query; ``CsvCrm`` reads a CSV, XLSX or
Parquet export. REST CRMs (amoCRM, Bitrix24, HubSpot) implement the same interface.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar, Optional

import pandas as pd
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

# CONTACT_COLUMNS and CrmSourceError live beside the export reader (no Prefect) and are this module's too
from smsflow.exports import CONTACT_COLUMNS, CrmSourceError, ExportFormat, ExportSource

__all__ = ["CONTACT_COLUMNS", "CrmSource", "CrmSourceError", "CsvCrm", "SqlCrm"]


def _log():
    """The run's logger inside a flow or task run, else this module's."""
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("smsflow.crm")


class CrmSource(Block, ABC):
    """A CRM we extract contacts from, incrementally by an updated-at watermark."""

    _block_type_name = "CRM Source"
    #: fetch() yields batches in updated-at order, so the watermark may move after each committed batch;
    #: when False (a file in any order) it moves only once the last batch is committed.
    ordered_by_updated_at: ClassVar[bool] = True

    source_name: str = Field(default="crm", description="Name of this source in the store (contacts are keyed by it).")
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="Our column name -> the CRM's column name, for columns named differently "
        "(e.g. {'phone': 'mobile'}). Columns not mapped go into the contact's attributes.",
    )

    def _rename(self, df: pd.DataFrame) -> pd.DataFrame:
        if not self.column_map:
            return df
        reverse = {theirs: ours for ours, theirs in self.column_map.items()}
        return df.rename(columns=reverse)

    @property
    def updated_at_field(self) -> str:
        return self.column_map.get("updated_at", "updated_at")

    @property
    def has_orders(self) -> bool:
        """Whether :meth:`fetch_orders` reads anything (the extract flow then reads orders too)."""
        return False

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame] | None:
        """Orders/deals changed since ``since`` (by ``updated_at``), in batches with the columns
        ``order_id, contact_id`` (the CRM's ids), ``amount, status, ordered_at, updated_at`` and optionally
        ``currency``; None when this source has no orders."""
        return None

    def event_customer(self, event_type: str, entity_id: str | None, payload: dict) -> dict | None:
        """The customer a CRM webhook event is about when the event itself does not name one
        (amoCRM and Bitrix24 send only the deal's id): ``{"crm_id", "phone", "language"}`` (any may
        be None) or None when unknown. Sources that cannot look it up return None."""
        return None

    def estimate_rows(self, since: str | None = None) -> int | None:
        """About how many rows ``fetch(since)`` yields, if the source can tell cheaply (None: unknown).
        The extract reads in a separate process only when that pays for the process start."""
        return None

    @abstractmethod
    def fetch(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        """Yield batches of rows with ``updated_at >= since`` (all rows when ``since`` is None),
        in updated-at order where the source allows, columns renamed to ours."""


class SqlCrm(CrmSource):
    """Any database SQLAlchemy can reach; the query is configurable."""

    _block_type_name = "SQL CRM"

    url: SecretStr = Field(description="SQLAlchemy URL of the CRM database (may contain a password).")
    query: str = Field(
        default="SELECT * FROM contacts",
        description="Query returning one row per contact; it is wrapped for the watermark filter.",
    )

    orders_query: str | None = Field(
        default=None,
        description="Query returning one row per order/deal with the columns order_id, contact_id, amount, status, "
                    "ordered_at, updated_at (and optionally currency); a refund or cancellation must move "
                    "updated_at. Unset: no orders from this CRM.",
    )

    @property
    def has_orders(self) -> bool:
        return bool(self.orders_query)

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame] | None:
        if not self.orders_query:
            return None
        return self._stream(self.orders_query, "updated_at", since, batch_size, rename=False)

    def estimate_rows(self, since: str | None = None) -> int | None:
        from sqlalchemy import create_engine, text

        sql = f"SELECT COUNT(*) FROM ({self.query}) AS crm_q"
        if since is not None:
            sql += f" WHERE crm_q.{self.updated_at_field} >= :since"
        try:
            engine = create_engine(self.url.get_secret_value())
            try:
                with engine.connect() as conn:
                    return int(conn.execute(text(sql), {"since": since} if since is not None else {}).scalar() or 0)
            finally:
                engine.dispose()
        except Exception:  # noqa: BLE001 - only a hint: fetch reports real problems with a clear message
            return None

    def fetch(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        return self._stream(self.query, self.updated_at_field, since, batch_size)

    def _stream(self, query: str, upd: str, since: str | None, batch_size: int,
                rename: bool = True) -> Iterator[pd.DataFrame]:
        from sqlalchemy import create_engine, text

        sql = f"SELECT * FROM ({query}) AS crm_q"
        params: dict[str, object] = {}
        if since is not None:
            sql += f" WHERE crm_q.{upd} >= :since"
            params["since"] = since
        sql += f" ORDER BY crm_q.{upd}"
        try:
            engine = create_engine(self.url.get_secret_value())
        except Exception as exc:  # noqa: BLE001 - the URL is secret: never echo it
            raise CrmSourceError(f"SQL CRM '{self.source_name}': invalid database URL ({type(exc).__name__})") from None
        try:
            with engine.connect() as conn:
                result = conn.execution_options(stream_results=True).execute(text(sql), params)
                cols = list(result.keys())
                # plain tuples from the DBAPI cursor (text() has no result processors): much faster than Rows
                cur = result.cursor
                while True:
                    rows = cur.fetchmany(batch_size)
                    if not rows:
                        break
                    frame = _records_frame(rows, cols)
                    yield self._rename(frame) if rename else frame
                result.close()
        except CrmSourceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CrmSourceError(f"SQL CRM '{self.source_name}': query failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        finally:
            engine.dispose()


def _records_frame(rows: list[tuple], cols: list[str]) -> pd.DataFrame:
    """DBAPI rows -> DataFrame, like ``DataFrame.from_records`` (numbers, dates and NULLs inferred the
    same way) except that text columns stay ``object``: pandas 3 would copy each of them into Arrow
    strings, which the extract then copies back into Python strings (several seconds per million rows)."""
    if len(set(cols)) != len(cols) or not rows:
        return pd.DataFrame.from_records(rows, columns=cols, coerce_float=False)
    data = {}
    for c, values in zip(cols, zip(*rows)):
        obj = pd.Series(values, dtype=object)
        data[c] = obj if pd.api.types.infer_dtype(obj, skipna=True) == "string" else pd.Series(list(values))
    return pd.DataFrame(data)


class CsvCrm(CrmSource):
    """A CRM export: CSV (any usual encoding and delimiter, detected when not given), XLSX or
    Parquet; every value is read as text, nothing is coerced (``smsflow.exports.ExportSource`` reads it)."""

    _block_type_name = "CSV CRM"
    ordered_by_updated_at: ClassVar[bool] = ExportSource.ordered_by_updated_at

    path: str = Field(description="Path of the CSV, XLSX or Parquet file.")
    delimiter: Optional[str] = Field(default=None, description="CSV delimiter (',', ';', tab); empty: detect.")
    encoding: Optional[str] = Field(default=None, description="CSV encoding (utf-8, cp1251, utf-16); empty: detect.")
    sheet: Optional[str] = Field(default=None, description="XLSX sheet name; empty: the first sheet.")
    orders_path: Optional[str] = Field(
        default=None, description="Orders/deals export (CSV in any usual encoding, XLSX or Parquet) with order_id, "
        "contact_id (the CRM's contact id), amount, status, ordered_at[, updated_at, currency]; empty: no orders.")

    def export_source(self) -> ExportSource:
        """The plain reader of this Block's file (logging to the run's log inside a flow)."""
        return ExportSource(path=self.path, source_name=self.source_name, column_map=dict(self.column_map),
                            delimiter=self.delimiter, encoding=self.encoding, sheet=self.sheet,
                            orders_path=self.orders_path, logger=_log())

    @property
    def has_orders(self) -> bool:
        return bool(self.orders_path)

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame] | None:
        return self.export_source().fetch_orders(since, batch_size)

    def export_format(self) -> ExportFormat:
        return self.export_source().export_format()

    def estimate_rows(self, since: str | None = None) -> int | None:
        return self.export_source().estimate_rows(since)

    def read_all(self, nrows: int | None = None) -> pd.DataFrame:
        return self.export_source().read_all(nrows)

    def fetch(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        return self.export_source().fetch(since, batch_size)
