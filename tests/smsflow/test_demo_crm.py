"""Tests for the deterministic demo CRM generator (smsflow.demo_crm)."""

from __future__ import annotations

import re
import sqlite3

import numpy as np
import pandas as pd
import pytest

from smsflow.demo_crm import (
    BLOCK_SIZE,
    CONTACT_COLUMNS,
    FUNNEL_STAGES,
    ORDER_COLUMNS,
    ORDER_STATUSES,
    REFERENCE_TIME,
    REVENUE_STATUSES,
    RUSSIAN_TIMEZONES,
    generate_contacts,
    generate_orders,
    write_crm_csv,
    write_crm_sqlite,
)

N = 5_000


@pytest.fixture(scope="module")
def contacts() -> pd.DataFrame:
    return generate_contacts(N, seed=42)


@pytest.fixture(scope="module")
def orders(contacts: pd.DataFrame) -> pd.DataFrame:
    return generate_orders(contacts, seed=42)


# -- helpers written independently of the generator's internals -------------

_PHONE_CHARS = re.compile(r"^[\d\s()+-]+$")


def ru_mobile_national(phone) -> str | None:
    """10-digit national number if ``phone`` is a Russian mobile, else None."""
    if not isinstance(phone, str) or not _PHONE_CHARS.match(phone) or phone.startswith("+44"):
        return None
    digits = re.sub(r"\D", "", phone)
    if len(digits) == 11 and digits[0] in "78":
        digits = digits[1:]
    elif len(digits) != 10:
        return None
    if phone.startswith("+") and not phone.startswith("+7"):
        return None
    return digits if digits[0] == "9" else None


def phone_key(phone) -> str | None:
    """Canonical digits of a plausible phone number (RU/KZ or UK), else None."""
    if not isinstance(phone, str) or not _PHONE_CHARS.match(phone):
        return None
    digits = re.sub(r"\D", "", phone.replace("(0)", ""))
    if phone.startswith("+44"):
        return digits if len(digits) == 12 else None
    if phone.startswith("0"):
        return "44" + digits[1:] if len(digits) == 11 else None
    if len(digits) == 11 and digits[0] in "78":
        return "7" + digits[1:]
    if len(digits) == 10:
        return "7" + digits
    return None


PHONE_FAMILIES = {
    "8 (916) 123-45-67": r"^8 \(9\d\d\) \d{3}-\d\d-\d\d$",
    "+7 916 1234567": r"^\+7 9\d\d \d{7}$",
    "9161234567": r"^9\d{9}$",
    "+79161234567": r"^\+79\d{9}$",
    "8-916-123-45-67": r"^8-9\d\d-\d{3}-\d\d-\d\d$",
    "UK landline +44 20 7946 0958": r"^\+44 20 \d{4} \d{4}$",
    "UK mobile +44 7700 900123": r"^\+44 7\d{3} \d{6}$",
    "Moscow landline +7 495": r"^\+7 49[59] ",
    "Moscow landline 8 (499)": r"^8 \(49[59]\) ",
    "toll-free 8-800": r"^8-800-\d{3}-\d\d-\d\d$",
    "Kazakh +7 701": r"^\+7 701 ",
    "Kazakh +7 777": r"^\+7 777 ",
    "garbage abc": r"^abc$",
    "garbage 12345": r"^\d{5}$",
    "garbage truncated +7 916 12": r"^\+7 9\d\d \d\d$",
}


# -- determinism ------------------------------------------------------------


def test_same_seed_gives_identical_frame():
    a = generate_contacts(2_000, seed=7)
    b = generate_contacts(2_000, seed=7)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(generate_orders(a, seed=7), generate_orders(b, seed=7))


def test_different_seed_gives_different_data():
    a = generate_contacts(2_000, seed=7)
    b = generate_contacts(2_000, seed=8)
    assert (a["phone"].fillna("") != b["phone"].fillna("")).mean() > 0.9
    assert (a["last_name"].fillna("") != b["last_name"].fillna("")).mean() > 0.5
    assert (a["updated_at"] != b["updated_at"]).mean() > 0.9


def test_prefix_does_not_depend_on_n(contacts):
    pd.testing.assert_frame_equal(generate_contacts(300, seed=42), contacts.iloc[:300])


