"""A/B/n tests: the design (arms, split, holdout), stable assignment and the statistics.

Statistics come from kept libraries: statsmodels (pooled two-proportion z-test, Newcombe interval
of a difference, Holm, power) and scipy (chi-square of the arm sizes for sample-ratio mismatch).
The one formula written here is the mixture sequential probability ratio test (mSPRT, Johari,
Pekelis, Walsh 2017, "Always valid inference", as in Optimizely's stats engine), for which no
maintained Python library exists: with d the observed difference of the rates, V its estimated
variance and a normal mixing prior N(0, tau^2) on the true difference,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 * d^2 / (2 * V * (V + tau^2)))

and the always-valid p-value is the running minimum of 1 / Lambda over all looks. Under no
difference, the chance that Lambda ever reaches 1/alpha is at most alpha (Ville's inequality), so
deciding at any look, as often as the nightly report looks, keeps the false-positive rate at alpha
(tests/smsflow/test_abtest.py simulates 2,000 A/A tests with 20 looks each).

Assignment: bucket = SHA-256(salt, campaign, E.164) mod 10,000; contiguous bucket ranges make the
holdout, the test arms (by split) and the roll-out rest, so a rerun, a re-import or a resumed
campaign puts every phone in the same arm.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

BUCKETS = 10_000
HOLDOUT = "holdout"
ROLLOUT = "rollout"  # the rest of the audience, which gets the winner
METRICS = ("click_rate", "conversion_rate", "reply_rate", "opt_out_rate")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$")


class ABError(ValueError):
    """Bad input to the statistics or the design: one clear message."""


# ----------------------------------------------------------------------------- design

class Variant(BaseModel):
    name: str = Field(description="Arm name (letters, digits, '-', '_'), e.g. A, B, evening.")
    template: str | None = Field(default=None, description="Template of this arm (library name or file); "
                                 "default: the campaign's template.")
    window: str | None = Field(default=None, description="Local send window of this arm, 'HH:MM-HH:MM' "
                               "(a send-time test); default: the campaign policy's.")
    share: float = Field(default=1.0, gt=0, description="Relative share of the test audience (normalised).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v in (HOLDOUT, ROLLOUT):
            raise ValueError(f"variant name {v!r}: letters, digits, '-' or '_', at most 40, not "
                             f"{HOLDOUT!r}/{ROLLOUT!r}")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None and (not _WINDOW.match(v) or v[:5] >= v[6:]):
            raise ValueError(f"window {v!r}: 'HH:MM-HH:MM' with start before end")
        return v


class ABTest(BaseModel):
    """One element at a time: the arms differ by template text or by send window, not both."""

    variants: list[Variant] = Field(min_length=2, max_length=10)
    control: str | None = Field(default=None, description="The control arm; default: the first variant.")
    metric: Literal["click_rate", "conversion_rate", "reply_rate"] = Field(
        default="click_rate", description="Decides the winner; the opt-out rate is always checked as a guardrail.")
    holdout: float = Field(default=0.0, ge=0, le=0.5, description="Share of the audience that gets nothing "
                           "(measures the campaign's incremental effect).")
    test_share: float = Field(default=1.0, gt=0, le=1, description="Share of the rest that is tested; the others "
                              "get the winner after the decision (1 = no roll-out).")
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    power: float = Field(default=0.8, gt=0.5, lt=1)
    baseline: float = Field(default=0.05, gt=0, lt=1, description="Expected control rate (sample size).")
    mde: float = Field(default=0.01, gt=0, lt=1, description="Minimum detectable effect, absolute (0.01 = 1 pp): "
                       "the sample size and the sequential test's prior scale.")
    deadline_hours: float = Field(default=72, gt=0, description="Hours after the test's first send: decide then "
                                  "with what is known (the fallback when nothing won).")
    fallback: Literal["control", "none"] = Field(default="control", description="Roll-out when nothing wins: the "
                                                 "control to the rest, or nothing.")
    min_per_arm: int = Field(default=100, ge=1, description="No automatic decision before every arm has this many "
                             "sent messages.")
    salt: str = Field(default="smsflow-ab", min_length=1, max_length=100, description="Assignment salt.")

    @model_validator(mode="after")
    def _check(self) -> "ABTest":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control {self.control!r} is not a variant ({', '.join(names)})")
        kinds = {("template" if v.template else "") + ("window" if v.window else "") for v in self.variants} - {""}
        if len(kinds) > 1 or "templatewindow" in kinds:
            raise ValueError("test one element at a time: variants differ by template or by window, not both")
        if self.baseline + self.mde >= 1:
            raise ValueError("baseline + mde must stay below 1")
        return self

    @property
    def control_name(self) -> str:
        return self.control or self.variants[0].name

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def shares(self) -> dict[str, float]:
        total = sum(v.share for v in self.variants)
        return {v.name: v.share / total for v in self.variants}

    def ranges(self) -> list[tuple[str, int, int]]:
        """(arm, first bucket, last bucket + 1): holdout, the test arms by split, then the roll-out rest."""
        out: list[tuple[str, int, int]] = []
        h = round(self.holdout * BUCKETS)
        if h:
            out.append((HOLDOUT, 0, h))
        test_end = h + round(self.test_share * (BUCKETS - h))
        shares, acc, start = self.shares(), 0.0, h
        for i, v in enumerate(self.variants):
            acc += shares[v.name]
            end = test_end if i == len(self.variants) - 1 else h + round(acc * (test_end - h))
            out.append((v.name, start, end))
            start = end
        if test_end < BUCKETS:
            out.append((ROLLOUT, test_end, BUCKETS))
        return [r for r in out if r[2] > r[1]]


def bucket(salt: str, campaign: str, e164: str) -> int:
    """The phone's bucket (0..9,999) in this campaign's test: stable, uniform, not reversible."""
    h = hashlib.sha256(f"{salt}\x1f{campaign}\x1f{e164}".encode()).digest()
    return int.from_bytes(h[:8], "big") % BUCKETS


def assign(test: ABTest, campaign: str, phones: list[str]) -> list[str]:
    """The arm of every phone (holdout, a variant, or rollout)."""
    ranges = test.ranges()
    bounds = [hi for _, _, hi in ranges]
    names = [n for n, _, _ in ranges]
    import bisect

    return [names[bisect.bisect_right(bounds, bucket(test.salt, campaign, p))] for p in phones]


def in_global_holdout(share: float, salt: str, e164: str) -> bool:
    """A phone kept from all marketing (setting SMSFLOW_GLOBAL_HOLDOUT), with its own salt."""
    return share > 0 and bucket(salt, "", e164) < round(share * BUCKETS)


# ----------------------------------------------------------------------------- statistics

def parse_split(text: str | None, names: list[str]) -> dict[str, float]:
    """``A=0.5,B=0.5`` -> shares of every variant (equal when not given); they must sum to 1."""
    if not text:
        return {n: 1 / len(names) for n in names}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = float("nan")
        if not sep or not math.isfinite(share) or share < 0:
            raise ABError(f"--split {part!r}: expected NAME=SHARE with a share >= 0")
        out[name.strip()] = share
    if set(out) != set(names):
        raise ABError(f"--split names {sorted(out)} do not match the variants {sorted(names)}")
    if abs(sum(out.values()) - 1) > 1e-6:
        raise ABError(f"--split shares sum to {sum(out.values()):g}, not 1")
    return out


def check_counts(name: str, sent: int, conversions: int) -> None:
    if sent <= 0:
        raise ABError(f"variant {name}: sent must be > 0 (got {sent})")
    if conversions < 0 or conversions > sent:
        raise ABError(f"variant {name}: conversions must be between 0 and sent (got {conversions} of {sent})")


def srm_p_value(sizes: dict[str, int], shares: dict[str, float]) -> float:
    """Sample-ratio mismatch: scipy's chi-square of the arm sizes against the configured split."""
    from scipy.stats import chisquare

    total = sum(sizes.values())
    names = [n for n in sizes if shares.get(n, 0) > 0]
    if total == 0 or len(names) < 2:
        return 1.0
    obs = [sizes[n] for n in names]
    exp = [shares[n] * total / sum(shares[m] for m in names) for n in names]
    return float(chisquare(obs, exp).pvalue)


