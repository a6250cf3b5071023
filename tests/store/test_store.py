"""The store on SQLite and PostgreSQL: migrations, bulk writes, safe concurrent claims."""
from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import inspect, text

from store.db import bulk_insert, bulk_update, get_engine, utcnow
from tests.helpers import DAYTIME


def test_migrations_create_every_table(engine):
    names = set(inspect(engine).get_table_names())
    assert {"contacts", "quarantine", "campaigns", "segments", "segment_memberships", "outbox", "delivery_receipts",
            "inbound_messages", "event_log", "watermarks", "alembic_version"} <= names
    cols = {c["name"] for c in inspect(engine).get_columns("outbox")}
    assert {"idempotency_key", "state", "attempts", "gateway_message_id", "planned_at", "queued_at", "submitted_at",
            "final_at", "encoding", "segments", "cost", "text"} <= cols


def test_migrate_is_idempotent(any_store):
    from store.db import dispose_engines, migrate

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from store.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head == sorted(p.name[:4] for p in (MIGRATIONS_DIR / "versions").glob("0*.py"))[-1]  # one line of history
    eng = get_engine(any_store)
    migrate(eng)  # second upgrade to head is a no-op
    with eng.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    dispose_engines()


def test_a_store_at_the_newest_revision_opens_without_alembic_and_an_older_one_is_upgraded(any_store, monkeypatch):
    """``migrate`` recognises a store at head with one query (the head read from the migration files, the
    same as Alembic's); a store one revision behind still goes through Alembic's upgrade."""
    import alembic.command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from store.db import MIGRATIONS_DIR, _head_revision, dispose_engines, migrate

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    assert _head_revision() == head
    eng = get_engine(any_store)
    upgrades = []
    real = alembic.command.upgrade
    monkeypatch.setattr(alembic.command, "upgrade", lambda *a, **k: (upgrades.append(a[1]), real(*a, **k)))
    migrate(eng)
    assert upgrades == []  # at head: Alembic not run
    previous = script.get_revision(head).down_revision
    with eng.connect() as c:  # one revision behind: the newest step undone by Alembic
        cfg.attributes["connection"] = c
        alembic.command.downgrade(cfg, previous)
        c.commit()
    with eng.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == previous
    migrate(eng)
    assert upgrades == ["head"]
    with eng.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    dispose_engines()


def _campaign(conn) -> int:
    conn.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                      "VALUES ('c', 's', 'all', 't', 'marketing', 0, 'running')"))
    return conn.execute(text("SELECT id FROM campaigns WHERE name = 'c'")).scalar()


def _contacts(conn, n: int) -> list[int]:
    bulk_insert(conn, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status"),
                [("s", f"c{i}", f"+7916{i:07d}", True, "valid") for i in range(n)])
    return [r[0] for r in conn.execute(text("SELECT id FROM contacts ORDER BY id"))]


def _outbox_rows(cid: int, n: int, start: int = 0, contact_ids: list[int] | None = None):
    now = utcnow()
    return [(f"k{i}", cid, contact_ids[i] if contact_ids else None, "main", f"+7916{i:07d}", "текст", "UCS-2", 1, 1.5, "planned", 0, now, now)
            for i in range(start, start + n)]


OUT_COLS = ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding", "segments", "cost",
            "state", "attempts", "planned_at", "updated_at")


def test_bulk_insert_ignore_and_update(engine):
    with engine.begin() as conn:
        cid = _campaign(conn)
        assert bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 1000)) == 1000
    with engine.begin() as conn:
        # the same idempotency keys again: nothing new
        bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 1500), on_conflict="ignore", conflict_columns=("idempotency_key",))
        assert conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar() == 1500
        assert conn.execute(text("SELECT text FROM outbox WHERE idempotency_key = 'k5'")).scalar() == "текст"
    with engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM outbox ORDER BY id LIMIT 10"))]
        bulk_update(conn, "outbox", "id", ("state", "attempts"), [("queued", 3, i) for i in ids])
        assert conn.execute(text("SELECT COUNT(*) FROM outbox WHERE state = 'queued' AND attempts = 3")).scalar() == 10