def test_prefix_and_chunking_across_block_boundary(monkeypatch):
    import smsflow.demo_crm as demo_crm

    small = generate_contacts(BLOCK_SIZE + 10, seed=3)
    big = generate_contacts(BLOCK_SIZE + 400, seed=3)  # built in one piece
    pd.testing.assert_frame_equal(small, big.iloc[: len(small)])
    monkeypatch.setattr(demo_crm, "_FRAME_CHUNK", 1)  # -> one block per piece
    pd.testing.assert_frame_equal(generate_contacts(BLOCK_SIZE + 400, seed=3), big)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        generate_contacts(-1)
    with pytest.raises(ValueError):
        generate_contacts(10, seed=-5)
    assert generate_contacts(0).columns.tolist() == list(CONTACT_COLUMNS)


# -- schema -------------------------------------------------------------------


def test_columns_and_dtypes(contacts):
    assert contacts.columns.tolist() == list(CONTACT_COLUMNS)
    assert len(contacts) == N
    for col in ("id", "first_name", "last_name", "phone", "email", "language", "timezone", "city", "funnel_stage"):
        assert pd.api.types.is_string_dtype(contacts[col]), col
    for col in ("consent_at", "updated_at", "last_activity_at", "last_order_at", "birthday"):
        assert pd.api.types.is_datetime64_dtype(contacts[col]), col
        assert contacts[col].dt.tz is None, col
    assert contacts["sms_consent"].dtype == bool
    assert pd.api.types.is_integer_dtype(contacts["orders_count"])
    assert pd.api.types.is_float_dtype(contacts["total_spent"])
    assert contacts["id"].is_unique
    assert contacts["id"].str.fullmatch(r"C\d{7}").all()
    assert contacts["updated_at"].notna().all()
    assert (contacts["birthday"].dropna() == contacts["birthday"].dropna().dt.normalize()).all()


def test_enumerations(contacts):
    assert set(contacts["language"]) == {"ru", "en"}
    assert set(contacts["funnel_stage"]) == set(FUNNEL_STAGES)
    tz = contacts["timezone"].dropna()
    assert set(tz) <= set(RUSSIAN_TIMEZONES) | {"Europe/London"}
    assert set(RUSSIAN_TIMEZONES) <= set(tz), set(RUSSIAN_TIMEZONES) - set(tz)
    en_tz = contacts.loc[contacts["language"] == "en", "timezone"].dropna()
    assert (en_tz == "Europe/London").mean() > 0.5
    ru_tz = contacts.loc[contacts["language"] == "ru", "timezone"].dropna()
    assert (ru_tz == "Europe/London").sum() == 0


# -- proportions --------------------------------------------------------------


def test_proportions(contacts):
    assert 0.75 <= (contacts["language"] == "ru").mean() <= 0.85
    assert 0.70 <= contacts["sms_consent"].mean() <= 0.80
    no_first = contacts["first_name"].isna() | (contacts["first_name"] == "")
    assert 0.03 <= no_first.mean() <= 0.08
    assert contacts["first_name"].isna().any() and (contacts["first_name"] == "").any()
    tz_missing = contacts["timezone"].isna().mean()
    assert 0.01 <= tz_missing <= 0.08
    ru_mobile = contacts["phone"].map(ru_mobile_national).notna()
    assert 0.74 <= ru_mobile.mean() <= 0.86
    email_ok = contacts["email"].dropna().str.fullmatch(r"[a-z0-9._+-]+@[a-z0-9.-]+\.[a-z]{2,}")
    assert email_ok.mean() > 0.97
    assert 0.03 <= contacts["email"].isna().mean() <= 0.15


def test_names_are_localised(contacts):
    cyr = contacts["last_name"].dropna().str.contains(r"[А-Яа-яЁё]")
    lang = contacts.loc[contacts["last_name"].notna(), "language"]
    assert cyr[lang == "ru"].mean() > 0.99
    assert cyr[lang == "en"].mean() < 0.01
    assert contacts["city"].dropna().str.contains("Москва").any()
    assert contacts["city"].dropna().str.contains("London").any()


# -- phones -------------------------------------------------------------------


def test_every_phone_format_family_appears(contacts):
    phones = contacts["phone"].dropna()
    missing = [name for name, rx in PHONE_FAMILIES.items() if not phones.str.contains(rx).any()]
    assert not missing, missing
    assert (contacts["phone"] == "").any()
    assert contacts["phone"].isna().any()


