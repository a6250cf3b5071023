"""Phone numbers to E.164, mobile-only: the parsing half of validate-and-dedup.

A leaf (no module of ours imported): the validate step, the CLI's CSV validator, the
service (inbound replies), journeys and erasure all normalise numbers here.

Public API
----------
normalize_phones(raw, default_region="RU") -> DataFrame
normalize_phones_parallel(raw, default_region="RU", processes=None, min_parallel=50_000) -> DataFrame
PhoneClassifier: the same over many batches with one process pool

Speed
-----
``phonenumbers`` parses ~19k numbers/s.  To handle millions of contacts,
:func:`normalize_phones` runs an *exact* vectorised fast path for the dominant
case (Russian mobile numbers written as ``+7XXXXXXXXXX``, ``8XXXXXXXXXX``,
``7XXXXXXXXXX`` or bare ``XXXXXXXXXX``, with any spaces, NBSPs, dots, dashes and
parentheses).  The fast path is built at import time from phonenumbers' own RU
metadata and replicates every decision phonenumbers makes for such strings
(see :func:`_build_fast_path`); if any structural precondition does not hold
for the installed metadata the fast path is disabled and everything goes
through phonenumbers.  Everything else goes through phonenumbers, called once
per distinct (cleaned) string.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType


__all__ = [
    "PHONE_STATUSES",
    "SMS_CAPABLE_TYPES",
    "PhoneClassifier",
    "fast_path_mobiles",
    "normalize_phones",
    "normalize_phones_parallel",
]

#: Statuses produced by :func:`normalize_phones`.
PHONE_STATUSES: tuple[str, ...] = ("ok", "invalid", "not_mobile", "missing")

#: Number types that can receive SMS.
SMS_CAPABLE_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})

NORMALIZED_COLUMNS: tuple[str, ...] = ("phone_e164", "phone_status", "reason", "number_type", "region")

_TYPE_NAMES: dict[int, str] = {
    value: name for name, value in vars(PhoneNumberType).items() if name.isupper() and isinstance(value, int)
}

_NOT_MOBILE_REASONS: dict[int, str] = {
    PhoneNumberType.FIXED_LINE: "fixed-line number cannot receive SMS",
    PhoneNumberType.TOLL_FREE: "toll-free number cannot receive SMS",
    PhoneNumberType.PREMIUM_RATE: "premium-rate number cannot receive SMS",
    PhoneNumberType.SHARED_COST: "shared-cost number cannot receive SMS",
    PhoneNumberType.VOIP: "VoIP number cannot receive SMS",
    PhoneNumberType.PERSONAL_NUMBER: "personal (forwarding) number cannot receive SMS",
    PhoneNumberType.PAGER: "pager number cannot receive SMS",
    PhoneNumberType.UAN: "UAN (company) number cannot receive SMS",
    PhoneNumberType.VOICEMAIL: "voicemail number cannot receive SMS",
    PhoneNumberType.UNKNOWN: "number of unknown type cannot receive SMS",
}

_MISSING_REASON = "no phone number"

# phonenumbers refuses inputs longer than this (checked on the raw string).
_MAX_INPUT_LEN = 250

# Separators removed by the pre-clean.  All of them are in phonenumbers'
# _VALID_PUNCTUATION, i.e. phonenumbers itself ignores them between digits.
# (Tabs/newlines are deliberately NOT removed in the middle of a string:
# phonenumbers rejects them there.)
_SEPARATORS: tuple[str, ...] = (" ", "\u00a0", "-", ".", "(", ")")

# A cleaned string of this shape is "simple": phonenumbers gives the same
# result for it as for the raw string it came from (>= 3 digits: phonenumbers'
# viability regex treats punctuation between digits identically; with fewer
# digits punctuation changes the parse error, so such strings keep raw keys).
_SIMPLE_RE = r"\+?[0-9]{3,}"


# ---------------------------------------------------------------------------
# Slow path: phonenumbers itself
# ---------------------------------------------------------------------------

Row = tuple[Any, str, str, str, str]  # (e164 | None, status, reason, number_type, region)


def _classify(text: str, default_region: str | None) -> Row:
    """Classify one non-missing phone string with phonenumbers (reference semantics)."""
    try:
        num = phonenumbers.parse(text, default_region)
    except NumberParseException as exc:
        msg = getattr(exc, "_msg", None) or str(exc)
        return None, "invalid", f"could not parse: {msg}", "", ""
    except Exception as exc:  # never let one odd CRM value kill a million-row run
        return None, "invalid", f"could not parse: {type(exc).__name__}: {exc}", "", ""
    if not phonenumbers.is_valid_number(num):
        cc = num.country_code
        region = phonenumbers.region_code_for_number(num) or phonenumbers.region_code_for_country_code(cc)
        if region in (None, "ZZ", "001"):
            reason = f"not a valid number (country code +{cc})"
        else:
            reason = f"not a valid number for region {region}"
        possible = phonenumbers.is_possible_number_with_reason(num)
        if possible == phonenumbers.ValidationResult.TOO_SHORT:
            reason += " (too short)"
        elif possible == phonenumbers.ValidationResult.TOO_LONG:
            reason += " (too long)"
        return None, "invalid", reason, "", ""
    ntype = phonenumbers.number_type(num)
    e164 = phonenumbers.format_number(num, PhoneNumberFormat.E164)
    region = phonenumbers.region_code_for_number(num) or ""
    type_name = _TYPE_NAMES.get(ntype, str(ntype))
    if ntype in SMS_CAPABLE_TYPES:
        return e164, "ok", "", type_name, region
    reason = _NOT_MOBILE_REASONS.get(ntype, f"{type_name.lower()} number cannot receive SMS")
    return e164, "not_mobile", reason, type_name, region


def _lean_classifier():
    """A :func:`_classify` that asks phonenumbers for the number's region and type once.

    ``is_valid_number``, ``number_type`` and our region lookup each call ``region_code_for_number``
    (which, for calling codes shared by several regions such as +7 and +44, runs the type patterns of
    each candidate region) and the type patterns again. This does the same steps as those three
    functions (phonenumbers' own code, inlined) with each result computed once: same results, about
    half the work. Falls back to :func:`_classify` if the helpers it relies on are missing."""
    from phonenumbers import phonenumberutil as pnu

    try:
        type_helper = pnu._number_type_helper
        meta_for = pnu.PhoneMetadata.metadata_for_region_or_calling_code
        cc_for_region = pnu.country_code_for_valid_region
        nsn_of = pnu.national_significant_number
        non_geo = pnu.REGION_CODE_FOR_NON_GEO_ENTITY
    except AttributeError:  # pragma: no cover - another phonenumbers layout
        return _classify
    parse, region_for, format_number = phonenumbers.parse, phonenumbers.region_code_for_number, phonenumbers.format_number
    unknown = PhoneNumberType.UNKNOWN

    def classify(text: str, default_region: str | None) -> Row:
        try:
            num = parse(text, default_region)
        except Exception:  # noqa: BLE001 - the reasons are worded by _classify
            return _classify(text, default_region)
        cc = num.country_code
        region = region_for(num)
        ntype = unknown
        if region is not None:  # is_valid_number_for_region(num, region), keeping the type it computes
            metadata = meta_for(cc, region.upper())
            if metadata is not None and (region == non_geo or cc == cc_for_region(region)):
                ntype = type_helper(nsn_of(num), metadata)
        if ntype == unknown:
            return _classify(text, default_region)  # invalid: the reason is worded by _classify
        e164 = format_number(num, PhoneNumberFormat.E164)
        type_name = _TYPE_NAMES.get(ntype, str(ntype))
        if ntype in SMS_CAPABLE_TYPES:
            return e164, "ok", "", type_name, region
        reason = _NOT_MOBILE_REASONS.get(ntype, f"{type_name.lower()} number cannot receive SMS")
        return e164, "not_mobile", reason, type_name, region

    return classify


_classify_lean = _lean_classifier()


def _classify_many(texts: Sequence[str], default_region: str | None) -> list[Row]:
    """Worker entry point (module level so it pickles under spawn)."""
    return [_classify_lean(t, default_region) for t in texts]


# ---------------------------------------------------------------------------
# Fast path: exact vectorised RU-mobile recogniser built from phonenumbers metadata
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _FastPath:
    region: str  # "RU"
    country_code: str  # "7"
    national_prefix: str  # "8"
    mobile: str  # RU mobile national_number_pattern
    general: str  # RU general_desc pattern
    leading_digits: str  # RU leading_digits (region resolution for +7)
    national_prefix_for_parsing: str
    international_prefix: str | None
    excluded: tuple[str, ...]  # patterns of types phonenumbers checks before MOBILE
    nsn_length: int = 10


def _build_fast_path() -> tuple[_FastPath | None, str]:
    """Derive the fast-path spec from phonenumbers' RU metadata and verify its preconditions.

    A string takes the fast path only if phonenumbers provably returns
    ``(+7<nsn>, MOBILE, region RU, valid)`` for it.  For a national
    significant number ``nsn`` (10 ASCII digits) that needs, per
    phonenumbers' algorithm:

    * region resolution for +7 picks RU: RU is the first region for calling
      code 7 and ``nsn`` matches RU ``leading_digits`` (KZ shares +7);
    * ``_number_type_helper`` says MOBILE: ``nsn`` matches general_desc and
      mobile, and none of the types tested before mobile (premium rate, toll
      free, shared cost, VoIP, personal, pager, UAN, voicemail, fixed line);
      possible lengths of general_desc and mobile allow 10 digits;
      mobile and fixed-line patterns are not declared identical;
    * parsing does not strip anything off ``nsn``: it does not start with the
      national prefix for parsing, nor (for strings without '+') with the
      international dialling prefix or the country code; for ``7<nsn>`` the
      11-digit string itself is not a valid RU national number, so
      phonenumbers strips the leading 7 as the country code;
    * the national prefix for parsing is a literal equal to the national
      prefix with no transform rule, so ``8<nsn>`` strips exactly the '8'.

    The per-number conditions are evaluated vectorised in
    :func:`_fast_path`; the structural ones are checked here.
    Returns ``(spec, "")`` or ``(None, why_disabled)``.
    """
    region = "RU"
    md = phonenumbers.PhoneMetadata.metadata_for_region(region, None)
    if md is None:
        return None, "no RU metadata"
    cc = md.country_code
    regions = phonenumbers.region_codes_for_country_code(cc)
    if not regions or regions[0] != region:
        return None, f"RU is not the first region for +{cc}: {regions}"
    mobile = md.mobile
    general = md.general_desc
    if mobile is None or not mobile.national_number_pattern or general is None or not general.national_number_pattern:
        return None, "RU metadata has no mobile/general pattern"
    for desc in (mobile, general):
        if desc.possible_length and 10 not in desc.possible_length:
            return None, "10-digit numbers are not possible for RU mobile"
    if md.same_mobile_and_fixed_line_pattern:
        return None, "RU mobile and fixed-line patterns are identical"
    if not md.leading_digits:
        return None, "RU metadata has no leading_digits"
    npfp = md.national_prefix_for_parsing
    nprefix = md.national_prefix
    if not nprefix or not nprefix.isdigit() or npfp not in (nprefix, re.escape(nprefix)):
        return None, f"national prefix for parsing {npfp!r} is not the literal national prefix {nprefix!r}"
    if md.national_prefix_transform_rule:
        return None, "RU has a national prefix transform rule"
    if nprefix.startswith(str(cc)) or str(cc).startswith(nprefix):
        return None, "national prefix and country code overlap"
    excluded = tuple(
        d.national_number_pattern
        for d in (
            md.premium_rate,
            md.toll_free,
            md.shared_cost,
            md.voip,
            md.personal_number,
            md.pager,
            md.uan,
            md.voicemail,
            md.fixed_line,
        )
        if d is not None and d.national_number_pattern
    )
    patterns = (mobile.national_number_pattern, general.national_number_pattern, md.leading_digits, npfp, *excluded)
    if md.international_prefix:
        patterns += (md.international_prefix,)
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as exc:  # pragma: no cover - metadata is always valid
            return None, f"unusable pattern {pat!r}: {exc}"
    spec = _FastPath(
        region=region,
        country_code=str(cc),
        national_prefix=nprefix,
        mobile=mobile.national_number_pattern,
        general=general.national_number_pattern,
        leading_digits=md.leading_digits,
        national_prefix_for_parsing=npfp,
        international_prefix=md.international_prefix or None,
        excluded=excluded,
    )
    # Self-check on a known-good sample: the fast path must agree with phonenumbers.
    sample = f"+{spec.country_code}9161234567"
    if _classify(sample, region) != (sample, "ok", "", "MOBILE", region):
        return None, "self-check failed"
    return spec, ""


_FAST, FAST_PATH_DISABLED_REASON = _build_fast_path()
#: True when the vectorised RU-mobile fast path is active.
FAST_PATH_ENABLED: bool = _FAST is not None
#: The country calling code of the fast path's numbers (7), None when it is off.
FAST_PATH_COUNTRY_CODE: int | None = int(_FAST.country_code) if _FAST is not None else None


def _as_text(raw: pd.Series) -> pd.Series:
    """Return the values as a pandas ``str`` Series (NaN for missing), preserving positions."""
    if isinstance(raw.dtype, pd.StringDtype):
        return raw.astype("str")
    if pd.api.types.is_bool_dtype(raw.dtype):
        return raw.astype(object).map(lambda v: None if pd.isna(v) else str(v)).astype("str")
    if pd.api.types.is_integer_dtype(raw.dtype) or pd.api.types.is_float_dtype(raw.dtype):
        return raw.astype(object).map(_to_text).astype("str")
    if pd.api.types.infer_dtype(raw, skipna=True) in ("string", "empty"):
        return raw.astype("str")
    return raw.astype(object).map(_to_text).astype("str")


def _to_text(v: Any) -> str | None:
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return None
        if float(v).is_integer():
            return str(int(v))  # 79161234567.0 from a numeric column
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


def _clean(stripped: pd.Series) -> pd.Series:
    cleaned = stripped
    for ch in _SEPARATORS:
        cleaned = cleaned.str.replace(ch, "", regex=False)
    return cleaned


def _fast_path(cleaned: pd.Series, default_region: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised: which cleaned strings are RU mobiles that phonenumbers accepts as they are.

    ``cleaned`` must be a ``str`` Series of ``\\+?[0-9]{3,}`` strings whose raw
    form is at most 250 characters.  Returns the positions (into ``cleaned``)
    that take the fast path and their 10-digit national numbers.
    """
    spec = _FAST
    n = len(cleaned)
    none = (np.empty(0, dtype=np.int64), np.empty(0, dtype=object))
    if spec is None or n == 0:
        return none
    cc, np_, L = spec.country_code, spec.national_prefix, spec.nsn_length
    length = cleaned.str.len().to_numpy(dtype="float64", na_value=np.nan)
    first = cleaned.str.slice(0, 1)
    plus = (first == "+").to_numpy(dtype=bool, na_value=False)
    # +7XXXXXXXXXX: works for any default region.
    form_plus = plus & (length == 1 + len(cc) + L) & cleaned.str.startswith("+" + cc).to_numpy(dtype=bool, na_value=False)
    national = np.zeros(n, dtype=bool)
    if default_region == spec.region:
        form_np = ~plus & (length == len(np_) + L) & cleaned.str.startswith(np_).to_numpy(dtype=bool, na_value=False)
        form_cc = ~plus & (length == len(cc) + L) & cleaned.str.startswith(cc).to_numpy(dtype=bool, na_value=False)
        form_bare = ~plus & (length == L)
        national = form_np | form_cc | form_bare
        # 7XXXXXXXXXX: phonenumbers strips the 7 only if the 11 digits are not
        # themselves a viable RU national number.
        if form_cc.any():
            idx = np.flatnonzero(form_cc)
            viable = cleaned.iloc[idx].str.fullmatch(spec.general).to_numpy(dtype=bool, na_value=True)
            form_cc[idx[viable]] = False
            national = form_np | form_cc | form_bare
        # Never let phonenumbers see an international dialling prefix (810...).
        if spec.international_prefix and national.any():
            idx = np.flatnonzero(national)
            idd = cleaned.iloc[idx].str.match(spec.international_prefix).to_numpy(dtype=bool, na_value=True)
            national[idx[idd]] = False
    cand = form_plus | national
    if not cand.any():
        return none
    idx = np.flatnonzero(cand)
    sub = cleaned.iloc[idx].str.slice(-L)
    ok = sub.str.fullmatch(spec.mobile).to_numpy(dtype=bool, na_value=False).copy()

    def narrow(pattern: str, *, full: bool, want: bool) -> None:
        nonlocal ok
        live = np.flatnonzero(ok)
        if live.size == 0:
            return
        s = sub.iloc[live]
        hit = (s.str.fullmatch(pattern) if full else s.str.match(pattern)).to_numpy(dtype=bool, na_value=not want)
        ok[live[hit != want]] = False

    narrow(spec.general, full=True, want=True)
    narrow(spec.leading_digits, full=False, want=True)
    narrow(spec.national_prefix_for_parsing, full=False, want=False)
    narrow(re.escape(cc), full=False, want=False)  # conservative: no country-code-looking nsn
    for pat in spec.excluded:
        narrow(pat, full=True, want=False)
    return idx[ok], sub.to_numpy(dtype=object)[ok]


@lru_cache(maxsize=1)
def _fast_e164() -> re.Pattern[str] | None:
    """:func:`_fast_path`'s conditions for a string with no default region as ONE pattern: only the
    ``+<cc><nsn>`` form qualifies there, and each narrowing of ``nsn`` becomes a look-ahead (a full
    match of P is a match of ``(?:P)\\Z``); the ``nsn`` itself is ASCII digits, as ``_SIMPLE_RE`` demands."""
    spec = _FAST
    if spec is None:
        return None
    looks = [rf"(?=(?:{spec.mobile})\Z)", rf"(?=(?:{spec.general})\Z)", rf"(?=(?:{spec.leading_digits}))",
             rf"(?!(?:{spec.national_prefix_for_parsing}))", rf"(?!{re.escape(spec.country_code)})",
             *(rf"(?!(?:{p})\Z)" for p in spec.excluded)]
    return re.compile(r"\+" + re.escape(spec.country_code) + "".join(looks) + rf"[0-9]{{{spec.nsn_length}}}\Z")


def fast_path_mobiles(numbers: Sequence[str | None]) -> np.ndarray:
    """For each string, whether phonenumbers provably parses it (with no default region) as a
    mobile number of the fast path's region (``+7`` RU): the same proof as :func:`normalize_phones`'
    vectorised one, without calling phonenumbers, one compiled pattern per string (the numbers a
    claim checks are a few thousand: cheaper than a column of pandas string operations). False for
    anything else (which may still be a mobile: the caller asks phonenumbers about those)."""
    pattern = _fast_e164()
    if pattern is None or not len(numbers):
        return np.zeros(len(numbers), dtype=bool)
    match = pattern.match
    return np.fromiter((type(n) is str and match(n) is not None for n in numbers), dtype=bool, count=len(numbers))


# ---------------------------------------------------------------------------
# normalize_phones
# ---------------------------------------------------------------------------


def _prepare(raw: pd.Series, default_region: str | None) -> dict[str, Any]:
    """Missing detection, fast path, and the distinct slow-path keys."""
    if not isinstance(raw, pd.Series):
        raw = pd.Series(raw)
    n = len(raw)
    text = _as_text(raw.reset_index(drop=True))
    stripped = text.str.strip()
    missing = (stripped.isna() | (stripped == "")).to_numpy(dtype=bool, na_value=True)
    cleaned = _clean(stripped)
    short = (text.str.len() <= _MAX_INPUT_LEN).to_numpy(dtype=bool, na_value=False)
    simple = (cleaned.str.fullmatch(_SIMPLE_RE).to_numpy(dtype=bool, na_value=False)) & short & ~missing
    fast = np.zeros(n, dtype=bool)
    nsn = None
    if _FAST is not None and simple.any():
        idx = np.flatnonzero(simple)
        sub_pos, sub_nsn = _fast_path(cleaned.iloc[idx].reset_index(drop=True), default_region)
        fast[idx[sub_pos]] = True
        nsn = (idx[sub_pos], sub_nsn)
    slow_clean = simple & ~fast
    slow_raw = ~missing & ~simple
    pos_c = np.flatnonzero(slow_clean)
    pos_r = np.flatnonzero(slow_raw)
    codes_c, uniq_c = pd.factorize(cleaned.iloc[pos_c].to_numpy(dtype=object))
    codes_r, uniq_r = pd.factorize(text.iloc[pos_r].to_numpy(dtype=object))
    return {
        "n": n,
        "index": raw.index,
        "missing": missing,
        "fast_nsn": nsn,
        "pos_c": pos_c,
        "codes_c": codes_c,
        "pos_r": pos_r,
        "codes_r": codes_r,
        "keys": [*uniq_c.tolist(), *uniq_r.tolist()],
        "n_uniq_c": len(uniq_c),
    }


def _assemble(prep: dict[str, Any], results: list[Row]) -> pd.DataFrame:
    n = prep["n"]
    e164 = np.full(n, None, dtype=object)
    status = np.full(n, "missing", dtype=object)
    reason = np.full(n, _MISSING_REASON, dtype=object)
    ntype = np.full(n, "", dtype=object)
    region = np.full(n, "", dtype=object)
    fast_rows = 0
    if prep["fast_nsn"] is not None:
        pos, nsn = prep["fast_nsn"]
        fast_rows = len(pos)
        if fast_rows:
            e164[pos] = (("+" + _FAST.country_code) + pd.Series(nsn, dtype="str")).to_numpy(dtype=object)
            status[pos] = "ok"
            reason[pos] = ""
            ntype[pos] = "MOBILE"
            region[pos] = _FAST.region
    if results:
        cols = [np.array(col, dtype=object) for col in zip(*results)]
        for pos, codes in ((prep["pos_c"], prep["codes_c"]), (prep["pos_r"], prep["codes_r"] + prep["n_uniq_c"])):
            if len(pos):
                for out, col in zip((e164, status, reason, ntype, region), cols):
                    out[pos] = col[codes]
    df = pd.DataFrame(
        {
            "phone_e164": pd.Series(e164, dtype=object),
            "phone_status": pd.Series(status, dtype="str"),
            "reason": pd.Series(reason, dtype="str"),
            "number_type": pd.Series(ntype, dtype="str"),
            "region": pd.Series(region, dtype="str"),
        }
    )
    df.index = prep["index"]
    df.attrs["fast_path_rows"] = int(fast_rows)
    df.attrs["phonenumbers_calls"] = len(prep["keys"])
    return df


def normalize_phones(raw: pd.Series, default_region: str = "RU") -> pd.DataFrame:
    """Normalise phone strings to E.164 and classify them for SMS.

    Returns a DataFrame with the same index as ``raw`` and columns

    * ``phone_e164`` - ``"+79161234567"`` for valid numbers (also for
      ``not_mobile`` ones), else ``None``;
    * ``phone_status`` - ``ok`` | ``invalid`` | ``not_mobile`` | ``missing``;
    * ``reason`` - human-readable explanation, ``""`` for ``ok``;
    * ``number_type`` - phonenumbers type name (``MOBILE``, ``FIXED_LINE``,
      ``FIXED_LINE_OR_MOBILE``, ``TOLL_FREE`` ...) or ``""`` if invalid/missing;
    * ``region`` - region of the number (``RU``, ``KZ``, ``GB`` ...) or ``""``.

    Only ``MOBILE`` and ``FIXED_LINE_OR_MOBILE`` are ``ok``.  None, NaN, empty
    and whitespace-only values are ``missing``.  The result is identical to
    calling phonenumbers on every value; RU mobiles take an exact vectorised
    fast path and phonenumbers runs once per distinct remaining string.
    ``df.attrs`` reports ``fast_path_rows`` and ``phonenumbers_calls``.
    """
    prep = _prepare(raw, default_region)
    results = _classify_many(prep["keys"], default_region) if prep["keys"] else []
    return _assemble(prep, results)


def normalize_phones_parallel(
    raw: pd.Series,
    default_region: str = "RU",
    processes: int | None = None,
    min_parallel: int = 50_000,
) -> pd.DataFrame:
    """Like :func:`normalize_phones`, parsing the slow-path remainder in worker processes.

    Workers are only started when more than ``min_parallel`` distinct strings
    need phonenumbers (otherwise process start-up costs more than it saves)
    and ``processes`` (default: CPU count) is > 1.  Workers use the ``spawn``
    start method, so this is safe from threaded callers (Prefect); call it
    from code guarded by ``if __name__ == "__main__"`` when used in a script.
    If the pool cannot be started, it falls back to in-process parsing.
    """
    prep = _prepare(raw, default_region)
    keys = prep["keys"]
    procs = processes if processes is not None else (os.cpu_count() or 1)
    if procs > 1 and len(keys) > min_parallel:
        results = _classify_parallel(keys, default_region, procs)
    else:
        results = _classify_many(keys, default_region) if keys else []
    return _assemble(prep, results)


def _classify_parallel(keys: list[str], default_region: str | None, procs: int) -> list[Row]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    n_chunks = procs * 4
    size = max(1, -(-len(keys) // n_chunks))
    chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
    try:
        with ProcessPoolExecutor(max_workers=procs, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(_classify_many, chunks, [default_region] * len(chunks)))
    except (OSError, RuntimeError, ImportError):
        # e.g. BrokenProcessPool (a RuntimeError) or no fork/spawn allowed here.
        return _classify_many(keys, default_region)
    return [row for part in parts for row in part]


class PhoneClassifier:
    """:func:`normalize_phones` for a stream of batches, the phonenumbers slow path running in
    worker processes *while the caller goes on* (e.g. writes the previous batch to the store).

    ``submit(raw)`` does the vectorised part at once and returns a callable that gives the
    DataFrame :func:`normalize_phones` would return. The ``spawn`` pool is started on the first
    batch with at least ``min_parallel`` distinct slow-path strings (small extracts never pay the
    start-up) and lives until :meth:`close`; if it cannot start or breaks, parsing falls back to
    this process, with the same results.
    """

    def __init__(self, default_region: str = "RU", processes: int = 1, min_parallel: int = 2_000,
                 workers: int | None = None):
        self.default_region = default_region
        self.processes = max(1, int(processes or 1))
        self.workers = max(1, int(workers or self.processes))  # pool size (when processes > 1)
        self.min_parallel = min_parallel
        self._pool = None
        self._pool_failed = False

    def _get_pool(self):
        if self._pool_failed:
            return None
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            try:
                self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))
            except (OSError, RuntimeError, ImportError):
                self._pool_failed = True
        return self._pool

    @property
    def warm(self) -> bool:
        """Whether a pool warmed up by the command is there (then even small batches are checked in it)."""
        from smsflow import warm

        return self.processes > 1 and not self._pool_failed and warm.pool() is not None

    def submit(self, raw: pd.Series):
        prep = _prepare(raw, self.default_region)
        keys, region = prep["keys"], self.default_region
        pool = self._get_pool() if self.processes > 1 and len(keys) >= self.min_parallel else None
        if pool is None:
            results = _classify_many(keys, region) if keys else []
            return lambda: _assemble(prep, results)
        size = max(1, -(-len(keys) // (2 * self.workers)))
        try:
            futures = [pool.submit(_classify_many, keys[i : i + size], region) for i in range(0, len(keys), size)]
        except (OSError, RuntimeError):  # the pool broke (BrokenProcessPool is a RuntimeError)
            self._pool_failed = True
            results = _classify_many(keys, region)
            return lambda: _assemble(prep, results)

        def result() -> pd.DataFrame:
            try:
                rows = [row for f in futures for row in f.result()]
            except (OSError, RuntimeError):  # BrokenProcessPool is a RuntimeError
                self._pool_failed = True
                rows = _classify_many(keys, region)
            return _assemble(prep, rows)

        return result

    def call(self, fn, *args, parallel: bool = True):
        """``fn(*args)`` in a worker when ``parallel`` (and workers are allowed), else here and now;
        returns a callable giving the result. ``fn`` must be a module-level function (it is pickled).
        The worker the command warmed up (``smsflow.warm``) takes it when there is one."""
        from smsflow import warm

        pool = (warm.pool() if self.warm else self._get_pool()) if parallel and self.processes > 1 else None
        if pool is not None:
            try:
                future = pool.submit(fn, *args)
            except (OSError, RuntimeError):
                self._pool_failed = True
            else:
                def result():
                    try:
                        return future.result()
                    except (OSError, RuntimeError) as exc:
                        if type(exc).__name__ != "BrokenProcessPool":
                            raise
                        self._pool_failed = True
                        return fn(*args)

                return result
        value = fn(*args)
        return lambda: value

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "PhoneClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