def test_bulk_insert_of_likely_new_rows_falls_back_when_one_exists(engine):
    """``likely_new``: straight COPY on PostgreSQL under a savepoint; a row that exists after all rolls the
    savepoint back and the rows take the usual ON CONFLICT path, in the same transaction, same result."""
    with engine.begin() as conn:
        cid = _campaign(conn)
        assert bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 500), on_conflict="ignore",
                           conflict_columns=("idempotency_key",), likely_new=True) == 500
        conn.execute(text("UPDATE outbox SET text = 'sent before' WHERE idempotency_key = 'k7'"))
    with engine.begin() as conn:
        bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 800), on_conflict="ignore",
                    conflict_columns=("idempotency_key",), likely_new=True)  # 500 of them exist: fallback
        conn.execute(text("UPDATE outbox SET attempts = 9 WHERE idempotency_key = 'k700'"))  # the transaction lives on
    with engine.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM outbox")).scalar() == 800
        assert conn.execute(text("SELECT text FROM outbox WHERE idempotency_key = 'k7'")).scalar() == "sent before"
        assert conn.execute(text("SELECT attempts FROM outbox WHERE idempotency_key = 'k700'")).scalar() == 9
        rows = [(k, cid, None, "main", "+79160000000", "обновлено", "UCS-2", 1, 1.5, "planned", 0, utcnow(), utcnow())
                for k in ("k1", "k900")]
        bulk_insert(conn, "outbox", OUT_COLS, rows, on_conflict="update", conflict_columns=("idempotency_key",),
                    update_columns=("text",), likely_new=True)
        assert dict(conn.execute(text("SELECT idempotency_key, text FROM outbox WHERE idempotency_key IN ('k1', 'k900')"))
                    .all()) == {"k1": "обновлено", "k900": "обновлено"}


def test_unique_idempotency_key_is_enforced(engine):
    from sqlalchemy.exc import IntegrityError

    with engine.begin() as conn:
        cid = _campaign(conn)
        bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 3))
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO outbox (idempotency_key, campaign_id, step, encoding, segments, cost, state, attempts) "
                              "VALUES ('k1', :c, 'main', 'GSM-7', 1, 0, 'planned', 0)"), {"c": cid})


def test_concurrent_claims_never_overlap(engine):
    """Four threads claim from the same campaign: every message is taken exactly once."""
    from tasks.send import claim

    with engine.begin() as conn:
        cid = _campaign(conn)
        bulk_insert(conn, "outbox", OUT_COLS, _outbox_rows(cid, 2000, contact_ids=_contacts(conn, 2000)))
    taken: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            start.wait(30)  # all four compete from the first claim (a thread started first could take all)
            while True:
                df = claim(engine, cid, 37, f"worker-{k}", now=DAYTIME)
                if df.empty:
                    return
                taken[k].extend(int(i) for i in df["id"])
                time.sleep(0.001)  # a real sender submits between claims: the others get their turn
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    all_ids = [i for t in taken for i in t]
    assert len(all_ids) == 2000
    assert len(set(all_ids)) == 2000
    assert sum(1 for t in taken if t) >= 2  # the work really was shared
    with engine.begin() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM outbox WHERE state = 'queued' AND attempts = 1")).scalar() == 2000


def test_queue_tables_keep_room_for_updates_on_postgresql(engine):
    """Outbox rows are updated several times each: on PostgreSQL the table keeps 20 % of each page free
    and autovacuum comes after 5 % of it changed (migration 0008); SQLite has no such settings."""
    if engine.dialect.name != "postgresql":
        with engine.connect() as c:  # the migration ran and did nothing here
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() >= "0008"
        return
    with engine.connect() as c:
        opts = dict(o.split("=") for o in c.execute(text(
            "SELECT unnest(reloptions) FROM pg_class WHERE relname = 'outbox'")).scalars())
    assert opts["fillfactor"] == "80" and opts["autovacuum_vacuum_scale_factor"] == "0.05"


