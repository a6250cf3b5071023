"""Short links and clicks in the store (``smsflow/links.py`` makes the codes and classifies requests).

The redirect is the hottest path we serve, so it does not go through a transaction per request:
:class:`LinkReader` keeps one plain DBAPI connection per thread for the lookup (a read that takes no
write lock on SQLite and ends its snapshot at once on PostgreSQL), and :class:`ClickWriter` one
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
        if self.sqlite:  # not pooled (store.db): one connection per thread, kept
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = self.engine.raw_connection()
            try:
                row = self._read(conn, code)
            except Exception:
                self.local.conn = None
                conn.close()
                raise
        else:  # PostgreSQL: a pooled connection, back to the pool at once (threads outnumber the pool)
            conn = self.engine.raw_connection()
            try:
                row = self._read(conn, code)
            finally:
                conn.close()
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
            conn.rollback()  # PostgreSQL: end the read's snapshot; SQLite (autocommit): nothing to end


class ClickWriter:
    """``write(clicks)``: one transaction on a connection kept for the writer thread (CLICK_FIELDS tuples)."""

    def __init__(self, engine):
        self.engine, self.conn = engine, None

    def __call__(self, clicks: list[tuple[Any, ...]]) -> None:
        if self.conn is None:
            self.conn = self.engine.connect()
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
