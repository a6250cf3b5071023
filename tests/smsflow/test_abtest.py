"""A/B statistics: the CLI contracts against independent computations, assignment, and the A/A simulation."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import chisquare, norm
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from smsflow.abtest import (BUCKETS, HOLDOUT, ROLLOUT, ABTest, Variant, assign, bucket, in_global_holdout,
                            sequential_look)


def smsflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smsflow.cli", *args], capture_output=True, text=True, timeout=120)


def _pooled_p(n1, k1, n2, k2):
    p = (k1 + k2) / (n1 + n2)
    z = (k1 / n1 - k2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return 2 * norm.sf(abs(z))


def _newcombe(n1, k1, n2, k2, alpha):
    l1, u1 = proportion_confint(k1, n1, alpha=alpha, method="wilson")
    l2, u2 = proportion_confint(k2, n2, alpha=alpha, method="wilson")
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _holm(ps):
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_ab_stats_contract_matches_independent_computation(alpha):
    rng = np.random.default_rng(7)
    arms = {"ctl": (4000, 200), "B": (4100, 255), "C": (3950, 190), "D": (4020, 260)}
    arms = {k: (int(n + rng.integers(0, 50)), int(c)) for k, (n, c) in arms.items()}
    split = "B=0.25,ctl=0.25,C=0.25,D=0.25"
    r = smsflow("ab-stats", *[f"--variant={k}={n}:{c}" for k, (n, c) in arms.items()], "--control", "ctl",
                "--alpha", str(alpha), "--split", split)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    out = json.loads(r.stdout)
    assert set(out) == {"control", "srm_p_value", "variants"} and out["control"] == "ctl"
    assert set(out["variants"]) == {"B", "C", "D"}
    n_c, k_c = arms["ctl"]
    names = ["B", "C", "D"]
    ps = [_pooled_p(*arms[n], n_c, k_c) for n in names]
    for n, p, pa in zip(names, ps, _holm(ps)):
        v = out["variants"][n]
        assert set(v) == {"rate", "lift", "p_value", "p_adjusted", "diff_ci", "significant"}
        assert v["rate"] == pytest.approx(arms[n][1] / arms[n][0])
        assert v["lift"] == pytest.approx((arms[n][1] / arms[n][0]) / (k_c / n_c) - 1)
        assert v["p_value"] == pytest.approx(p, rel=1e-9)
        assert v["p_adjusted"] == pytest.approx(pa, rel=1e-9)
        assert v["diff_ci"] == pytest.approx(list(_newcombe(*arms[n], n_c, k_c, alpha)), rel=1e-9)
        assert v["significant"] is bool(pa < alpha)
    sizes = [arms[k][0] for k in arms]
    assert out["srm_p_value"] == pytest.approx(chisquare(sizes, [sum(sizes) / 4] * 4).pvalue, rel=1e-9)


def test_ab_stats_defaults_control_to_first_and_srm_to_equal_split():
    r = smsflow("ab-stats", "--variant", "A=1000:50", "--variant", "B=1400:90")
    out = json.loads(r.stdout)
    assert out["control"] == "A" and list(out["variants"]) == ["B"]
    assert out["srm_p_value"] == pytest.approx(chisquare([1000, 1400]).pvalue) and out["srm_p_value"] < 0.001
    # a clear difference is significant; one variant: Holm changes nothing
    v = out["variants"]["B"]
    assert v["p_adjusted"] == v["p_value"] == pytest.approx(proportions_ztest([90, 50], [1400, 1000])[1])
    r = smsflow("ab-stats", "--variant", "A=1000:50", "--variant", "B=1400:90", "--split", "A=0.4,B=0.6")
    assert json.loads(r.stdout)["srm_p_value"] == pytest.approx(chisquare([1000, 1400], [960, 1440]).pvalue)


@pytest.mark.parametrize("args, message", [
    (["--variant", "A=100:5", "--variant", "B=100:101"], "conversions must be between 0 and sent"),
    (["--variant", "A=0:0", "--variant", "B=100:1"], "sent must be > 0"),
    (["--variant", "A=100:5", "--variant", "B=100:6", "--split", "A=0.5,B=0.6"], "sum to 1.1"),
    (["--variant", "A=100:5", "--variant", "B=100:6", "--split", "A=0.5,C=0.5"], "do not match"),
    (["--variant", "A=100:5"], "at least two variants"),
    (["--variant", "A=100:x", "--variant", "B=100:6"], "NAME=SENT:CONVERSIONS"),
    (["--variant", "A=100:5", "--variant", "B=100:6", "--control", "Z"], "not a variant"),
    (["--variant", "A=100:-1", "--variant", "B=100:6"], "between 0 and sent"),
])
def test_ab_stats_bad_input_exits_non_zero_with_one_clear_message(args, message):
    r = smsflow("ab-stats", *args)
    assert r.returncode != 0 and r.stdout == ""
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("baseline, mde, alpha, power", [(0.05, 0.01, 0.05, 0.8), (0.2, 0.03, 0.01, 0.9),
                                                         (0.1, -0.02, 0.05, 0.8)])
def test_ab_size_matches_the_arcsine_formula(baseline, mde, alpha, power):
    r = smsflow("ab-size", "--baseline", str(baseline), "--mde", str(mde), "--alpha", str(alpha), "--power", str(power))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    h = abs(2 * math.asin(math.sqrt(baseline + mde)) - 2 * math.asin(math.sqrt(baseline)))
    # Cohen's h, var(2 asin sqrt(p)) = 1/n per arm; solve_power also counts the far tail, so it may need 1 less
    approx = 2 * ((norm.ppf(1 - alpha / 2) + norm.ppf(power)) / h) ** 2
    assert list(out) == ["per_arm"] and isinstance(out["per_arm"], int)
    assert math.ceil(approx) - 1 <= out["per_arm"] <= math.ceil(approx)


@pytest.mark.parametrize("args", [["--baseline", "1.2", "--mde", "0.01"], ["--baseline", "0.05", "--mde", "0"],
                                  ["--baseline", "0.5", "--mde", "0.6"], ["--baseline", "0.05", "--mde", "0.01",
                                                                          "--power", "1.5"]])
def test_ab_size_bad_input(args):
    r = smsflow("ab-size", *args)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_assignment_is_stable_uniform_and_per_campaign():
    phones = [f"+79{i:09d}" for i in range(1_000_000)]
    counts = np.bincount([bucket("s", "spring", p) for p in phones], minlength=BUCKETS)
    assert chisquare(counts).pvalue > 0.001  # 10,000 buckets are uniform
    test = ABTest(variants=[Variant(name="A"), Variant(name="B", share=2), Variant(name="C")], holdout=0.1,
                  test_share=0.5)
    arms = assign(test, "spring", phones)
    sizes = {a: arms.count(a) for a in (HOLDOUT, "A", "B", "C", ROLLOUT)}
    expected = {HOLDOUT: 0.1, "A": 0.1125, "B": 0.225, "C": 0.1125, ROLLOUT: 0.45}
    assert chisquare([sizes[a] for a in expected], [expected[a] * len(phones) for a in expected]).pvalue > 0.001
    assert assign(test, "spring", phones[:1000]) == arms[:1000]  # a rerun: the same arms
    other = assign(test, "autumn", phones[:20_000])
    assert sum(a != b for a, b in zip(other, arms[:20_000])) > 10_000  # another campaign: independent draw
    # the global holdout uses its own salt: not the same phones as a campaign's holdout
    g = [in_global_holdout(0.1, "global", p) for p in phones[:100_000]]
    assert 0.09 < sum(g) / len(g) < 0.11
    both = sum(1 for x, a in zip(g, arms[:100_000]) if x and a == HOLDOUT)
    assert both < 0.02 * 100_000


def test_design_rejects_two_elements_at_once_and_bad_names():
    with pytest.raises(ValueError, match="one element at a time"):
        ABTest(variants=[Variant(name="A", template="a"), Variant(name="B", window="18:00-21:00")])
    with pytest.raises(ValueError, match="variant name"):
        Variant(name="holdout")
    with pytest.raises(ValueError, match="window"):
        Variant(name="A", window="21:00-10:00")
    with pytest.raises(ValueError, match="control"):
        ABTest(variants=[Variant(name="A"), Variant(name="B")], control="C")


def test_aa_simulation_sequential_keeps_alpha_naive_peeking_does_not():
    """2,000 A/A tests, 20 looks each: the automatic (sequential) decision's false-positive rate stays at
    alpha + 3 standard errors; stopping at the first naive fixed-horizon p < alpha is far above it."""
    rng = np.random.default_rng(20261206)
    tests, looks, per_look, rate, alpha = 2000, 20, 250, 0.05, 0.05
    design = ABTest(variants=[Variant(name="A"), Variant(name="B")], alpha=alpha, mde=0.01, min_per_arm=1)
    a = rng.binomial(per_look, rate, size=(tests, looks)).cumsum(axis=1)
    b = rng.binomial(per_look, rate, size=(tests, looks)).cumsum(axis=1)
    seq_fp = naive_fp = 0
    for t in range(tests):
        previous: dict[str, float] = {}
        decided = naive = False
        for look in range(looks):
            n = per_look * (look + 1)
            res = sequential_look({"A": (n, int(a[t, look])), "B": (n, int(b[t, look]))}, design, previous)
            previous = res["p_seq"]
            decided = decided or res["winner"] is not None
            ka, kb = int(a[t, look]), int(b[t, look])
            naive = naive or (ka + kb > 0 and proportions_ztest([kb, ka], [n, n])[1] < alpha)
        seq_fp += decided
        naive_fp += naive
    se = math.sqrt(alpha * (1 - alpha) / tests)
    print(f"A/A: sequential false positives {seq_fp / tests:.4f}, naive peeking {naive_fp / tests:.4f}")
    assert seq_fp / tests <= alpha + 3 * se
    assert naive_fp / tests > 2 * alpha  # the trap the sequential test avoids, shown in the same data


def test_sequential_look_finds_a_real_difference_and_respects_srm_and_guardrail():
    design = ABTest(variants=[Variant(name="A"), Variant(name="B")], mde=0.01, min_per_arm=100)
    n = 20_000
    res = sequential_look({"A": (n, 1000), "B": (n, 1300)}, design)
    assert res["winner"] == "B" and res["p_seq_adjusted"]["B"] < 0.05
    # fewer than min_per_arm: no decision whatever the numbers
    assert sequential_look({"A": (50, 1), "B": (50, 40)}, design)["winner"] is None
    # the arm sizes do not fit the split: blocked, and it says so
    res = sequential_look({"A": (n, 1000), "B": (n // 2, 700)}, design)
    assert res["winner"] is None and res["reason"].startswith("blocked: sample-ratio mismatch")
    # B clicks more but makes people opt out: no winner
    res = sequential_look({"A": (n, 1000), "B": (n, 1300)}, design, opt_outs={"A": 20, "B": 200})
    assert res["winner"] is None and "guardrail" in res["reason"]
    # every variant clearly worse: the control wins
    assert sequential_look({"A": (n, 1300), "B": (n, 1000)}, design)["winner"] == "A"
