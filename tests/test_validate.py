"""Tests for tasks.validate (phone normalisation, dedup, extract check, validate_csv)."""

from __future__ import annotations

import csv
import io
import math
import re

import numpy as np
import pandas as pd
import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smsflow.exports import ExportFormat
from tasks import validate as v
from tasks.validate import (
    ExtractCheckResult,
    ExtractSchemaError,
    check_extract,
    find_duplicates,
    normalize_phones,
    normalize_phones_parallel,
)
from tasks.validate_csv import CSV_STATUSES, ValidationInputError, validate_csv

COLUMNS = ["phone_e164", "phone_status", "reason", "number_type", "region"]
RU = phonenumbers.PhoneMetadata.metadata_for_region("RU")
KZ = phonenumbers.PhoneMetadata.metadata_for_region("KZ")


def reference(raw, region):
    """What normalize_phones must return for one value: phonenumbers on the raw string."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)) or str(raw).strip() == "":
        return (None, "missing", "no phone number", "", "")
    return v._classify(raw, region)


def rows(df: pd.DataFrame) -> list[tuple]:
    return [
        (None if pd.isna(e) else e, s, r, t, g)
        for e, s, r, t, g in df[COLUMNS].itertuples(index=False, name=None)
    ]


# ---------------------------------------------------------------------------
# normalize_phones: examples
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, e164, status, ntype, region, reason",
    [
        ("8 (916) 123-45-67", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("+7 916 1234567", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("9161234567", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("79161234567", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("8-916-123-45-67", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("+7 (916) 123.45.67", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("\u00a0+7\u00a0916\u00a0123\u00a045\u00a067 ", "+79161234567", "ok", "MOBILE", "RU", ""),
        ("+44 20 7946 0958", "+442079460958", "not_mobile", "FIXED_LINE", "GB", "fixed-line number cannot receive SMS"),
        # 7700 900xxx is Ofcom's drama range (invalid); 7911 1xxxxx is Guernsey per phonenumbers.
        ("+44 7400 123456", "+447400123456", "ok", "MOBILE", "GB", ""),
        ("+44 7911 123456", "+447911123456", "ok", "MOBILE", "GG", ""),
        ("+7 495 123-45-67", "+74951234567", "not_mobile", "FIXED_LINE", "RU", "fixed-line number cannot receive SMS"),
        ("8-800-555-35-35", "+78005553535", "not_mobile", "TOLL_FREE", "RU", "toll-free number cannot receive SMS"),
        ("+7 701 123 4567", "+77011234567", "ok", "MOBILE", "KZ", ""),
        ("8 701 123 4567", "+77011234567", "ok", "MOBILE", "KZ", ""),
        ("+7 916 123 45 67 доб. 12", "+79161234567", "ok", "MOBILE", "RU", ""),
    ],
)
def test_examples(raw, e164, status, ntype, region, reason):
    df = normalize_phones(pd.Series([raw]))
    assert rows(df) == [(e164, status, reason, ntype, region)]
    assert rows(df)[0] == reference(raw, "RU")


@pytest.mark.parametrize(
    "raw, reason_re",
    [
        ("garbage", r"^could not parse: "),
        ("1-2", r"^could not parse: "),
        ("+7 999", r"^not a valid number for region RU \(too short\)$"),
        ("+7 916 123 45 67 89", r"^not a valid number for region RU"),
        ("+44 7700 900123", r"^not a valid number for region GB$"),
        ("x" * 300, r"^could not parse: .*too long"),
    ],
)
def test_invalid(raw, reason_re):
    (e164, status, reason, ntype, region), = rows(normalize_phones(pd.Series([raw])))
    assert (e164, status, ntype, region) == (None, "invalid", "", "")
    assert re.search(reason_re, reason), reason


@pytest.mark.parametrize("raw", [None, np.nan, pd.NA, "", "   ", "\t\n", "\u00a0"])
def test_missing(raw):
    df = normalize_phones(pd.Series([raw, "+79161234567"], dtype=object))
    assert rows(df)[0] == (None, "missing", "no phone number", "", "")
    assert rows(df)[1][1] == "ok"


def test_shape_index_and_dtypes():
    s = pd.Series(["+79161234567", None, "garbage", "+74951234567"], index=[10, 5, "x", 7], dtype=object)
    df = normalize_phones(s)
    assert list(df.columns) == COLUMNS
    assert df.index.equals(s.index)
    assert set(df["phone_status"]) <= set(v.PHONE_STATUSES)
    assert df["phone_e164"].iloc[1] is None and df["phone_e164"].iloc[2] is None
    assert (df["reason"] == "").sum() == 1  # only the ok row has an empty reason


def test_empty_series():
    df = normalize_phones(pd.Series([], dtype=object))
    assert list(df.columns) == COLUMNS and len(df) == 0


def test_numeric_input():
    df = normalize_phones(pd.Series([89161234567, 79161234567.0, np.nan]))
    assert df["phone_e164"].tolist()[:2] == ["+79161234567", "+79161234567"]
    assert df["phone_status"].tolist() == ["ok", "ok", "missing"]


def test_non_ru_default_region():
    s = pd.Series(["8 701 123 4567", "+7 916 123 45 67", "8 916 123 45 67", "07400 123456"])
    kz = rows(normalize_phones(s, "KZ"))
    assert [r[0] for r in kz[:2]] == ["+77011234567", "+79161234567"]
    gb = rows(normalize_phones(s, "GB"))
    assert gb[3][:2] == ("+447400123456", "ok")
    for region, got in (("KZ", kz), ("GB", gb)):
        assert got == [reference(x, region) for x in s]


# ---------------------------------------------------------------------------
# Fast path exactness
# ---------------------------------------------------------------------------


def test_fast_path_is_derived_from_metadata():
    assert v.FAST_PATH_ENABLED, v.FAST_PATH_DISABLED_REASON
    assert v._FAST.mobile == RU.mobile.national_number_pattern
    assert v._FAST.general == RU.general_desc.national_number_pattern
    assert RU.fixed_line.national_number_pattern in v._FAST.excluded
    assert RU.toll_free.national_number_pattern in v._FAST.excluded


REALISTIC_FORMATS = [
    "+7 {a} {b}-{c}-{d}",
    "+7 ({a}) {b}-{c}-{d}",
    "+7{a}{b}{c}{d}",
    "8 ({a}) {b}-{c}-{d}",
    "8({a}){b}-{c}-{d}",
    "8-{a}-{b}-{c}-{d}",
    "8 {a} {b} {c} {d}",
    "8{a}{b}{c}{d}",
    "7{a}{b}{c}{d}",
    "7 {a} {b}{c}{d}",
    "{a}{b}{c}{d}",
    "({a}) {b}-{c}-{d}",
    "{a}.{b}.{c}.{d}",
    " +7 {a} {b} {c} {d} ",
    "+7\u00a0{a}\u00a0{b}\u00a0{c}\u00a0{d}",
    "\t8 {a} {b}-{c}-{d}\n",
    "+7-{a}-{b}-{c}-{d}",
    "(+7) {a} {b}{c}{d}",
    "+8 {a} {b}{c}{d}",
    "+78{a}{b}{c}{d}",
    "8 10 7 {a} {b}{c}{d}",
    "810 7{a}{b}{c}{d}",
    "00 7 {a} {b}{c}{d}",
    "8\t{a} {b}{c}{d}",
    "8/{a}/{b}{c}{d}",
    "+7 {a} {b}-{c}-{d} доб. 123",
    "+7 {a} {b}-{c}-{d} ext 5",
    "+7 {a} {b}-{c}-{d}#",
    "8 ({a}) {b}-{c}-{d}, 8 ({a}) {b}-{c}-{d}",
    "{a}{b}{c}{d}0",
    "+7 {a} {b} {c}",
    "+7{a}{b}{c}{d}" + " " * 240,
]

REALISTIC_NUMBERS = [
    "9161234567",  # MTS Moscow
    "9031234567",
    "9991234567",
    "9300012345",
    "9300051234",  # inside the 930 0 0 05 sub-range
    "9300031234",
    "9001234567",
    "9581234567",
    "4951234567",  # Moscow landline
    "8005553535",  # toll-free
    "8095553535",  # premium rate
    "8085553535",  # personal
    "3012345678",
    "7011234567",  # KZ mobile
    "7172123456",  # KZ landline (Astana)
    "6001234567",
    "1234567890",
    "0161234567",
]


def _fmt(fmt: str, nsn: str) -> str:
    return fmt.format(a=nsn[:3], b=nsn[3:6], c=nsn[6:8], d=nsn[8:])


@pytest.mark.parametrize("region", ["RU", "KZ", "GB"])
def test_realistic_formats_match_phonenumbers(region):
    raws = [_fmt(f, n) for f in REALISTIC_FORMATS for n in REALISTIC_NUMBERS]
    df = normalize_phones(pd.Series(raws), region)
    assert rows(df) == [reference(r, region) for r in raws]
    if region == "RU":
        # sanity: the fast path did most of the RU mobile work
        assert df.attrs["fast_path_rows"] > 100


def test_fast_path_used_for_ru_mobile_formats():
    raws = ["8 (916) 123-45-67", "+7 916 1234567", "9161234567", "79161234567", "8-903-111-22-33"]
    df = normalize_phones(pd.Series(raws))
    assert df.attrs["fast_path_rows"] == len(raws)
    assert df.attrs["phonenumbers_calls"] == 0
    assert rows(df) == [reference(r, "RU") for r in raws]


def test_slow_path_deduplicated():
    raws = ["+7 701 123 4567", "+7 (701) 123-45-67", "+77011234567", "8 701 123 45 67", "foo", "foo"]
    df = normalize_phones(pd.Series(raws * 1000))
    # +7/8 forms clean to 2 distinct strings, plus "foo"
    assert df.attrs["phonenumbers_calls"] == 3
    assert rows(df) == [reference(r, "RU") for r in raws * 1000]


_DIGITS = "0123456789"
_nsn = st.one_of(
    st.from_regex(RU.mobile.national_number_pattern, fullmatch=True, alphabet=_DIGITS),
    st.from_regex(RU.fixed_line.national_number_pattern, fullmatch=True, alphabet=_DIGITS),
    st.from_regex(RU.toll_free.national_number_pattern, fullmatch=True, alphabet=_DIGITS),
    st.from_regex(RU.premium_rate.national_number_pattern, fullmatch=True, alphabet=_DIGITS),
    st.from_regex(KZ.mobile.national_number_pattern, fullmatch=True, alphabet=_DIGITS),
    st.from_regex(r"9[0-9]{9}", fullmatch=True),  # near misses of the mobile pattern
    st.text(_DIGITS, min_size=0, max_size=14),
)
_prefix = st.sampled_from(["", "", "+7", "+7", "7", "8", "8", "+8", "+", "+77", "+78", "78", "87", "810", "8107", "00", "0", "+44", "++7", "٧"])
_sep = st.sampled_from(["", "", "", " ", " ", "-", ".", "(", ")", "\u00a0", "\t", "/", "x", "+", "#", ",", "\u2013"])


@st.composite
def phone_strings(draw):
    digits = draw(_prefix) + draw(_nsn)
    out = [draw(st.sampled_from(["", "", " ", "\t", "(", "\u00a0", "tel:"]))]
    for ch in digits:
        out.append(ch)
        if draw(st.integers(0, 3)) == 0:
            out.append(draw(_sep) * draw(st.integers(1, 2)))
    out.append(draw(st.sampled_from(["", "", " ", "\n", ")", ".", " доб. 12", "ext. 9"])))
    return "".join(out)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(phone_strings(), min_size=1, max_size=40), st.sampled_from(["RU", "RU", "KZ", "GB", "US"]))
def test_fast_path_equals_phonenumbers(raws, region):
    df = normalize_phones(pd.Series(raws, dtype=object), region)
    assert rows(df) == [reference(r, region) for r in raws]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(RU.mobile.national_number_pattern, fullmatch=True, alphabet=_DIGITS), min_size=1, max_size=30))
def test_every_ru_mobile_takes_fast_path(nsns):
    raws = [f"+7 {n[:3]} {n[3:]}" for n in nsns] + [f"8 ({n[:3]}) {n[3:6]}-{n[6:8]}-{n[8:]}" for n in nsns]
    df = normalize_phones(pd.Series(raws))
    assert rows(df) == [reference(r, "RU") for r in raws]
    assert df.attrs["fast_path_rows"] == len(raws)


def test_parallel_matches_serial():
    raws = [_fmt(f, n) for f in REALISTIC_FORMATS for n in REALISTIC_NUMBERS] + [None, ""]
    s = pd.Series(raws, index=range(1000, 1000 + len(raws)))
    serial = normalize_phones(s)
    par = normalize_phones_parallel(s, "RU", processes=2, min_parallel=0)
    pd.testing.assert_frame_equal(serial, par)
    small = normalize_phones_parallel(s, "RU", processes=2)  # below threshold: in-process
    pd.testing.assert_frame_equal(serial, small)


# ---------------------------------------------------------------------------
# find_duplicates
# ---------------------------------------------------------------------------


def test_find_duplicates_first_kept():
    e = pd.Series(["+7916", "+7916", None, "+7903", "+7916", ""])
    got = find_duplicates(e)
    assert str(got.dtype) == "Int64"
    assert got.tolist() == [pd.NA, 0, pd.NA, pd.NA, 0, pd.NA]


def test_find_duplicates_latest_updated_at_kept():
    e = pd.Series(["A", "A", "A", "B", "B", "C", "C"], index=[10, 11, 12, 13, 14, 15, 16])
    upd = pd.Series(
        [
            "2025-01-01T10:00:00Z",
            "2025-03-01 00:00:00",  # latest of A
            "2025-02-01T00:00:00+03:00",
            "not a date",  # NaT counts as oldest
            "2020-01-01",
            "2025-01-01T12:00:00+03:00",  # == 09:00Z: tie with next -> first kept
            "2025-01-01 09:00:00Z",
        ],
        index=e.index,
    )
    got = find_duplicates(e, upd)
    assert got.tolist() == [11, pd.NA, 11, 14, pd.NA, pd.NA, 15]
    assert got.index.equals(e.index)


def test_find_duplicates_non_iso_and_datetime_input():
    e = pd.Series(["A", "A", "B", "B"])
    upd = pd.Series(["01.02.2025 10:00", "2025-01-15", pd.Timestamp("2024-01-01"), pd.Timestamp("2025-01-01")], dtype=object)
    assert find_duplicates(e, upd).tolist() == [pd.NA, 0, 3, pd.NA]
    ts = pd.Series(pd.to_datetime(["2024-01-01", None, "2025-01-01", "2023-01-01"]))
    assert find_duplicates(pd.Series(["A"] * 4), ts).tolist() == [2, 2, pd.NA, 2]


def test_find_duplicates_out_of_ns_range_dates():
    e = pd.Series(["A"] * 4)
    upd = pd.Series(["2025-01-01", "9999-12-31", "0001-01-01", "25.12.2024 10:00"])
    assert find_duplicates(e, upd).tolist() == [1, pd.NA, 1, 1]


def test_find_duplicates_string_index():
    e = pd.Series(["A", "A"], index=["x", "y"])
    assert find_duplicates(e).tolist() == [pd.NA, "x"]


def test_find_duplicates_length_mismatch():
    with pytest.raises(ValueError, match="rows"):
        find_duplicates(pd.Series(["A"]), pd.Series(["2025-01-01", "2025-01-02"]))


_day = st.one_of(st.none(), st.integers(1, 5).map(lambda d: f"2025-01-0{d}"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C", None]), _day), max_size=30), st.booleans())
def test_find_duplicates_matches_brute_force(data, use_updated):
    e = pd.Series([d[0] for d in data], dtype=object)
    upd = pd.Series([d[1] for d in data], dtype=object) if use_updated else None
    got = find_duplicates(e, upd).tolist() if data else []
    expected = []
    for i, (num, _) in enumerate(data):
        if num is None:
            expected.append(pd.NA)
            continue
        group = [j for j, (m, _) in enumerate(data) if m == num]
        if use_updated:
            keep = max(group, key=lambda j: (data[j][1] or "0000", -j))
        else:
            keep = group[0]
        expected.append(pd.NA if keep == i else keep)
    assert got == expected


# ---------------------------------------------------------------------------
# check_extract (Great Expectations)
# ---------------------------------------------------------------------------


def _extract(n=20, **over):
    df = pd.DataFrame(
        {
            "id": [str(i) for i in range(n)],
            "name": ["x"] * n,
            "phone": ["+7 916 123 45 %02d" % (i % 100) for i in range(n)],
            "language": ["ru"] * n,
        }
    )
    for k, val in over.items():
        df[k] = val
    return df


def test_check_extract_success(capfd):
    res = check_extract(_extract())
    assert isinstance(res, ExtractCheckResult)
    assert res.success, res.summary()
    assert res.row_count == 20
    for r in res.results:
        assert {"expectation", "column", "success", "unexpected_count", "unexpected_percent"} <= set(r)
    exps = {(r["expectation"], r["column"]) for r in res.results}
    assert ("expect_column_values_to_not_be_null", "phone") in exps
    assert ("expect_column_values_to_be_unique", "id") in exps
    assert ("expect_column_values_to_be_in_set", "language") in exps
    md = res.markdown()
    assert md.count("\n|") >= len(res.results) + 1 and "passed" in md
    err = capfd.readouterr().err
    assert "Calculating Metrics" not in err  # no GE progress bars


def test_check_extract_mostly_empty_phone_fails():
    phones = ["+79161234567"] * 4 + [""] * 10 + ["  "] * 6  # 80% blank
    res = check_extract(_extract(phone=phones))
    assert not res.success
    failed = [(r["expectation"], r["column"]) for r in res.failures]
    assert failed == [("expect_column_values_to_not_be_null", "phone")]
    (f,) = res.failures
    assert f["unexpected_count"] == 16 and f["unexpected_percent"] == pytest.approx(80.0)
    assert "FAILED" in res.summary() and "FAIL" in res.markdown()


def test_check_extract_garbage_phone_column_fails():
    res = check_extract(_extract(phone=["Ivanov"] * 20))
    assert not res.success
    assert any(r["expectation"] == "expect_column_values_to_match_regex" for r in res.failures)


def test_check_extract_duplicate_ids_warn_only():
    res = check_extract(_extract(id=["1", "1"] + [str(i) for i in range(2, 20)], language=["ru"] * 18 + ["de", "kk"]))
    assert res.success
    warned = {r["expectation"]: r for r in res.warnings}
    assert warned["expect_column_values_to_be_unique"]["unexpected_count"] == 2
    assert warned["expect_column_values_to_be_in_set"]["unexpected_count"] == 2  # 90% < mostly=0.95
    assert "warning" in res.summary()


def test_check_extract_optional_language_and_empty_chunk():
    res = check_extract(_extract().drop(columns=["language"]))
    assert res.success
    assert all(r["column"] != "language" for r in res.results)
    empty = check_extract(_extract(0))
    assert empty.success and [r["expectation"] for r in empty.warnings] == ["expect_table_row_count_to_be_between"]


@pytest.mark.parametrize("drop, name", [("phone", "'phone'"), ("id", "'id'")])
def test_check_extract_schema_error_before_gx(monkeypatch, drop, name):
    monkeypatch.setattr(v, "_import_gx", lambda: pytest.fail("GE must not be used"))
    with pytest.raises(ExtractSchemaError) as ei:
        check_extract(_extract().drop(columns=[drop]))
    msg = str(ei.value)
    assert name in msg and "columns: " in msg and "name" in msg
    assert isinstance(ei.value, ValueError)


# ---------------------------------------------------------------------------
# validate_csv
# ---------------------------------------------------------------------------

CSV_IN = (
    "\ufeffid,name,phone,updated_at,note,note\n"
    "1,Анна,8 (916) 123-45-67,2025-01-01T10:00:00Z,\"a, b\",x\n"
    "2,Boris,+7 495 123-45-67,2025-01-01,NA,\n"
    "3,Vera,,2025-01-01,007,\n"
    "4,Gleb,+7 916 1234567,2025-06-01,,\n"
    "5,Dina,garbage,,\"multi\nline\",\n"
    "6,Egor,8-800-555-35-35,,null,\n"
    "7,Fedor,9161234567,2025-02-01,,\n"
    "8,Kazakh,+7 701 123 4567,,,\n"
)


def _read(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_validate_csv_roundtrip(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text(CSV_IN, encoding="utf-8")
    counts = validate_csv(src, dst)
    assert counts == {"ok": 2, "invalid": 1, "not_mobile": 2, "duplicate": 2, "missing": 1}
    out = _read(dst)
    original = list(csv.reader(io.StringIO(CSV_IN.lstrip("\ufeff"))))
    assert out[0] == original[0] + ["phone_e164", "phone_status", "reason", "duplicate_of"]
    assert len(out) == len(original)
    for o, i in zip(out[1:], original[1:]):
        assert o[: len(i)] == i  # every input column unchanged, rows in order
    extra = {row[0]: row[len(original[0]) :] for row in out[1:]}
    assert extra["1"] == ["+79161234567", "duplicate", "same number as row 3", "3"]
    assert extra["4"] == ["+79161234567", "ok", "", ""]  # latest updated_at
    assert extra["7"] == ["+79161234567", "duplicate", "same number as row 3", "3"]
    assert extra["2"] == ["+74951234567", "not_mobile", "fixed-line number cannot receive SMS", ""]
    assert extra["3"] == ["", "missing", "no phone number", ""]
    assert extra["5"][1] == "invalid" and extra["5"][2].startswith("could not parse")
    assert extra["6"][1:3] == ["not_mobile", "toll-free number cannot receive SMS"]
    assert extra["8"] == ["+77011234567", "ok", "", ""]


def test_validate_csv_first_row_kept_without_updated_at(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,tel\n1,89161234567\n2,+79161234567\n3,+77011234567\n", encoding="utf-8")
    counts = validate_csv(src, dst, phone_column="tel")
    assert counts["duplicate"] == 1
    assert [r[-1] for r in _read(dst)[1:]] == ["", "0", ""]


def test_validate_csv_default_region(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("phone\n8 701 123 4567\n07400 123456\n", encoding="utf-8")
    assert validate_csv(src, dst, default_region="GB")["ok"] == 1
    assert [r[1] for r in _read(dst)[1:]] == ["", "+447400123456"]


def test_validate_csv_header_only(tmp_path):
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text("id,name,phone\n", encoding="utf-8")
    assert validate_csv(src, dst) == dict.fromkeys(CSV_STATUSES, 0)
    assert _read(dst) == [["id", "name", "phone", "phone_e164", "phone_status", "reason", "duplicate_of"]]


def test_validate_csv_revalidate_output_is_idempotent(tmp_path):
    src, out1, out2 = tmp_path / "in.csv", tmp_path / "o1.csv", tmp_path / "o2.csv"
    src.write_text(CSV_IN, encoding="utf-8")
    c1 = validate_csv(src, out1)
    c2 = validate_csv(out1, out2)
    assert c1 == c2 and out1.read_bytes() == out2.read_bytes()


def test_validate_csv_missing_column_message(tmp_path):
    src = tmp_path / "IN.csv"
    src.write_text("id,name,tel\n1,a,89161234567\n", encoding="utf-8")
    with pytest.raises(ValidationInputError) as ei:
        validate_csv(src, tmp_path / "out.csv")
    assert str(ei.value) == f"column 'phone' not found in {src}; columns: id, name, tel"
    assert not (tmp_path / "out.csv").exists()


def test_validate_csv_file_errors(tmp_path):
    with pytest.raises(ValidationInputError, match="input file not found: .*nope.csv"):
        validate_csv(tmp_path / "nope.csv", tmp_path / "out.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="empty"):
        validate_csv(empty, tmp_path / "out.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("phone,name\n1,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(ValidationInputError, match="not valid utf-8.*--encoding"):
        validate_csv(latin, tmp_path / "out.csv", fmt=ExportFormat("csv", encoding="utf-8", delimiter=","))
    clash = tmp_path / "clash.csv"
    clash.write_text("phone,reason\n1,x\n", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="reason"):
        validate_csv(clash, tmp_path / "out.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("phone\n1\n", encoding="utf-8")
    with pytest.raises(ValidationInputError, match="output directory does not exist"):
        validate_csv(ok, tmp_path / "missing_dir" / "out.csv")


# ---------------------------------------------------------------------------
# lean phonenumbers calls, streamed batches, checks combined over chunks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["RU", "GB", None])
def test_lean_classifier_equals_reference(region):
    raws = [_fmt(f, n) for f in REALISTIC_FORMATS for n in REALISTIC_NUMBERS] + [
        "+44 7911 123456", "+44 20 7946 0958", "+1 202 555 0143", "+1 684 733 1234", "+800 1234 5678",
        "+882 1234 5678", "+870 773 111 632", "+7 800 555 35 35", "12", "+", "++7", "garbage", "+7 916 12",
    ]
    assert [v._classify_lean(r, region) for r in raws] == [v._classify(r, region) for r in raws]


def test_phone_classifier_streams_batches_like_normalize_phones():
    raws = [_fmt(f, n) for f in REALISTIC_FORMATS for n in REALISTIC_NUMBERS] + [None, "", "foo"]
    batches = [pd.Series(raws[i : i + 50], dtype=object) for i in range(0, len(raws), 50)]
    for processes, min_parallel in ((1, 0), (2, 0)):
        with v.PhoneClassifier("RU", processes, min_parallel=min_parallel) as classifier:
            pending = [classifier.submit(b) for b in batches]  # all submitted before any is collected
            got = [result() for result in pending]
        for b, df in zip(batches, got):
            pd.testing.assert_frame_equal(df, normalize_phones(b))


def test_check_results_combine_over_chunks():
    good = pd.DataFrame({"id": [f"C{i}" for i in range(8)], "phone": ["+79161234567"] * 6 + ["", "abc"]})
    whole = check_extract(good)
    parts = [check_extract(good.iloc[:4]), check_extract(good.iloc[4:])]
    combined = ExtractCheckResult.combine(parts)
    assert combined.success == whole.success and combined.row_count == whole.row_count == 8
    by_key = {(r["expectation"], r["column"]): r for r in whole.results}
    for r in combined.results:
        w = by_key[(r["expectation"], r["column"])]
        assert r["unexpected_count"] == w["unexpected_count"]
        if w["unexpected_percent"] is not None:
            assert r["unexpected_percent"] == pytest.approx(w["unexpected_percent"])
    assert ExtractCheckResult.combine([whole]) is whole and ExtractCheckResult.combine([]) is None
    again = ExtractCheckResult.from_dict(__import__("json").loads(__import__("json").dumps(whole.to_dict())))
    assert again.markdown() == whole.markdown()
