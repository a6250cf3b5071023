"""tasks/expectations.py: the Great Expectations checks of a raw extract."""

from __future__ import annotations


import pandas as pd
import pytest

from tasks import expectations as v
from tasks.expectations import ExtractCheckResult, ExtractSchemaError, check_extract, check_values


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



def test_batch_after_batch_reuses_one_suite_and_leaves_no_cyclic_garbage():
    """The extract checks every batch in one long-lived worker: the suite is built once per process, each
    batch gets its own verdict, and a check leaves (almost) nothing for the cyclic collector (a context per
    check left ~2,000 objects holding the batch's rows: +1.2 GB over 10M contacts)."""
    import gc

    from tasks import expectations

    good = (["C1", "C2", "C3", "C4"], ["+79161234567"] * 4, ["ru"] * 4)
    bad = (["C1", "C2", "C3", "C4"], ["x", "y", None, None], ["ru"] * 4)
    check_values(*good)
    suites = dict(expectations._SUITES)
    gc.collect()
    gc.disable()
    try:
        verdicts = [check_values(*b).success for b in (good, bad, good, bad, good)]
        left = gc.collect()
    finally:
        gc.enable()
    assert verdicts == [True, False, True, False, True]
    assert expectations._SUITES == suites  # the same suite objects, none built again
    assert left < 1_000, left


_MIXED = ([str(i % 170) for i in range(200)],
          [("+7 916 123-45-67", None, "abc", "12", "8(916)1234567", "")[i % 6] for i in range(200)],
          [("ru", "en", "de", None)[i % 4] for i in range(200)])


def _check_in_worker(ids, phones, languages) -> tuple[dict, dict]:
    """Runs in a spawned worker: the verdict, and which of GE's unused imports ran or stayed deferred."""
    import sys

    from smsflow.lazy_imports import deferred

    result = check_values(ids, phones, languages).to_dict()
    return result, {name: ("deferred" if deferred(name) else "ran" if name in sys.modules else "absent")
                    for name in v.GX_UNUSED_IMPORTS}


def test_a_checks_worker_defers_what_ge_imports_but_never_uses_with_the_same_verdict():
    """In a worker process of ours (smsflow.warm, the phones pool) Great Expectations is imported with altair
    and scipy.stats deferred (~1 s of its import on a slow machine: a small preview waits for it); the verdict
    is the one this process (not a worker: nothing deferred) computes, expectation by expectation."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        there, modules = pool.submit(_check_in_worker, *_MIXED).result(timeout=120)
    assert modules == {"altair": "deferred", "scipy.stats": "deferred"}
    here = check_values(*_MIXED).to_dict()
    assert there == here
    assert not there["success"] and any(r["unexpected_count"] for r in there["results"])


def test_a_check_does_not_fingerprint_the_batch(monkeypatch):
    """GE hashes every pandas batch for a 'fingerprint' in its batch markers (40 % of the checks' CPU at 1M
    contacts); nothing here reads it, so it is off: the verdict is computed without hashing the rows."""
    check_values(*_MIXED)  # GE imported, the suite built
    from great_expectations.execution_engine import pandas_execution_engine as pee

    calls = []
    monkeypatch.setattr(pee, "hash_pandas_dataframe", lambda df: calls.append(len(df)) or "x")
    result = check_values(*_MIXED)
    assert calls == []
    assert not result.success and result.row_count == 200
