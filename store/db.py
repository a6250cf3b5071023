"""Engine, migrations and bulk helpers for the store.

SQLite (embedded default) and PostgreSQL share one code path; bulk writes go through
the driver directly (``executemany`` on SQLite, ``COPY`` on PostgreSQL), never through
row-by-row ORM adds.
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

_ENGINES: dict[str, Engine] = {}
_LOCK = threading.Lock()
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _register_sqlite_adapters() -> None:
    """Datetimes bound as parameters must compare correctly with stored ones: one text format
    everywhere (SQLAlchemy's own for SQLite), microseconds always written."""
    import sqlite3

    sqlite3.register_adapter(datetime, lambda d: _sqlite_value(d))
    sqlite3.register_adapter(date, lambda d: d.isoformat())


def _sqlite_setup(engine: Engine) -> None:
    """WAL, a busy timeout, FKs, and BEGIN IMMEDIATE so concurrent writers queue instead of failing."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - driver hook
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.execute("PRAGMA cache_size=-65536")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - driver hook
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process; the schema is migrated on first use."""
    if url is None:
        from smsflow.settings import get_settings

        url = get_settings().store_url
    with _LOCK:
        eng = _ENGINES.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                _register_sqlite_adapters()
                eng = create_engine(url, poolclass=NullPool, connect_args={"timeout": 60})
                _sqlite_setup(eng)
            else:
                if url.startswith("postgresql://") or url.startswith("postgres://"):
                    url_eff = "postgresql+psycopg://" + url.split("://", 1)[1]
                else:
                    url_eff = url
                eng = create_engine(url_eff, pool_pre_ping=True, pool_size=5, max_overflow=5)
            migrate(eng)
            _ENGINES[url] = eng
        return eng


def dispose_engines() -> None:
    with _LOCK:
        for eng in _ENGINES.values():
            eng.dispose()
        _ENGINES.clear()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = None
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        if conn.in_transaction():
            conn.commit()


@contextmanager
def begin(url: str | None = None):
    """A transaction on the store's engine."""
    with get_engine(url).begin() as conn:
        yield conn


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


# --------------------------------------------------------------------------- values


_PLAIN = (str, int, bool)


def _py(value: Any) -> Any:
    """A driver-friendly Python value (pandas/numpy scalars, NaN -> None, dict -> JSON)."""
    t = type(value)
    if value is None or t in _PLAIN:  # the hot path: most cells
        return value
    if t is float:
        return None if value != value else value
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(_json_clean(value), ensure_ascii=False, default=str, allow_nan=False)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    try:
        import pandas as pd

        if value is pd.NaT or (not isinstance(value, (str, bytes, list, dict)) and pd.isna(value)):
            return None
        if isinstance(value, pd.Timestamp):
            value = value.to_pydatetime()
    except (TypeError, ValueError):
        pass
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            from datetime import timezone

            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value
    return value


def _json_clean(obj: Any) -> Any:
    """JSON-safe: NaN/NaT/NA -> null (PostgreSQL rejects NaN in json), datetimes -> ISO text."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if obj is None or isinstance(obj, (str, int, bool, float)):
        return obj
    try:
        import pandas as pd

        if pd.isna(obj):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _sqlite_value(value: Any) -> Any:
    t = type(value)
    if value is None or t in _PLAIN:
        return value
    value = _py(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, date):
        return value.isoformat()
    return value


def _copy_value(value: Any) -> Any:
    return _py(value)


# --------------------------------------------------------------------------- bulk writes


def bulk_insert(
    conn: Connection,
    table: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    on_conflict: Literal["error", "ignore", "update"] = "error",
    conflict_columns: Sequence[str] = (),
    update_columns: Sequence[str] = (),
    json_columns: Sequence[str] = (),
) -> int:
    """Insert many rows fast; optionally skip or update rows that hit a unique key.

    Returns the number of rows handed to the database.
    """
    cols = ", ".join(columns)
    conflict = ""
    if on_conflict != "error":
        target = f"({', '.join(conflict_columns)})"
        if on_conflict == "ignore":
            conflict = f" ON CONFLICT {target} DO NOTHING"
        else:
            sets = ", ".join(f"{c} = excluded.{c}" for c in update_columns)
            conflict = f" ON CONFLICT {target} DO UPDATE SET {sets}"
    if is_postgres(conn):
        return _pg_copy_insert(conn, table, columns, rows, conflict, json_columns)
    sql = f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' for _ in columns)}){conflict}"
    return executemany(conn, sql, rows)


def _pg_copy_insert(conn, table, columns, rows, conflict, json_columns) -> int:
    raw = conn.connection.driver_connection
    tmp = f"_tmp_{table}"
    cols = ", ".join(columns)
    n = 0
    with raw.cursor() as cur:
        cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {tmp} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP")
        cur.execute(f"TRUNCATE {tmp}")
        with cur.copy(f"COPY {tmp} ({cols}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(tuple(_copy_value(v) for v in row))
                n += 1
        cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {tmp}{conflict}")
        cur.execute(f"TRUNCATE {tmp}")
    return n


def bulk_update(
    conn: Connection,
    table: str,
    key: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> int:
    """Update many rows by ``key``; each row is ``(*values_for_columns, key_value)``."""
    if is_postgres(conn):
        raw = conn.connection.driver_connection
        tmp = f"_upd_{table}"
        n = 0
        with raw.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {tmp} AS SELECT {', '.join(columns)}, {key} FROM {table} WITH NO DATA"
            )
            cur.execute(f"TRUNCATE {tmp}")
            with cur.copy(f"COPY {tmp} ({', '.join(columns)}, {key}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(tuple(_copy_value(v) for v in row))
                    n += 1
            sets = ", ".join(f"{c} = u.{c}" for c in columns)
            cur.execute(f"UPDATE {table} AS t SET {sets} FROM {tmp} AS u WHERE t.{key} = u.{key}")
            cur.execute(f"TRUNCATE {tmp}")
        return n
    sets = ", ".join(f"{c} = ?" for c in columns)
    return executemany(conn, f"UPDATE {table} SET {sets} WHERE {key} = ?", rows)


def executemany(conn: Connection, sql: str, rows: Iterable[Sequence[Any]], chunk: int = 50_000) -> int:
    """Run a qmark-style statement for many rows through the driver's executemany, in chunks."""
    pg = is_postgres(conn)
    if pg:
        sql = sql.replace("?", "%s")
    convert = _copy_value if pg else _sqlite_value
    cur = conn.connection.driver_connection.cursor()
    n = 0
    batch: list[tuple] = []
    try:
        for row in rows:
            batch.append(tuple(convert(v) for v in row))
            if len(batch) >= chunk:
                cur.executemany(sql, batch)
                n += len(batch)
                batch.clear()
        if batch:
            cur.executemany(sql, batch)
            n += len(batch)
    finally:
        cur.close()
    return n


def read_frame(conn: Connection, sql: str, params: dict[str, Any] | None = None, parse_dates: Sequence[str] = ()):
    """A query into a DataFrame with object columns kept as Python objects."""
    import pandas as pd
    from sqlalchemy import text

    res = conn.execute(text(sql), params or {})
    cols = list(res.keys())
    data = res.fetchall()
    df = pd.DataFrame.from_records(data, columns=cols)
    for c in parse_dates:
        if c in df.columns:
            df[c] = pd.to_datetime(df[c], errors="coerce", format="mixed")
    return df


def utcnow() -> datetime:
    from datetime import timezone

    return datetime.now(timezone.utc).replace(tzinfo=None)
