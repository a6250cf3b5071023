"""The SQLite spool: what arrived on an SMPP session (receipts, MO) is kept until it is handed out, so a
crash between submit and fetch loses nothing; a multipart message gets ONE receipt once all parts are final."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path

from blocks.gateway import Receipt
from blocks.smpp.pdu import PARTIAL


class _Spool:
    """SQLite file holding what arrived on the SMPP session until it is handed out."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS receipts (id INTEGER PRIMARY KEY, gateway_message_id TEXT,"
                        " status TEXT, error_code TEXT, event_at TEXT, raw TEXT, received_at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS inbound (id INTEGER PRIMARY KEY, gateway_message_id TEXT,"
                        " src TEXT, dst TEXT, text TEXT, received_at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS parts (part_id TEXT PRIMARY KEY, main_id TEXT, at REAL)")
        # concatenated messages: parts expected (accepted at submit), and the final receipts of parts so far
        self.db.execute("CREATE TABLE IF NOT EXISTS multipart (main_id TEXT PRIMARY KEY, expected INTEGER,"
                        " short INTEGER DEFAULT 0, done INTEGER DEFAULT 0, at REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS part_receipts (part_id TEXT PRIMARY KEY, main_id TEXT,"
                        " status TEXT, error_code TEXT, event_at TEXT, raw TEXT)")

    def close(self) -> None:
        self.db.close()

    def add_parts(self, main_id: str, part_ids: list[str]) -> None:
        now = time.time()
        self.db.executemany("INSERT OR REPLACE INTO parts VALUES (?,?,?)", [(p, main_id, now) for p in part_ids])

    def is_later_part(self, gmid: str | None) -> bool:
        if not gmid:
            return False
        return self.db.execute("SELECT 1 FROM parts WHERE part_id = ?", (gmid,)).fetchone() is not None

    def add_multipart(self, main_id: str, parts: int) -> None:
        """A concatenated message of ``parts`` parts whose first part (``main_id``) was accepted."""
        self.db.execute("INSERT OR IGNORE INTO multipart (main_id, expected, at) VALUES (?,?,?)",
                        (main_id, parts, time.time()))

    def multipart_short(self, main_id: str, accepted: int) -> Receipt | None:
        """Only ``accepted`` parts got past submit_sm: expect receipts for those only; the message
        cannot end delivered. Returns the message's receipt if it is complete now."""
        self.db.execute("UPDATE multipart SET expected = ?, short = 1 WHERE main_id = ?", (accepted, main_id))
        return self._settle(main_id)

    def multipart_of(self, gmid: str | None) -> tuple[str, bool] | None:
        """(main id, settled already) when ``gmid`` is a part (the first or a later one) of a
        concatenated message this spool tracks, else None."""
        if not gmid:
            return None
        row = self.db.execute("SELECT main_id, done FROM multipart WHERE main_id = ? OR main_id = "
                              "(SELECT main_id FROM parts WHERE part_id = ?)", (gmid, gmid)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def add_part_receipt(self, main_id: str, r: Receipt) -> Receipt | None:
        """Keep a part's final receipt; returns the message's receipt once every part has one."""
        self.db.execute("INSERT OR REPLACE INTO part_receipts VALUES (?,?,?,?,?,?)",
                        (r.gateway_message_id, main_id, r.status, r.error_code,
                         r.event_at.isoformat() if r.event_at else None, json.dumps(r.raw)))
        return self._settle(main_id)

    _FAILED_FIRST = {"undelivered": 0, "rejected": 1, "expired": 2, "unknown": 3}

    def _settle(self, main_id: str) -> Receipt | None:
        """When every expected part has a final receipt: spool one receipt for the message (id of the
        first part) and mark it done, atomically, so it is handed out exactly once."""
        nested = self.db.in_transaction  # inside a batch of deliver_sm (see _Session): a savepoint
        self.db.execute("SAVEPOINT settle" if nested else "BEGIN IMMEDIATE")
        try:
            row = self.db.execute("SELECT expected, short, done FROM multipart WHERE main_id = ?", (main_id,)).fetchone()
            parts = self.db.execute("SELECT part_id, status, error_code, event_at, raw FROM part_receipts "
                                    "WHERE main_id = ?", (main_id,)).fetchall()
            if row is None or row[2] or len(parts) < row[0]:
                self.db.execute("RELEASE settle" if nested else "COMMIT")
                return None
            failed = sorted((p for p in parts if p[1] != "delivered"), key=lambda p: self._FAILED_FIRST.get(p[1], 9))
            if failed:
                status, error_code = failed[0][1], failed[0][2]
            elif row[1]:
                status, error_code = "undelivered", PARTIAL
            else:
                status, error_code = "delivered", parts[0][2]
            times = [datetime.fromisoformat(p[3]) for p in parts if p[3]]
            r = Receipt(main_id, None, status, error_code, max(times) if times else None,
                        {"parts": {p[0]: {"status": p[1], "error_code": p[2], **json.loads(p[4] or "{}")} for p in parts},
                         "short": bool(row[1])})
            self.add_receipt(r)
            self.db.execute("UPDATE multipart SET done = 1 WHERE main_id = ?", (main_id,))
            self.db.execute("DELETE FROM part_receipts WHERE main_id = ?", (main_id,))
            self.db.execute("RELEASE settle" if nested else "COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK TO settle" if nested else "ROLLBACK")
            if nested:
                self.db.execute("RELEASE settle")
            raise
        return r

    def add_receipt(self, r: Receipt) -> None:
        self.db.execute("INSERT INTO receipts (gateway_message_id, status, error_code, event_at, raw, received_at)"
                        " VALUES (?,?,?,?,?,?)",
                        (r.gateway_message_id, r.status, r.error_code,
                         r.event_at.isoformat() if r.event_at else None, json.dumps(r.raw), time.time()))

    def add_inbound(self, mo: dict) -> None:
        self.db.execute("INSERT INTO inbound (gateway_message_id, src, dst, text, received_at) VALUES (?,?,?,?,?)",
                        (mo["gateway_message_id"], mo["from"], mo["to"], mo["text"], time.time()))

    def take_receipts(self, limit: int) -> list[Receipt]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute("SELECT id, gateway_message_id, status, error_code, event_at, raw FROM receipts"
                                   " ORDER BY id LIMIT ?", (limit,)).fetchall()
            if rows:
                self.db.execute("DELETE FROM receipts WHERE id <= ?", (rows[-1][0],))
            self.db.execute("DELETE FROM parts WHERE at < ?", (time.time() - 7 * 86400,))
            self.db.execute("DELETE FROM multipart WHERE at < ?", (time.time() - 7 * 86400,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [Receipt(g, None, s, e, datetime.fromisoformat(at) if at else None, json.loads(raw or "{}"))
                for _id, g, s, e, at, raw in rows]

    def take_inbound(self, limit: int) -> list[dict]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute("SELECT id, gateway_message_id, src, dst, text FROM inbound ORDER BY id LIMIT ?",
                                   (limit,)).fetchall()
            if rows:
                self.db.execute("DELETE FROM inbound WHERE id <= ?", (rows[-1][0],))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return [{"gateway_message_id": g, "from": s, "to": d, "text": t} for _id, g, s, d, t in rows]