def test_bulk_tables_have_no_row_lock_key_checks_on_postgresql(engine):
    """Migration 0009: on PostgreSQL the bulk-filled tables carry no foreign keys (a FOR KEY SHARE row lock
    per inserted row); SQLite keeps them (an index lookup)."""
    insp = inspect(engine)
    keys = {t: {fk["constrained_columns"][0] for fk in insp.get_foreign_keys(t)}
            for t in ("segment_memberships", "outbox", "consent_changes", "quarantine")}
    if engine.dialect.name == "postgresql":
        assert keys["segment_memberships"] == set() and "contact_id" not in keys["outbox"]
        assert "campaign_id" not in keys["outbox"] and keys["consent_changes"] == set()
        assert "contact_id" in keys["quarantine"]  # small tables keep theirs
    else:
        assert {"contact_id", "segment"} <= keys["segment_memberships"] and "contact_id" in keys["outbox"]


def test_the_journey_poll_reads_only_unprocessed_events_through_a_partial_index(engine):
    """Processed CRM events stay in the table; the poll (``tasks.journey.process_events``) must not read
    them again each time (migration 0015): its plan uses ``ix_crm_events_unprocessed`` on both stores."""
    from store.db import is_postgres
    from tests.helpers import analyze, numbers_sql, plan_of

    with engine.begin() as c:
        c.execute(text("INSERT INTO crm_events (source, dedup_key, event_type, payload, received_at, processed_at) "
                       "SELECT 'crm', 'k' || n, 'order.created', '{}', :t, CASE WHEN n < 20000 THEN :t END "
                       f"FROM ({numbers_sql(is_postgres(c), 20050)}) AS q"), {"t": utcnow()})
    analyze(engine, "crm_events")
    poll = "SELECT id FROM crm_events WHERE processed_at IS NULL ORDER BY id LIMIT 500"
    plan = plan_of(engine, poll, {})
    assert "ix_crm_events_unprocessed" in plan, plan
    with engine.begin() as c:
        got = [int(r[0]) for r in c.execute(text(poll))]
        first = c.execute(text("SELECT MIN(id) FROM crm_events WHERE processed_at IS NULL")).scalar()
    assert len(got) == 50 and got == sorted(got) and got[0] == first


def test_recorded_results_keep_every_value_exactly(engine):
    """``update_if_queued`` passes each varying column as one array (PostgreSQL: a literal it builds itself):
    quotes, backslashes, braces, commas, NULL, Cyrillic and an aware timestamp must arrive as given."""
    from datetime import datetime, timedelta, timezone

    from store.outbox import update_if_queued

    now = utcnow().replace(microsecond=123456)
    aware = datetime(2026, 3, 1, 15, 30, 0, 500000, tzinfo=timezone(timedelta(hours=3)))  # 12:30:00.5 UTC
    errors = ['say "hi"', "back\\slash \\\"", "{a,b}", None, "Ошибка, шлюз: 'нет'", "", "NULL", " padded "]
    with engine.begin() as c:
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('v', 's', 'all', 't', 'marketing', 0, 'running')"))
        camp = c.execute(text("SELECT MAX(id) FROM campaigns")).scalar()
        for k in range(len(errors)):
            c.execute(text("INSERT INTO outbox (idempotency_key, campaign_id, step, phone_e164, text, encoding, segments, "
                           "cost, state, attempts, planned_at, updated_at) VALUES (:k, :c, 'main', '+7916', 'hi', 'GSM-7', "
                           "1, 0, 'queued', 1, :t, :t)"), {"k": f"v{k}", "c": camp, "t": now})
        ids = [int(r[0]) for r in c.execute(text("SELECT id FROM outbox WHERE campaign_id = :c ORDER BY id"), {"c": camp})]
        rows = [("rejected", f"E{k}", err, aware if k % 2 else now, None, now, i)
                for k, (err, i) in enumerate(zip(errors, ids))]
        update_if_queued(c, rows, "state = ?, error_code = ?, last_error = ?, final_at = ?, claimed_by = ?, updated_at = ?")
        got = c.execute(text("SELECT state, error_code, last_error, final_at FROM outbox WHERE campaign_id = :c ORDER BY id"),
                        {"c": camp}).fetchall()
    want_at = [aware.astimezone(timezone.utc).replace(tzinfo=None) if k % 2 else now for k in range(len(errors))]
    assert [r[0] for r in got] == ["rejected"] * len(errors)
    assert [r[1] for r in got] == [f"E{k}" for k in range(len(errors))]
    assert [r[2] for r in got] == errors
    assert [r[3] if isinstance(r[3], datetime) else datetime.fromisoformat(r[3]) for r in got] == want_at


