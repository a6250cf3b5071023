"""CRM extract into the store: mapping, quarantine, watermark, re-import rules."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from blocks.crm import CrmSourceError, CsvCrm, SqlCrm
from tasks.extract import extract_source
from tasks.expectations import ExtractSchemaError
from tests.helpers import contact, write_csv


def _count(engine, sql: str, **p) -> int:
    with engine.begin() as c:
        return int(c.execute(text(sql), p).scalar())


def test_csv_extract_maps_columns_and_keeps_everything(engine, tmp_path):
    rows = [contact(i) for i in range(20)]
    rows.append(contact(99, id=""))  # no CRM id
    rows.append(contact(5, updated_at="2026-02-01T00:00:00Z", first_name="Новое имя"))  # same CRM id, newer
    rows.append(contact(6, updated_at="2025-02-01T00:00:00Z", first_name="Старое"))  # same CRM id, older
    path = write_csv(tmp_path / "crm.csv", rows)
    stats = extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert stats.rows == 23
    assert stats.quarantined == 1 and stats.duplicate_ids == 2
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE source='t'") == 20
    assert _count(engine, "SELECT COUNT(*) FROM quarantine WHERE step='extract' AND source='t'") == 3
    with engine.begin() as c:
        r = c.execute(text("SELECT first_name, sms_consent, language, attributes, crm_updated_at, consent_method "
                           "FROM contacts WHERE crm_id='C00005'")).one()
        old = c.execute(text("SELECT first_name FROM contacts WHERE crm_id='C00006'")).scalar()
    assert r.first_name == "Новое имя"  # the latest row of a repeated CRM id wins
    assert old == "Иван" or old == "Ольга"  # the older duplicate did not overwrite
    assert bool(r.sms_consent) is True and r.consent_method == "import"
    attrs = r.attributes if isinstance(r.attributes, dict) else __import__("json").loads(r.attributes)
    assert attrs["city"] == "Москва" and attrs["funnel_stage"] == "customer"
    assert "phone" not in attrs and "first_name" not in attrs


def test_csv_in_batches_sees_a_repeated_crm_id_across_batches(engine, tmp_path):
    """A large export is read in batches; the rows of a CRM id repeated far apart still meet (the latest
    wins, the other is quarantined as merged) and every other row is written once."""
    rows = [contact(i) for i in range(95)]
    rows.insert(3, contact(70, updated_at="2026-03-01T00:00:00Z", first_name="Позже"))  # newer, early in the file
    rows.append(contact(4, updated_at="2024-01-01T00:00:00Z", first_name="Раньше"))  # older, late in the file
    path = write_csv(tmp_path / "crm.csv", rows)
    batches = list(CsvCrm(path=str(path), source_name="t").fetch(batch_size=10))
    assert len(batches) == 11 and sum(map(len, batches)) == 97
    assert sorted(batches[-1]["id"]) == ["C00004", "C00004", "C00070", "C00070"]  # the repeated ids, together
    stats = extract_source(engine, CsvCrm(path=str(path), source_name="t"), batch_size=10)
    assert stats.rows == 97 and stats.duplicate_ids == 2 and stats.quarantined == 0
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE source='t'") == 95
    with engine.begin() as c:
        names = dict(c.execute(text("SELECT crm_id, first_name FROM contacts WHERE crm_id IN ('C00004', 'C00070')")).all())
    assert names["C00070"] == "Позже" and names["C00004"] != "Раньше"


def test_csv_watermark_moves_only_after_the_last_batch(engine, tmp_path):
    """Batches of a file come in any updated-at order: a run that dies after its first batch must not
    leave a watermark that makes the rerun skip the older rows of later batches."""
    rows = [contact(i, updated_at=f"2026-01-{28 - i // 10:02d}T00:00:00Z") for i in range(50)]  # newest first
    path = write_csv(tmp_path / "crm.csv", rows)
    src = CsvCrm(path=str(path), source_name="t")

    def crash(stats):
        raise KeyboardInterrupt("killed after the first batch")

    with pytest.raises(KeyboardInterrupt):
        extract_source(engine, src, batch_size=10, on_batch=crash)
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE source='t'") == 10
    with engine.begin() as c:
        assert c.execute(text("SELECT mark FROM watermarks WHERE source='t'")).scalar() is None
    again = extract_source(engine, src, batch_size=10)
    assert again.rows == 50
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE source='t'") == 50
    with engine.begin() as c:
        assert c.execute(text("SELECT mark FROM watermarks WHERE source='t'")).scalar().startswith("2026-01-28")


def test_rerun_is_idempotent_and_incremental(engine, tmp_path):
    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(10)])
    src = CsvCrm(path=str(path), source_name="t")
    first = extract_source(engine, src)
    again = extract_source(engine, src)
    assert first.rows == 10
    assert again.rows < 10  # only rows at the watermark are read again
    assert _count(engine, "SELECT COUNT(*) FROM contacts") == 10
    rows = [contact(i) for i in range(10)] + [contact(50, updated_at="2026-05-01T00:00:00Z")]
    write_csv(path, rows)
    third = extract_source(engine, src)
    assert 1 <= third.rows <= 2  # the new row (+ the row sitting on the old watermark)
    assert _count(engine, "SELECT COUNT(*) FROM contacts") == 11
    full = extract_source(engine, src, full_refresh=True)
    assert full.rows == 11


def test_reimport_never_clears_an_sms_opt_out(engine, tmp_path):
    path = write_csv(tmp_path / "crm.csv", [contact(1)])
    extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    with engine.begin() as c:
        c.execute(text("UPDATE contacts SET opted_out_at = CURRENT_TIMESTAMP"))
    write_csv(path, [contact(1, updated_at="2027-01-01T00:00:00Z")])
    extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE opted_out_at IS NOT NULL") == 1


def test_missing_phone_column_stops_with_a_clear_error(engine, tmp_path):
    path = write_csv(tmp_path / "crm.csv", [{"id": "1", "name": "x", "tel": "+79161234567"}])
    with pytest.raises(ExtractSchemaError, match=r"'phone'.*columns present: id, name, tel"):
        extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert _count(engine, "SELECT COUNT(*) FROM contacts") == 0


def test_column_map_renames(engine, tmp_path):
    path = write_csv(tmp_path / "crm.csv", [{"ID": "7", "mobile": "89161234567", "updated": "2026-01-01"}])
    src = CsvCrm(path=str(path), source_name="t", column_map={"id": "ID", "phone": "mobile", "updated_at": "updated"})
    assert extract_source(engine, src).rows == 1
    with engine.begin() as c:
        assert c.execute(text("SELECT phone_raw FROM contacts WHERE crm_id='7'")).scalar() == "89161234567"


def test_sql_crm_incremental(engine, tmp_path):
    import sqlite3

    crm = tmp_path / "crm.sqlite"
    db = sqlite3.connect(crm)
    db.execute("CREATE TABLE people (id TEXT, phone TEXT, first_name TEXT, updated_at TEXT, vip INTEGER)")
    db.executemany("INSERT INTO people VALUES (?,?,?,?,?)",
                   [(str(i), f"8916{i:07d}", "Анна", f"2026-01-01 10:{i:02d}:00", i % 2) for i in range(30)])
    db.commit()
    src = SqlCrm(url=f"sqlite:///{crm}", query="SELECT * FROM people", source_name="sql")
    assert extract_source(engine, src, batch_size=7).rows == 30
    db.execute("INSERT INTO people VALUES ('100', '89160000100', 'Иван', '2026-02-01 00:00:00', 1)")
    db.commit()
    db.close()
    again = extract_source(engine, src)
    assert again.rows <= 2  # the new row (+ rows sitting exactly on the watermark)
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE source='sql'") == 31


def test_broken_sql_source_error_hides_the_url(tmp_path, engine):
    src = SqlCrm(url="sqlite:////nonexistent/dir/secret-pass.sqlite", source_name="bad")
    with pytest.raises(CrmSourceError) as err:
        extract_source(engine, src)
    assert "secret-pass" not in str(err.value)


def test_every_consent_change_is_audited(engine, tmp_path):
    rows = [contact(i) for i in range(4)]
    rows[3]["sms_consent"] = "false"
    path = write_csv(tmp_path / "crm.csv", rows, header=list(rows[0]) + ["consent_method", "consent_text_version"])
    extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert _count(engine, "SELECT COUNT(*) FROM consent_changes WHERE change='granted' AND method='import'") == 3
    rows[0].update(sms_consent="false", updated_at="2027-01-01T00:00:00Z")
    rows[3].update(sms_consent="true", updated_at="2027-01-01T00:00:00Z", consent_method="web_form", consent_text_version="v2")
    write_csv(path, rows, header=list(rows[0]) + ["consent_method", "consent_text_version"])
    extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    with engine.begin() as c:
        got = c.execute(text("SELECT ct.crm_id, ch.change, ch.method, ch.text_version FROM consent_changes ch "
                             "JOIN contacts ct ON ct.id = ch.contact_id WHERE ch.changed_at = (SELECT MAX(changed_at) "
                             "FROM consent_changes) ORDER BY ct.crm_id")).fetchall()
    assert [tuple(r) for r in got] == [("C00000", "revoked", "import", None), ("C00003", "granted", "web_form", "v2")]
    with engine.begin() as c:
        assert c.execute(text("SELECT consent_text_version FROM contacts WHERE crm_id='C00003'")).scalar() == "v2"


def test_extract_writes_each_contact_once_with_its_verdict(engine, tmp_path):
    """The extract classifies phones before writing; validate then only reports and merges duplicates."""
    from tasks.validate import validate_new_contacts

    rows = [contact(i) for i in range(6)]
    rows[1]["phone"] = "abc"
    path = write_csv(tmp_path / "crm.csv", rows)
    stats = extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert stats.validated == 6
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE status = 'valid' AND phone_e164 IS NOT NULL") == 5
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE status = 'quarantined' AND crm_id = 'C00001'") == 1
    assert _count(engine, "SELECT COUNT(*) FROM quarantine WHERE step = 'validate' AND reason_code = 'invalid'") == 1
    v = validate_new_contacts(engine, "t")
    assert (v.checked, v.valid, v.quarantined) == (6, 5, 1) and v.by_status == {"ok": 5, "invalid": 1}
    assert "Extract check: passed" in v.expectations_markdown
    again = validate_new_contacts(engine, "t")  # nothing new: reported once
    assert (again.checked, again.valid) == (0, 5) and not again.expectations_markdown
    # the CRM fixes the number: valid again, and no longer quarantined
    rows[1].update(phone="+7 916 555 00 01", updated_at="2027-01-01T00:00:00Z")
    write_csv(path, rows)
    extract_source(engine, CsvCrm(path=str(path), source_name="t"))
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE status = 'valid'") == 6
    assert _count(engine, "SELECT COUNT(*) FROM quarantine WHERE step = 'validate'") == 0


def test_a_batch_failing_its_checks_stays_new_and_stops_validate(engine, tmp_path):
    import sqlite3

    from tasks.validate import ExtractCheckFailed, validate_new_contacts

    crm = tmp_path / "crm.sqlite"
    db = sqlite3.connect(crm)
    db.execute("CREATE TABLE people (id TEXT, phone TEXT, updated_at TEXT)")
    good = [(str(i), f"8916{i:07d}", f"2026-01-01 10:{i:02d}:00") for i in range(10)]
    broken = [(str(i), "", f"2026-01-02 10:{i:02d}:00") for i in range(10, 20)]  # the phone column emptied
    db.executemany("INSERT INTO people VALUES (?,?,?)", good + broken)
    db.commit()
    db.close()
    src = SqlCrm(url=f"sqlite:///{crm}", query="SELECT * FROM people", source_name="sql")
    stats = extract_source(engine, src, batch_size=10)
    assert stats.rows == 20 and stats.validated == 10
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE status = 'new'") == 10
    with pytest.raises(ExtractCheckFailed, match="failed its checks"):
        validate_new_contacts(engine, "sql")
    assert _count(engine, "SELECT COUNT(*) FROM contacts WHERE status = 'new'") == 10


def test_reader_process_gives_the_same_store(sqlite_engine, tmp_path, monkeypatch):
    """processes > 1: reading, checks and phones in a child process; the store ends up the same."""
    from sqlalchemy import text as sql

    import tasks.extract as te
    from store.db import get_engine

    started = []
    real = te._batches_from_child
    monkeypatch.setattr(te, "READER_MIN_BATCHES", 0)  # a small source: force the reader process
    monkeypatch.setattr(te, "_batches_from_child", lambda *a, **k: started.append(1) or real(*a, **k))

    rows = [contact(i) for i in range(30)] + [contact(40, phone="garbage"), contact(41, id="")]
    path = write_csv(tmp_path / "crm.csv", rows)
    other = get_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    one = extract_source(sqlite_engine, CsvCrm(path=str(path), source_name="t"), processes=1)
    two = extract_source(other, CsvCrm(path=str(path), source_name="t"), processes=2)
    assert started, "the reader process was not used"
    assert (one.rows, one.validated, one.quarantined) == (two.rows, two.validated, two.quarantined) == (32, 31, 1)
    q = ("SELECT crm_id, status, phone_e164, phone_region, status_reason, attributes, crm_updated_at, consent_at "
         "FROM contacts ORDER BY crm_id")
    with sqlite_engine.begin() as a, other.begin() as b:
        assert a.execute(sql(q)).fetchall() == b.execute(sql(q)).fetchall()
    with pytest.raises(CrmSourceError):
        extract_source(other, CsvCrm(path=str(tmp_path / "missing.csv"), source_name="t"), processes=2)


def test_small_sources_are_read_in_process(sqlite_engine, tmp_path, monkeypatch):
    """The reader process only pays from a few batches on: a small CRM is read where it is written."""
    import tasks.extract as te

    monkeypatch.setattr(te, "_batches_from_child", lambda *a, **k: pytest.fail("reader process started"))
    path = write_csv(tmp_path / "crm.csv", [contact(i) for i in range(20)])
    src = CsvCrm(path=str(path), source_name="t")
    assert src.estimate_rows() == 21  # header + rows: an upper bound is enough
    assert extract_source(sqlite_engine, src, processes=2, batch_size=10).rows == 20


def test_sql_crm_estimates_its_rows(tmp_path):
    from blocks.crm import SqlCrm
    from smsflow.demo_crm import write_crm_sqlite

    p = tmp_path / "crm.sqlite"
    write_crm_sqlite(p, 300, seed=1)
    src = SqlCrm(url=f"sqlite:///{p}", source_name="demo")
    total = src.estimate_rows()
    assert total == sum(len(b) for b in src.fetch())
    assert src.estimate_rows("2999-01-01") == 0
    assert SqlCrm(url=f"sqlite:///{tmp_path / 'nope' / 'x.sqlite'}", source_name="d").estimate_rows() is None


def test_attributes_are_the_json_of_the_crm_columns_we_do_not_map():
    """The attributes JSON text is built column by column when every value is text (CSV exports): the same text,
    key for key, as dumping each contact's dict, for awkward text; other values take the dict path."""
    import json

    import pandas as pd

    from store.db import json_text
    from tasks.extract import _attributes, prepare_contacts

    awkward = ['Пермь', 'say "hi"', "back\\slash", "tab\tnew\nline", "\x01ctl", "line\u2028sep", "  padded  ", "",
               "   ", None, "emoji 🙂", "{\"not\": json}"]
    n = len(awkward)
    df = pd.DataFrame({"id": [f"C{i}" for i in range(n)], "phone": ["+79161234567"] * n, "city": awkward,
                       "note": list(reversed(awkward)), "тег": ["x" if i % 2 else None for i in range(n)]}, dtype=object)
    rows, _ = prepare_contacts(df, "crm")
    want = [json_text(a) for a in _attributes(df, lambda v: v, n)]
    assert rows["attributes"] == want
    parsed = [json.loads(t) for t in rows["attributes"]]
    assert parsed[0] == {"city": "Пермь", "note": "{\"not\": json}"}
    assert parsed[3]["city"] == "tab\tnew\nline" and parsed[6]["city"] == "  padded  "  # kept as given, not stripped
    assert all("city" not in p for p in (parsed[7], parsed[8], parsed[9]))  # blank and missing: left out
    assert [p.get("тег") for p in parsed] == ["x" if i % 2 else None for i in range(n)]
    # a column of numbers (a SQL CRM): the dict path, the same JSON as before
    df2 = df.assign(orders=[i if i % 3 else None for i in range(n)], total=[1.5] * (n - 1) + [float("nan")])
    rows2, _ = prepare_contacts(df2, "crm")
    assert rows2["attributes"] == [json_text(a) for a in _attributes(df2, lambda v: v, n)]
    assert json.loads(rows2["attributes"][1])["orders"] == 1 and "total" not in json.loads(rows2["attributes"][-1])