def z_test(n_v: int, k_v: int, n_c: int, k_c: int) -> float:
    """Two-sided pooled two-proportion z-test (statsmodels); 1.0 when every or no one converted (no
    variance: no evidence of a difference)."""
    from statsmodels.stats.proportion import proportions_ztest

    if k_v + k_c in (0, n_v + n_c):
        return 1.0
    return float(proportions_ztest([k_v, k_c], [n_v, n_c], alternative="two-sided")[1])


def diff_ci(n_v: int, k_v: int, n_c: int, k_c: int, alpha: float) -> list[float]:
    """Newcombe interval of rate(variant) - rate(control) at 1 - alpha (statsmodels)."""
    from statsmodels.stats.proportion import confint_proportions_2indep

    low, high = confint_proportions_2indep(k_v, n_v, k_c, n_c, compare="diff", method="newcomb", alpha=alpha)
    return [float(low), float(high)]


def holm(p_values: list[float], alpha: float) -> list[float]:
    from statsmodels.stats.multitest import multipletests

    if len(p_values) < 2:  # Holm of one p-value is itself (multipletests also runs gc.collect(): 50 ms)
        return [float(p) for p in p_values]
    return [float(p) for p in multipletests(p_values, alpha=alpha, method="holm")[1]]


def ab_stats(counts: list[tuple[str, int, int]], control: str | None = None, alpha: float = 0.05,
             split: dict[str, float] | None = None) -> dict:
    """The fixed-horizon comparison of every variant with the control (the ``ab-stats`` contract)."""
    if not 0 < alpha < 1:
        raise ABError(f"alpha must be between 0 and 1 (got {alpha})")
    names = [n for n, _, _ in counts]
    if len(names) < 2:
        raise ABError("give at least two variants")
    if len(set(names)) != len(names):
        raise ABError(f"variant names repeat: {names}")
    for n, s, k in counts:
        check_counts(n, s, k)
    control = control or names[0]
    if control not in names:
        raise ABError(f"control {control!r} is not a variant ({', '.join(names)})")
    shares = split if split is not None else {n: 1 / len(names) for n in names}
    by = {n: (s, k) for n, s, k in counts}
    n_c, k_c = by[control]
    rate_c = k_c / n_c
    others = [n for n in names if n != control]
    p_values = [z_test(*by[n], n_c, k_c) for n in others]
    adjusted = holm(p_values, alpha)
    variants = {}
    for n, p, pa in zip(others, p_values, adjusted):
        s, k = by[n]
        rate = k / s
        variants[n] = {"rate": rate, "lift": (rate / rate_c - 1) if rate_c else None, "p_value": p,
                       "p_adjusted": pa, "diff_ci": diff_ci(s, k, n_c, k_c, alpha), "significant": pa < alpha}
    return {"control": control, "srm_p_value": srm_p_value({n: s for n, s, _ in counts}, shares),
            "variants": variants}