def test_recording_results_reads_each_queued_message_once_whatever_the_statistics_say(engine):
    """The statistics of a busy outbox show (almost) nothing 'queued': messages are queued only while in
    flight. ``update_if_queued`` must still apply a few hundred results without a plan that reads the
    result list once per queued message (PostgreSQL: each result's message found through the primary key,
    not the queued ones through the state index; on both stores only the messages still queued change)."""
    from store.db import is_postgres
    from store.outbox import update_if_queued
    from tests.helpers import analyze, numbers_sql

    now = utcnow()
    with engine.begin() as c:
        pg = is_postgres(c)
        for k in range(3):
            c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                           "VALUES (:n, 's', 'all', 't', 'marketing', 0, 'running')"), {"n": f"r{k}"})
        cids = [r[0] for r in c.execute(text("SELECT id FROM campaigns ORDER BY id"))]
        c.execute(text(f"INSERT INTO outbox (idempotency_key, campaign_id, step, phone_e164, text, encoding, segments, cost, "
                       f"state, attempts, planned_at, updated_at) SELECT 'q' || n, CASE WHEN n < 10000 THEN :a "
                       f"WHEN n < 20000 THEN :b ELSE :c END, 'main', '+7916', 'hi', 'GSM-7', 1, 0, 'planned', 0, :t, :t "
                       f"FROM ({numbers_sql(pg, 30000)}) AS q"), {"a": cids[0], "b": cids[1], "c": cids[2], "t": now})
    analyze(engine, "outbox")  # nothing queued in the statistics
    with engine.begin() as c:
        c.execute(text("UPDATE outbox SET state = 'queued' WHERE campaign_id = :c"), {"c": cids[2]})
        ids = [int(r[0]) for r in c.execute(text("SELECT id FROM outbox WHERE campaign_id = :c ORDER BY id LIMIT 400"),
                                            {"c": cids[2]})]
        c.execute(text("UPDATE outbox SET state = 'delivered' WHERE id = :i"), {"i": ids[0]})  # a receipt came first
    rows = [("submitted", f"gw-{i}", now, None, now, i) for i in ids]
    clause = "state = ?, gateway_message_id = ?, submitted_at = ?, claimed_by = ?, updated_at = ?"
    plans: list[str] = []
    with engine.begin() as c:
        if pg:
            drv = c.connection.driver_connection
            base = type(drv.cursor())

            class Explaining(base):  # each UPDATE is explained first, under the same settings
                def execute(self, query, params=None, **kw):
                    if str(query).startswith("UPDATE"):
                        plans.append(" ".join(r[0] for r in base.execute(self, "EXPLAIN " + query, params).fetchall()))
                    return base.execute(self, query, params, **kw)

            drv.cursor_factory = Explaining
            try:
                update_if_queued(c, rows, clause)
            finally:
                drv.cursor_factory = base
        else:
            update_if_queued(c, rows, clause)
        got = dict(c.execute(text("SELECT state, COUNT(*) FROM outbox WHERE campaign_id = :c GROUP BY state"),
                             {"c": cids[2]}).fetchall())
        gw = c.execute(text("SELECT gateway_message_id FROM outbox WHERE id = :i"), {"i": ids[1]}).scalar()
    assert got == {"delivered": 1, "submitted": 399, "queued": 9600}, got
    assert gw == f"gw-{ids[1]}"
    if pg:
        assert len(plans) == 1 and "outbox_pkey" in plans[0] and "ix_outbox_campaign_state" not in plans[0], plans