def test_russian_mobiles_are_random_not_sequential(contacts):
    nat = contacts["phone"].map(ru_mobile_national).dropna().astype("int64").to_numpy()
    assert len(np.unique(nat)) > 0.97 * len(nat)
    steps = np.diff(nat)
    assert (np.abs(steps) <= 1).mean() < 0.01
    # operator codes spread over many 9xx codes
    assert len(np.unique(nat // 10_000_000)) > 50


def test_phones_validate_with_libphonenumber(contacts):
    phonenumbers = pytest.importorskip("phonenumbers")
    phones = contacts["phone"].dropna()
    ru = phones[phones.map(ru_mobile_national).notna()].iloc[:300]
    for p in ru:
        num = phonenumbers.parse(p, "RU")
        assert phonenumbers.is_valid_number(num), p
        assert phonenumbers.region_code_for_number(num) == "RU", p
    kz = phones[phones.str.contains(r"^\+7 (?:701|777) ")]
    assert all(phonenumbers.region_code_for_number(phonenumbers.parse(p, "RU")) == "KZ" for p in kz)
    for p in phones[phones.str.fullmatch(r"abc|\d{5}|\+7 9\d\d \d\d")]:
        try:
            num = phonenumbers.parse(p, "RU")
        except phonenumbers.NumberParseException:
            continue
        assert not phonenumbers.is_valid_number(num), p


# -- duplicates ---------------------------------------------------------------


def test_duplicates_same_number_different_format(contacts):
    df = contacts.assign(key=contacts["phone"].map(phone_key)).dropna(subset=["key"])
    groups = df[df.duplicated("key", keep=False)].groupby("key")
    dup_rows = dup_groups = same_last_name = 0
    for _, g in groups:
        if g["phone"].nunique() < 2:
            continue
        assert g["id"].is_unique
        assert g["updated_at"].nunique() == len(g)
        dup_groups += 1
        dup_rows += len(g) - 1
        same_last_name += g["last_name"].dropna().nunique() <= 1
    assert 0.015 * N <= dup_rows <= 0.05 * N, dup_rows
    # re-entered people, not random collisions: the surname matches
    assert same_last_name >= 0.95 * dup_groups


# -- timestamps -----------------------------------------------------------------


def test_timestamp_consistency(contacts):
    ref = pd.Timestamp(REFERENCE_TIME)
    assert contacts["consent_at"].isna().equals(~contacts["sms_consent"])
    c = contacts.dropna(subset=["consent_at"])
    assert (c["consent_at"] <= c["updated_at"]).all()
    o = contacts.dropna(subset=["last_order_at"])
    assert (o["last_order_at"] <= o["updated_at"]).all()
    for col in ("consent_at", "updated_at", "last_activity_at", "last_order_at", "birthday"):
        assert (contacts[col].dropna() <= ref).all(), col
    assert contacts["updated_at"].min() >= pd.Timestamp("2015-01-01")
    age_years = (ref - contacts["birthday"].dropna()).dt.days / 365.25
    assert age_years.between(17.9, 76).all()
    assert 0.05 <= contacts["birthday"].isna().mean() <= 0.2


# -- orders ---------------------------------------------------------------------


def test_orders_schema(orders, contacts):
    assert orders.columns.tolist() == list(ORDER_COLUMNS)
    assert orders["id"].is_unique
    assert set(orders["status"]) <= set(ORDER_STATUSES)
    assert set(orders["status"]) >= {"delivered", "cancelled", "returned"}
    assert orders["contact_id"].isin(contacts["id"]).all()
    assert (orders["amount"] >= 0).all()
    assert pd.api.types.is_datetime64_dtype(orders["created_at"])
    assert len(orders) > 0.5 * (contacts["funnel_stage"] == "customer").sum()


def test_orders_consistent_with_contacts(orders, contacts):
    c = contacts.set_index("id")
    count = orders.groupby("contact_id").size().reindex(c.index, fill_value=0)
    assert (count == c["orders_count"]).all()
    rev = orders[orders["status"].isin(REVENUE_STATUSES)]
    spent = rev.groupby("contact_id")["amount"].sum().reindex(c.index, fill_value=0.0)
    assert np.array_equal(np.rint(spent.to_numpy() * 100), np.rint(c["total_spent"].to_numpy() * 100))
    last = orders.groupby("contact_id")["created_at"].max().reindex(c.index)
    assert last.isna().equals(c["last_order_at"].isna())
    assert (last.dropna() == c["last_order_at"].dropna()).all()
    # buyers spent money, non-buyers did not
    assert (c.loc[c["funnel_stage"].isin(["customer", "churned"]), "total_spent"] > 0).all()
    assert (c.loc[c["funnel_stage"] == "lead", "orders_count"] == 0).all()


def test_orders_do_not_depend_on_other_contacts(orders, contacts):
    part = contacts.iloc[1000:1400]
    sub = generate_orders(part, seed=42)
    expected = orders[orders["contact_id"].isin(part["id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub, expected)
    assert not generate_orders(part, seed=43).equals(sub)


def test_orders_accept_tz_aware_last_order(contacts, orders):
    part = contacts.iloc[:200].copy()
    part["last_order_at"] = part["last_order_at"].dt.tz_localize("UTC").dt.tz_convert("Europe/Moscow")
    expected = orders[orders["contact_id"].isin(part["id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(generate_orders(part, seed=42), expected)


def test_orders_reject_inconsistent_input(contacts):
    bad = contacts.iloc[:50].copy()
    bad["orders_count"] = 3
    bad["last_order_at"] = pd.NaT
    with pytest.raises(ValueError):
        generate_orders(bad)


# -- writers --------------------------------------------------------------------


def test_sqlite_roundtrip(tmp_path):
    n = BLOCK_SIZE + 700  # forces two chunks with chunk=1 (rounded to a block)
    path = write_crm_sqlite(tmp_path / "crm.sqlite", n, seed=11, chunk=1)
    assert path.exists()
    with sqlite3.connect(path) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"contacts", "orders"} <= tables
        assert con.execute("SELECT COUNT(*) FROM contacts").fetchone()[0] == n
        idx_cols = [
            con.execute(f"PRAGMA index_info('{name}')").fetchall()
            for _, name, *_ in con.execute("PRAGMA index_list('contacts')")
        ]
        assert any(cols and cols[0][2] == "updated_at" for cols in idx_cols)
        db = pd.read_sql_query("SELECT * FROM contacts ORDER BY rowid", con)
        db_orders = pd.read_sql_query("SELECT * FROM orders ORDER BY rowid", con)
        # NULL and '' stay distinct in SQLite
        assert con.execute("SELECT COUNT(*) FROM contacts WHERE phone IS NULL").fetchone()[0] > 0
        assert con.execute("SELECT COUNT(*) FROM contacts WHERE phone = ''").fetchone()[0] > 0

    expected = generate_contacts(n, seed=11)
    assert db.columns.tolist() == list(CONTACT_COLUMNS)
    assert db["id"].tolist() == expected["id"].tolist()
    for col in ("phone", "first_name", "email", "timezone"):
        assert db[col].isna().equals(expected[col].isna()), col
        assert (db[col].dropna() == expected[col].dropna()).all(), col
    assert (db["sms_consent"].astype(bool) == expected["sms_consent"]).all()
    assert db["updated_at"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d").all()
    assert (pd.to_datetime(db["updated_at"]) == expected["updated_at"]).all()
    bday = pd.to_datetime(db["birthday"])
    assert bday.isna().equals(expected["birthday"].isna())
    assert (bday.dropna() == expected["birthday"].dropna()).all()
    np.testing.assert_allclose(db["total_spent"], expected["total_spent"])

    exp_orders = generate_orders(expected, seed=11)
    assert len(db_orders) == len(exp_orders)
    assert db_orders["id"].tolist() == exp_orders["id"].tolist()
    np.testing.assert_allclose(db_orders["amount"], exp_orders["amount"])


def test_sqlite_replaces_existing_file(tmp_path):
    path = tmp_path / "crm.sqlite"
    write_crm_sqlite(path, 500, seed=1)
    write_crm_sqlite(path, 200, seed=1)
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*) FROM contacts").fetchone()[0] == 200
        n_orders = con.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
        assert n_orders == int(generate_contacts(200, seed=1)["orders_count"].sum())


def test_csv_writer(tmp_path):
    path = write_crm_csv(tmp_path / "contacts.csv", 1_000, seed=5)
    text = path.read_text(encoding="utf-8")
    assert re.search(r"[А-Яа-я]", text)
    back = pd.read_csv(path, dtype=str, keep_default_na=False)
    expected = generate_contacts(1_000, seed=5)
    assert back.columns.tolist() == list(CONTACT_COLUMNS)
    assert len(back) == 1_000
    assert back["id"].tolist() == expected["id"].tolist()
    assert back["phone"].tolist() == expected["phone"].fillna("").tolist()
    assert (pd.to_datetime(back["updated_at"]) == expected["updated_at"]).all()
    assert set(back["sms_consent"]) == {"True", "False"}
