"""smsflow/duplicates.py: which row keeps a shared number."""

from __future__ import annotations


import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smsflow.duplicates import find_duplicates


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