def test_bulk_insert_of_columns_keeps_every_value_exactly(engine):
    """Rows given column by column (COPY on PostgreSQL): quotes, backslashes, COPY's end marker, commas, newlines,
    '' vs NULL, Cyrillic, booleans, JSON, naive and aware timestamps, NaT, a mixed column arrive as given."""
    import json
    from datetime import datetime, timedelta, timezone

    import numpy as np

    from store.db import Columns

    names = ['say "hi"', "back\\slash \\\"", "\\.", "a,b\nc", "", "NULL", "Анна-Мария", None, " padded "]
    n = len(names)
    aware = datetime(2026, 3, 1, 15, 30, 0, 500000, tzinfo=timezone(timedelta(hours=3)))
    naive = datetime(2025, 12, 31, 23, 59, 59, 999999)
    stamps = np.array(["2020-02-23T02:40:15.123456", "NaT"] * 4 + ["1999-01-01"], dtype="datetime64[us]")
    cols = ("source", "crm_id", "first_name", "sms_consent", "consent_at", "crm_updated_at", "attributes", "status")

    def columns(src: str, first: list) -> Columns:
        return Columns([[src] * n, [f"C{i}" for i in range(n)], first, [i % 2 == 0 for i in range(n)], stamps,
                        [aware if i % 2 else naive for i in range(n)],
                        [{"city": "Пермь", "n": i, "x": 1.5, "q": 'a"b'} if i % 3 else None for i in range(n)],
                        ["valid"] * n])

    with engine.begin() as c:
        bulk_insert(c, "contacts", cols, columns("plain", names), json_columns=("attributes",))
        # a number among a text column's strings
        bulk_insert(c, "contacts", cols, columns("mixed", names[:-1] + [7]), json_columns=("attributes",))
        got = {src: c.execute(text("SELECT first_name, sms_consent, consent_at, crm_updated_at, attributes "
                                   "FROM contacts WHERE source = :s ORDER BY id"), {"s": src}).fetchall()
               for src in ("plain", "mixed")}
    want_at = [aware.astimezone(timezone.utc).replace(tzinfo=None) if i % 2 else naive for i in range(n)]

    def at(v):
        return v if v is None or isinstance(v, datetime) else datetime.fromisoformat(v)

    for src, first in (("plain", names), ("mixed", names[:-1] + ["7"])):
        rows = got[src]
        assert [r[0] for r in rows] == first
        assert [bool(r[1]) for r in rows] == [i % 2 == 0 for i in range(n)]
        assert [at(r[2]) for r in rows] == [None if np.isnat(s) else s.astype(datetime) for s in stamps]
        assert [at(r[3]) for r in rows] == want_at
        assert [r[4] if r[4] is None or isinstance(r[4], dict) else json.loads(r[4]) for r in rows] == \
            [{"city": "Пермь", "n": i, "x": 1.5, "q": 'a"b'} if i % 3 else None for i in range(n)]


