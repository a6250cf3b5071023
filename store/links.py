"""Short links and clicks in the store (``smsflow/links.py`` makes the codes and classifies requests).

The redirect is the hottest path we serve, so it does not go through a transaction per request:
:class:`LinkReader` keeps one plain DBAPI connection per reader thread for the lookup (a read that takes
no write lock on SQLite; autocommit on PostgreSQL, outside the pool), and :class:`ClickWriter` one
connection for the group-committed click batches.
"""
from __future__ import annotations

import threading
from datetime import datetime
from typing import Any


from store.db import bulk_insert

CLICK_FIELDS = ("code", "at", "method", "user_agent", "ip_hash", "bot_reason")


class LinkReader:
    """``reader(code)``: ``(target, expires_at, campaign_id)`` of a short link or None, read on a per-thread
    DBAPI connection."""

    def __init__(self, engine):
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sql = ("SELECT target, expires_at, campaign_id FROM short_links WHERE code = "
                    + ("?" if self.sqlite else "%s"))
        self.local = threading.local()

    def __call__(self, code: str) -> tuple[str, datetime, int] | None:
        conn = getattr(self.local, "conn", None)
        if conn is None:  # one kept connection per reader thread, outside the pool (the service runs a few)
            conn = self.engine.raw_connection()
            if not self.sqlite:
                conn.detach()  # not the pool's any more: no checkout, no pre-ping per lookup
                conn.dbapi_connection.autocommit = True  # each read its own snapshot, nothing to end
            self.local.conn = conn
        try:
            row = self._read(conn, code)
        except Exception:
            self.local.conn = None
            conn.close()
            raise
        if row is None:
            return None
        expires = datetime.fromisoformat(row[1]) if isinstance(row[1], str) else row[1]
        return row[0], expires, int(row[2])

    def _read(self, conn, code: str):
        cur = conn.cursor()
        try:
            cur.execute(self.sql, (code,))
            return cur.fetchone()
        finally:
            cur.close()


class ClickWriter:
    """``write(clicks)``: one transaction on a connection kept for the writer thread (CLICK_FIELDS tuples).

    ``synchronous=False`` (PostgreSQL): the transaction commits with ``synchronous_commit = off``: committed in
    the server (visible, and kept whatever happens to our process), its WAL flushed by the server's WAL writer
    within ~3 x ``wal_writer_delay``, not before the answer. The same promise as SQLite's WAL mode with
    ``synchronous=NORMAL`` (the embedded store): only a crash of the database host can lose the last commits."""

    def __init__(self, engine, synchronous: bool = True):
        self.engine, self.conn = engine, None
        self.relaxed = not synchronous and engine.dialect.name == "postgresql"

    def __call__(self, clicks: list[tuple[Any, ...]]) -> None:
        if self.conn is None:
            self.conn = self.engine.connect()
            if self.relaxed:  # this kept connection only (the session's setting)
                self.conn.exec_driver_sql("SET synchronous_commit TO off")
                self.conn.commit()
        try:
            with self.conn.begin():
                bulk_insert(self.conn, "clicks", CLICK_FIELDS, clicks)
        except Exception:
            self.conn.close()
            self.conn = None
            raise


def store_clicks(engine, clicks: list[tuple[Any, ...]]) -> None:
    """Clicks as ``CLICK_FIELDS`` tuples, in one transaction."""
    with engine.begin() as conn:
        bulk_insert(conn, "clicks", CLICK_FIELDS, clicks)