def ab_size(baseline: float, mde: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Contacts per arm to detect ``baseline`` -> ``baseline + mde`` (two-sided, equal arms; statsmodels)."""
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    if not 0 < baseline < 1:
        raise ABError(f"--baseline must be between 0 and 1 (got {baseline})")
    if mde == 0 or not 0 < baseline + mde < 1:
        raise ABError(f"--mde must be non-zero with 0 < baseline + mde < 1 (got {mde})")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ABError("--alpha and --power must be between 0 and 1")
    n = NormalIndPower().solve_power(effect_size=proportion_effectsize(baseline + mde, baseline), alpha=alpha,
                                     power=power, ratio=1, alternative="two-sided")
    return int(math.ceil(n))


def msprt_lambda(n_v: int, k_v: int, n_c: int, k_c: int, tau: float) -> float:
    """The mixture likelihood ratio of 'the rates differ' (see the module doc); 1 without variance."""
    if n_v <= 0 or n_c <= 0:
        return 1.0
    p_v, p_c = k_v / n_v, k_c / n_c
    v = p_v * (1 - p_v) / n_v + p_c * (1 - p_c) / n_c
    if v <= 0:
        return 1.0
    t2 = tau * tau
    d = p_v - p_c
    log_l = 0.5 * math.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2))
    return math.exp(min(log_l, 700.0))


def always_valid_p(n_v: int, k_v: int, n_c: int, k_c: int, tau: float, previous: float = 1.0) -> float:
    """The always-valid p-value after this look: min(previous, 1 / Lambda)."""
    return min(previous, 1.0 / msprt_lambda(n_v, k_v, n_c, k_c, tau))


def more_needed(sizes: list[int], baseline: float, mde: float, alpha: float, power: float) -> int:
    """About how many more per arm the fixed-horizon design wants, judged by the smallest arm (0 when reached)."""
    return max(0, ab_size(baseline, mde, alpha, power) - (min(sizes) if sizes else 0))


def sequential_look(arms: dict[str, tuple[int, int]], test: ABTest, previous: dict[str, float] | None = None,
                    opt_outs: dict[str, int] | None = None, previous_guard: dict[str, float] | None = None) -> dict:
    """One look of the automatic decision. ``arms``: name -> (sent, events of the metric); ``previous``:
    each variant's always-valid p-value after the last look (its running minimum continues here).

    A winner is declared only when every arm has ``min_per_arm`` sent, the split shows no sample-ratio
    mismatch (p >= 0.001), and the Holm-adjusted always-valid p-value of a variant against the control
    is below alpha: the best such variant that beats the control wins; when every variant is significantly
    worse, the control wins. A variant whose opt-out rate is significantly higher (same sequential test)
    never wins. Returns the numbers and the verdict."""
    control = test.control_name
    tau = test.mde
    previous = previous or {}
    previous_guard = previous_guard or {}
    others = [v.name for v in test.variants if v.name != control]
    n_c, k_c = arms.get(control, (0, 0))
    p_seq = {n: always_valid_p(*arms.get(n, (0, 0)), n_c, k_c, tau, previous.get(n, 1.0)) for n in others}
    adjusted = dict(zip(others, holm([p_seq[n] for n in others], test.alpha)))
    guard: dict[str, float] = {}
    if opt_outs is not None:
        o_c = opt_outs.get(control, 0)
        guard = {n: always_valid_p(arms.get(n, (0, 0))[0], opt_outs.get(n, 0), n_c, o_c, tau, previous_guard.get(n, 1.0))
                 for n in others}
    srm = srm_p_value({v.name: arms.get(v.name, (0, 0))[0] for v in test.variants}, test.shares())
    out = {"p_seq": p_seq, "p_seq_adjusted": adjusted, "guard_p_seq": guard, "srm_p_value": srm, "winner": None}
    small = [v.name for v in test.variants if arms.get(v.name, (0, 0))[0] < test.min_per_arm]
    if small:
        return {**out, "reason": f"waiting: fewer than {test.min_per_arm} sent in {', '.join(small)}"}
    if srm < 0.001:
        return {**out, "reason": f"blocked: sample-ratio mismatch (p = {srm:.2g} < 0.001); no automatic decision"}
    rate = {n: arms[n][1] / arms[n][0] for n in arms if arms[n][0]}
    harmful = {n for n in others if guard.get(n, 1.0) < test.alpha and
               opt_outs.get(n, 0) / arms[n][0] > opt_outs.get(control, 0) / n_c}
    better = [n for n in others if adjusted[n] < test.alpha and rate[n] > rate[control] and n not in harmful]
    if better:
        w = max(better, key=lambda n: rate[n])
        return {**out, "winner": w, "reason": f"{w} beats {control} (always-valid p = {adjusted[w]:.3g} after Holm)"}
    if others and all(adjusted[n] < test.alpha and rate[n] < rate[control] for n in others):
        return {**out, "winner": control, "reason": f"{control} (control) beats every variant"}
    return {**out, "reason": "no difference yet" + (f"; guardrail: {', '.join(sorted(harmful))} raise opt-outs"
                                                    if harmful else "")}