def test_bulk_insert_copies_in_binary_where_every_value_fits_and_as_text_where_not(engine, monkeypatch):
    """PostgreSQL: a chunk whose columns hold only the values their types take as they are goes as a binary
    COPY, a chunk with a misfit (a number in a text column, a pandas Timestamp) as text; the COPY switches
    format between chunks of one call. On both stores every value arrives as given, JSON as objects."""
    from datetime import datetime

    import pandas as pd
    import psycopg

    import store.db as db
    from store.db import Columns

    monkeypatch.setattr(db, "COPY_CHUNK", 4)
    statements: list[str] = []
    real_copy = psycopg.Cursor.copy

    def spy(self, statement, *a, **kw):
        statements.append(str(statement))
        return real_copy(self, statement, *a, **kw)

    monkeypatch.setattr(psycopg.Cursor, "copy", spy)
    n = 12
    first = [f"Имя {i}" for i in range(n)]
    first[5] = 55  # chunk 2 (rows 4-7): a number among the strings
    stamps: list = [datetime(2026, 1, 2, 3, 4, 5, i) for i in range(n)]
    stamps[6] = pd.Timestamp("2026-01-02 03:04:05.000006")  # and a pandas Timestamp; chunk 3 fits again
    cols = ("source", "crm_id", "first_name", "sms_consent", "consent_at", "attributes", "duplicate_of", "status")
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "sms_consent", "status"), [("keep", "K1", True, "valid")])
        keeper = c.execute(text("SELECT id FROM contacts WHERE source = 'keep'")).scalar()
    rows = Columns([["bin"] * n, [f"B{i}" for i in range(n)], first, [i % 2 == 0 for i in range(n)], stamps,
                    ['{"city": "Пермь", "n": %d}' % i if i % 3 else None for i in range(n)],
                    [None] * (n - 1) + [keeper], ["valid"] * n])
    with engine.begin() as c:
        assert bulk_insert(c, "contacts", cols, rows, json_columns=("attributes",)) == n
        got = c.execute(text("SELECT first_name, sms_consent, consent_at, attributes, duplicate_of FROM contacts "
                             "WHERE source = 'bin' ORDER BY id")).fetchall()
    order = range(n)
    assert [r[0] for r in got] == [str(first[i]) for i in order]
    assert [bool(r[1]) for r in got] == [i % 2 == 0 for i in order]
    at = [r[2] if isinstance(r[2], datetime) or r[2] is None else datetime.fromisoformat(r[2]) for r in got]
    assert at == [pd.Timestamp(stamps[i]).to_pydatetime() for i in order]
    assert [r[3] if r[3] is None or isinstance(r[3], dict) else json.loads(r[3]) for r in got] == \
        [{"city": "Пермь", "n": i} if i % 3 else None for i in order]
    assert [r[4] for r in got] == [keeper if i == 11 else None for i in order]
    if engine.dialect.name == "postgresql":
        copies = [s for s in statements if s.startswith("COPY ")]  # into the staging table
        assert [s.endswith("(FORMAT BINARY)") for s in copies] == [True, False, True], copies
        with engine.connect() as c:
            assert c.execute(text("SELECT COUNT(*) FROM contacts WHERE source = 'bin' "
                                  "AND jsonb_typeof(attributes) = 'object'")).scalar() == 8


def test_a_chunked_read_leaves_the_connection_as_it_was(engine):
    """``read_chunks`` streams from a server-side cursor on PostgreSQL; the next queries on the same connection
    must not: a plain read after it got no row of a small result (SQLAlchemy had buffered it)."""
    from store.db import fetch_tuples, read_chunks, read_columns

    with engine.begin() as c:
        c.execute(text("INSERT INTO watermarks (source, mark, rows_seen, updated_at) VALUES "
                       "('a', '1', 1, :t), ('b', '2', 2, :t), ('c', '3', 3, :t)"), {"t": utcnow()})
        parts = list(read_chunks(c, "SELECT source FROM watermarks ORDER BY source", size=2))
        assert parts == [[("a",), ("b",)], [("c",)]]
        assert read_columns(c, "SELECT source FROM watermarks WHERE source = 'b'") == {"source": ["b"]}
        assert fetch_tuples(c, "SELECT rows_seen FROM watermarks ORDER BY source") == [(1,), (2,), (3,)]
