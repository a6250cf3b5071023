"""Deterministic demo CRM generator.

Builds a realistic, deliberately *messy* CRM contact base (Russian market
first, with an English-speaking minority) plus an orders table, fast enough
to produce a million contacts in a few seconds on one core.

How it stays fast
-----------------
Faker is used only once per seed to build small pools (first/last names per
locale and gender, corporate e-mail domains).  Every per-row value is then
drawn with vectorised NumPy and strings are assembled either by fancy-indexing
the pools or by filling fixed-width byte templates (phones, ids).

How it stays deterministic
--------------------------
Random draws come from ``np.random.default_rng([seed, field, block])`` where
``block`` is a fixed-size slice (:data:`BLOCK_SIZE` rows) of the row index
space.  A row only depends on draws at its own position and on earlier rows of
the same block (duplicates copy an earlier person), so the first ``k`` rows
of ``generate_contacts(n, seed)`` are identical for every ``n >= k``, and a
chunked writer produces exactly the same rows as one big call.

Orders are derived from the contact summary columns with a counter-based hash
keyed by ``(seed, contact id, order number)``, so ``generate_orders`` is a pure
per-contact function: any subset or chunk of contacts yields the same orders.

Data conventions (pandas 3)
---------------------------
* Text columns use the pandas ``str`` dtype.  A *missing* value is NaN
  (``pd.isna`` is True); an empty string ``""`` is a *present but blank*
  value.  ``phone`` and ``first_name`` intentionally contain both.
* All timestamps are naive UTC, ``datetime64[s]``; missing is ``NaT``.
  ``birthday`` is ``datetime64[s]`` at midnight (pandas has no date dtype).
* "Now" is the fixed :data:`REFERENCE_TIME`, never the wall clock.
* In SQLite and CSV, timestamps are ISO-8601 text ``YYYY-MM-DDTHH:MM:SS``
  and birthdays ``YYYY-MM-DD``.  SQLite keeps NULL and ``""`` apart; CSV
  writes both as an empty field.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "BLOCK_SIZE",
    "CONTACT_COLUMNS",
    "FUNNEL_STAGES",
    "ORDER_COLUMNS",
    "ORDER_STATUSES",
    "REFERENCE_TIME",
    "REVENUE_STATUSES",
    "RUSSIAN_TIMEZONES",
    "generate_contacts",
    "generate_orders",
    "write_crm_csv",
    "write_crm_sqlite",
]

# --------------------------------------------------------------------------
# Public constants
# --------------------------------------------------------------------------

#: The generator's "now" (naive UTC).  Nothing is later than this.
REFERENCE_TIME = np.datetime64("2025-07-01T00:00:00", "s")

#: Rows per random block (see module docstring).  Changing it changes data.
BLOCK_SIZE = 1 << 16

CONTACT_COLUMNS = (
    "id",
    "first_name",
    "last_name",
    "phone",
    "email",
    "language",
    "timezone",
    "city",
    "sms_consent",
    "consent_at",
    "updated_at",
    "funnel_stage",
    "last_activity_at",
    "orders_count",
    "total_spent",
    "last_order_at",
    "birthday",
)
ORDER_COLUMNS = ("id", "contact_id", "status", "amount", "created_at")

FUNNEL_STAGES = ("lead", "prospect", "customer", "churned")
ORDER_STATUSES = ("new", "paid", "shipped", "delivered", "cancelled", "returned")
#: Orders whose amount counts towards a contact's ``total_spent``.
REVENUE_STATUSES = ("paid", "shipped", "delivered")

RUSSIAN_TIMEZONES = (
    "Europe/Kaliningrad",
    "Europe/Moscow",
    "Europe/Samara",
    "Asia/Yekaterinburg",
    "Asia/Omsk",
    "Asia/Novosibirsk",
    "Asia/Krasnoyarsk",
    "Asia/Irkutsk",
    "Asia/Yakutsk",
    "Asia/Vladivostok",
    "Asia/Magadan",
    "Asia/Kamchatka",
)

# --------------------------------------------------------------------------
# Static reference tables
# --------------------------------------------------------------------------

_DAY = 86_400
_YEAR = 365 * _DAY
_REF_S = int(REFERENCE_TIME.astype("int64"))
_NAT = np.iinfo(np.int64).min  # int64 view of NaT

# (Russian name, English name, IANA timezone, weight)
_RU_CITIES = (
    ("Москва", "Moscow", "Europe/Moscow", 22.0),
    ("Санкт-Петербург", "Saint Petersburg", "Europe/Moscow", 10.0),
    ("Казань", "Kazan", "Europe/Moscow", 3.0),
    ("Нижний Новгород", "Nizhny Novgorod", "Europe/Moscow", 3.0),
    ("Ростов-на-Дону", "Rostov-on-Don", "Europe/Moscow", 3.0),
    ("Краснодар", "Krasnodar", "Europe/Moscow", 3.0),
    ("Воронеж", "Voronezh", "Europe/Moscow", 2.5),
    ("Ярославль", "Yaroslavl", "Europe/Moscow", 1.5),
    ("Тула", "Tula", "Europe/Moscow", 1.2),
    ("Сочи", "Sochi", "Europe/Moscow", 1.2),
    ("Калининград", "Kaliningrad", "Europe/Kaliningrad", 2.0),
    ("Самара", "Samara", "Europe/Samara", 3.0),
    ("Ижевск", "Izhevsk", "Europe/Samara", 1.5),
    ("Екатеринбург", "Yekaterinburg", "Asia/Yekaterinburg", 4.0),
    ("Челябинск", "Chelyabinsk", "Asia/Yekaterinburg", 3.0),
    ("Уфа", "Ufa", "Asia/Yekaterinburg", 3.0),
    ("Пермь", "Perm", "Asia/Yekaterinburg", 2.5),
    ("Тюмень", "Tyumen", "Asia/Yekaterinburg", 2.0),
    ("Омск", "Omsk", "Asia/Omsk", 3.0),
    ("Новосибирск", "Novosibirsk", "Asia/Novosibirsk", 4.0),
    ("Красноярск", "Krasnoyarsk", "Asia/Krasnoyarsk", 3.0),
    ("Иркутск", "Irkutsk", "Asia/Irkutsk", 2.0),
    ("Улан-Удэ", "Ulan-Ude", "Asia/Irkutsk", 1.0),
    ("Якутск", "Yakutsk", "Asia/Yakutsk", 1.0),
    ("Владивосток", "Vladivostok", "Asia/Vladivostok", 2.0),
    ("Хабаровск", "Khabarovsk", "Asia/Vladivostok", 1.5),
    ("Магадан", "Magadan", "Asia/Magadan", 0.6),
    ("Петропавловск-Камчатский", "Petropavlovsk-Kamchatsky", "Asia/Kamchatka", 0.6),
)
# (city, UK national area code, weight)
_UK_CITIES = (
    ("London", "20", 40.0),
    ("Manchester", "161", 12.0),
    ("Birmingham", "121", 12.0),
    ("Leeds", "113", 8.0),
    ("Glasgow", "141", 8.0),
    ("Edinburgh", "131", 7.0),
    ("Bristol", "117", 7.0),
    ("Liverpool", "151", 6.0),
)
_UK_TZ = "Europe/London"

# Residence segments: 0 = Russian speaker in Russia, 1 = English speaker in
# Russia (expat), 2 = English speaker in the UK.
_RES_RU, _RES_EXPAT, _RES_UK = 0, 1, 2
_P_ENGLISH = 0.20
_P_EXPAT_GIVEN_EN = 0.30

# Phone families (internal codes).  uk_landline is split by area-code length
# only because the templates differ; it is one family to the outside world.
_F_RU_MOBILE, _F_RU_LANDLINE, _F_TOLL_FREE, _F_KZ_MOBILE = 0, 1, 2, 3
_F_UK_MOBILE, _F_UK_LANDLINE2, _F_UK_LANDLINE3, _F_GARBAGE, _F_EMPTY = 4, 5, 6, 7, 8
_VALID_FAMILIES = (
    _F_RU_MOBILE, _F_RU_LANDLINE, _F_TOLL_FREE, _F_KZ_MOBILE,
    _F_UK_MOBILE, _F_UK_LANDLINE2, _F_UK_LANDLINE3,
)

# P(family | residence); UK landline is resolved to 2/3-digit area later.
_FAMILY_P = {
    #              ru_mob ru_land toll  kz    uk_mob uk_land garbage empty
    _RES_RU:      (0.915, 0.025, 0.010, 0.020, 0.000, 0.000, 0.015, 0.015),
    _RES_EXPAT:   (0.850, 0.040, 0.000, 0.010, 0.050, 0.000, 0.025, 0.025),
    _RES_UK:      (0.100, 0.000, 0.000, 0.000, 0.500, 0.260, 0.070, 0.070),
}
_FAMILY_ORDER = (
    _F_RU_MOBILE, _F_RU_LANDLINE, _F_TOLL_FREE, _F_KZ_MOBILE,
    _F_UK_MOBILE, _F_UK_LANDLINE2, _F_GARBAGE, _F_EMPTY,
)

# Phone templates: "N" is replaced, left to right, by the digits of the
# 10-digit national number.  Templates without "N" are literal values.
_PHONE_TEMPLATES = {
    _F_RU_MOBILE: (
        ("+7NNNNNNNNNN", 0.24),
        ("8 (NNN) NNN-NN-NN", 0.18),
        ("8NNNNNNNNNN", 0.12),
        ("+7 (NNN) NNN-NN-NN", 0.12),
        ("+7 NNN NNNNNNN", 0.10),
        ("NNNNNNNNNN", 0.08),
        ("8-NNN-NNN-NN-NN", 0.08),
        ("+7-NNN-NNN-NN-NN", 0.05),
        ("7 NNN NNN NN NN", 0.03),
    ),
    _F_RU_LANDLINE: (
        ("+7 NNN NNN-NN-NN", 0.35),
        ("8 (NNN) NNN-NN-NN", 0.35),
        ("+7 (NNN) NNNNNNN", 0.15),
        ("8NNNNNNNNNN", 0.15),
    ),
    _F_TOLL_FREE: (
        ("8-NNN-NNN-NN-NN", 0.45),
        ("8 (NNN) NNN-NN-NN", 0.30),
        ("+7 NNN NNN NN NN", 0.25),
    ),
    _F_KZ_MOBILE: (
        ("+7 NNN NNN NNNN", 0.45),
        ("+7 (NNN) NNN-NN-NN", 0.25),
        ("8NNNNNNNNNN", 0.15),
        ("+7NNNNNNNNNN", 0.15),
    ),
    _F_UK_MOBILE: (
        ("+44 NNNN NNNNNN", 0.45),
        ("0NNNN NNNNNN", 0.25),
        ("+44NNNNNNNNNN", 0.15),
        ("+44 (0) NNNN NNNNNN", 0.15),
    ),
    _F_UK_LANDLINE2: (
        ("+44 NN NNNN NNNN", 0.45),
        ("0NN NNNN NNNN", 0.35),
        ("+44NNNNNNNNNN", 0.20),
    ),
    _F_UK_LANDLINE3: (
        ("+44 NNN NNN NNNN", 0.45),
        ("0NNN NNN NNNN", 0.35),
        ("+44NNNNNNNNNN", 0.20),
    ),
    _F_GARBAGE: (  # national digits for garbage look like a Russian mobile
        ("abc", 0.12),
        ("12345", 0.06),
        ("NNNNN", 0.10),
        ("+7 NNN NN", 0.15),
        ("8 (NNN) NNN-NN", 0.10),
        ("+7 (NNN)", 0.06),
        ("+7NNNNNNNNNN99", 0.07),
        ("нет", 0.10),
        ("-", 0.07),
        ("n/a", 0.05),
        ("0", 0.05),
        ("уточнить", 0.06),
        ("тел. уточнить у менеджера", 0.05),
    ),
    _F_EMPTY: (("", 0.5), (None, 0.5)),
}


def _flatten_templates():
    fam, text, weight, first = [], [], [], {}
    for f, items in _PHONE_TEMPLATES.items():
        first[f] = len(text)
        for t, w in items:
            fam.append(f)
            text.append(t)
            weight.append(w)
    return np.array(fam), text, np.array(weight), first


_TPL_FAMILY, _TPL_TEXT, _TPL_WEIGHT, _TPL_FIRST = _flatten_templates()
_TPL_COUNT = {f: len(v) for f, v in _PHONE_TEMPLATES.items()}

_RU_MOBILE_HOT = (
    set(range(910, 930)) | set(range(960, 969)) | set(range(980, 990))
    | {903, 905, 906, 909, 950, 951, 952, 953, 977, 999}
)
_RU_MOBILE_CODES = np.arange(900, 1000)
_RU_MOBILE_W = np.array([4.0 if c in _RU_MOBILE_HOT else 1.0 for c in _RU_MOBILE_CODES])
_KZ_CODES = np.array([701, 777, 705, 707, 747, 700, 702, 771, 775, 778])
_KZ_W = np.array([30.0, 30.0, 8.0, 12.0, 8.0, 3.0, 3.0, 2.0, 2.0, 2.0])
_UK_MOBILE_PREFIX = np.array([74, 75, 77, 78, 79])

_EMAIL_DOMAINS_RU = (
    ("mail.ru", 28), ("yandex.ru", 22), ("gmail.com", 18), ("bk.ru", 5),
    ("list.ru", 5), ("inbox.ru", 4), ("rambler.ru", 4), ("ya.ru", 4),
)
_EMAIL_DOMAINS_EN = (
    ("gmail.com", 35), ("outlook.com", 12), ("hotmail.co.uk", 10),
    ("yahoo.co.uk", 8), ("icloud.com", 8), ("btinternet.com", 7),
    ("hotmail.com", 5), ("mail.ru", 5),
)
_P_CORPORATE_EMAIL = 0.10
_CORPORATE_TLDS = {"ru", "com", "net", "org", "biz", "info", "uk"}
_P_EMAIL_MISSING = 0.07
_P_EMAIL_MALFORMED = 0.01

_STAGE_P = (0.40, 0.25, 0.27, 0.08)
_DUP_STAGE_P = (0.60, 0.25, 0.15, 0.0)
_CONSENT_P = np.array([0.70, 0.75, 0.82, 0.72])  # by funnel stage

_P_DUPLICATE = 0.03
_P_FIRST_NAME_MISSING = 0.045
_P_DUP_FIRST_NAME_MISSING = 0.30
_P_LAST_NAME_MISSING = 0.015
_P_CITY_MISSING = 0.03
_P_TZ_MISSING = 0.04
_P_BIRTHDAY_MISSING = 0.12

_TRANSLIT = {
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e",
    "ж": "zh", "з": "z", "и": "i", "й": "y", "к": "k", "л": "l", "м": "m",
    "н": "n", "о": "o", "п": "p", "р": "r", "с": "s", "т": "t", "у": "u",
    "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh", "щ": "shch",
    "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya",
}

# Stable ids of the random streams.  Append only: reordering changes data.
_FIELDS = (
    "residence", "gender", "first_name", "last_name", "city_ru", "city_uk",
    "city_missing", "tz_missing", "family", "family_uk_split", "template",
    "national_a", "national_b", "dup", "dup_src", "dup_template",
    "dup_first_missing", "dup_email", "dup_created", "first_missing",
    "first_blank", "last_missing", "email_pattern", "email_domain",
    "email_corporate", "email_missing", "email_malformed", "email_digits",
    "created", "stage", "orders_base", "orders_whale", "orders_whale_n",
    "avg_order", "spent_factor", "last_order", "consent", "consent_at",
    "activity", "activity_missing", "updated_delta", "birthday",
    "birthday_missing", "expat_city_en", "updated_late", "manual_edit",
)
_FIELD_ID = {name: i for i, name in enumerate(_FIELDS)}


# --------------------------------------------------------------------------
# Pools (Faker is used here and only here)
# --------------------------------------------------------------------------


def _translit(name: str) -> str:
    out = "".join(_TRANSLIT.get(ch, ch) for ch in name.lower())
    return "".join(ch for ch in out if ch.isascii() and (ch.isalnum() or ch in "-"))


def _latin(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isascii() and ch.isalnum())


class _Pools:
    """Name/e-mail pools; built once per seed."""

    def __init__(self, seed: int) -> None:
        from faker import Faker
        from faker.providers.person.en_GB import Provider as EnPerson
        from faker.providers.person.ru_RU import Provider as RuPerson

        # Person pools: the locale providers' full name lists.  Order is
        # irrelevant because indices are drawn uniformly.
        first = [
            list(RuPerson.first_names_male),
            list(RuPerson.first_names_female),
            list(EnPerson.first_names_male),
            list(EnPerson.first_names_female),
        ]
        last = [
            list(RuPerson.last_names_male),
            list(RuPerson.last_names_female),
            list(EnPerson.last_names),
            list(EnPerson.last_names),
        ]
        # group index = 2 * is_english + is_female
        self.first, self.first_lat, self.first_off, self.first_size = self._stack(first, ru_groups=(0, 1))
        self.last, self.last_lat, self.last_off, self.last_size = self._stack(last, ru_groups=(0, 1))

        # Corporate domains from a seeded Faker: the only seed-dependent pool.
        fake = Faker(["ru_RU", "en_GB"])
        fake.seed_instance(seed)
        corp: list[str] = []
        for loc in ("ru_RU", "en_GB"):
            gen = fake[loc]
            for _ in range(120):
                d = gen.domain_name().lower()
                if d.isascii() and d.rsplit(".", 1)[-1] in _CORPORATE_TLDS and d not in corp:
                    corp.append(d)
        self.corporate = np.array(corp, dtype=object)

        ru_d, ru_w = zip(*_EMAIL_DOMAINS_RU)
        en_d, en_w = zip(*_EMAIL_DOMAINS_EN)
        self.domains = np.array(list(ru_d) + list(en_d), dtype=object)
        self.domain_off = np.array([0, len(ru_d)])
        self.domain_cdf = (
            np.cumsum(ru_w) / sum(ru_w),
            np.cumsum(en_w) / sum(en_w),
        )

    @staticmethod
    def _stack(groups, ru_groups):
        names, lat, off, size = [], [], [], []
        for g, items in enumerate(groups):
            off.append(len(names))
            size.append(len(items))
            names.extend(items)
            conv = _translit if g in ru_groups else _latin
            lat.extend(conv(x) or "client" for x in items)
        return (
            np.array(names, dtype=object),
            np.array(lat, dtype=object),
            np.array(off, dtype=np.int64),
            np.array(size, dtype=np.int64),
        )


@functools.lru_cache(maxsize=8)
def _pools(seed: int) -> _Pools:
    return _Pools(seed)


# --------------------------------------------------------------------------
# Random draws
# --------------------------------------------------------------------------


class _Draws:
    """Per-(seed, field, block) random streams for rows ``[start, stop)``.

    ``start`` must be block aligned.  Whole blocks are always drawn and then
    truncated, which is what makes row ``i`` independent of ``n``.
    """

    def __init__(self, seed: int, start: int, stop: int) -> None:
        assert start % BLOCK_SIZE == 0
        self.seed = seed
        self.size = stop - start
        self.blocks = range(start // BLOCK_SIZE, max(start // BLOCK_SIZE, math.ceil(stop / BLOCK_SIZE)))

    def _cat(self, field: str, fn) -> np.ndarray:
        fid = _FIELD_ID[field]
        parts = [fn(np.random.default_rng([self.seed, fid, b])) for b in self.blocks]
        if not parts:
            return fn(np.random.default_rng([self.seed, fid, 0]))[:0]
        return np.concatenate(parts)[: self.size]

    def u(self, field: str) -> np.ndarray:
        return self._cat(field, lambda r: r.random(BLOCK_SIZE))

    def exp(self, field: str) -> np.ndarray:
        return self._cat(field, lambda r: r.standard_exponential(BLOCK_SIZE))

    def normal(self, field: str) -> np.ndarray:
        return self._cat(field, lambda r: r.standard_normal(BLOCK_SIZE))

    def poisson(self, field: str, lam: float) -> np.ndarray:
        return self._cat(field, lambda r: r.poisson(lam, BLOCK_SIZE))

    def integers(self, field: str, high: int) -> np.ndarray:
        return self._cat(field, lambda r: r.integers(0, high, BLOCK_SIZE, dtype=np.int64))

    def choice(self, field: str, p) -> np.ndarray:
        """Index into ``p`` (weights need not be normalised)."""
        cdf = np.cumsum(np.asarray(p, dtype=float))
        cdf /= cdf[-1]
        return np.minimum(np.searchsorted(cdf, self.u(field), side="right"), len(cdf) - 1)


def _pick(u: np.ndarray, weights) -> np.ndarray:
    cdf = np.cumsum(np.asarray(weights, dtype=float))
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


# --------------------------------------------------------------------------
# String helpers
# --------------------------------------------------------------------------

def _digits(num: np.ndarray, width: int) -> np.ndarray:
    """(m, width) uint8 matrix of the last ``width`` decimal digits of ``num``."""
    out = np.empty((len(num), width), dtype=np.uint8)
    x = np.asarray(num, dtype=np.int64)
    for i in range(width - 1, -1, -1):
        x, r = np.divmod(x, 10)  # scalar divisor: numpy uses libdivide
        out[:, i] = r
    return out


def _fill(template: str, digits: np.ndarray) -> np.ndarray:
    """Render ``template`` with "N" slots filled from ``digits`` rows.

    Writes UCS-4 code points straight into a ``U<w>`` buffer (casting from
    bytes is several times slower).
    """
    codes = np.array([ord(ch) for ch in template], dtype=np.uint32)
    m, w = digits.shape[0], len(template)
    buf = np.empty((m, w), dtype=np.uint32)
    buf[:] = codes
    pos = np.flatnonzero(codes == ord("N"))
    if len(pos):
        buf[:, pos] = digits[:, : len(pos)] + np.uint32(ord("0"))
    return buf.reshape(-1).view(f"<U{w}") if w else np.full(m, "", dtype="<U1")


def _render_phones(template_idx: np.ndarray, national: np.ndarray) -> np.ndarray:
    out = np.empty(len(template_idx), dtype=object)
    order = np.argsort(template_idx, kind="stable")
    sorted_t = template_idx[order]
    bounds = np.flatnonzero(np.diff(sorted_t)) + 1
    for rows in np.split(order, bounds):
        if len(rows) == 0:
            continue
        text = _TPL_TEXT[template_idx[rows[0]]]
        if text is None or "N" not in text:
            out[rows] = text
        else:
            out[rows] = _fill(text, _digits(national[rows], 10))
    return out


def _make_ids(prefix: str, numbers: np.ndarray, width: int = 7) -> np.ndarray:
    """``prefix`` + zero-padded number, widening beyond ``width`` if needed."""
    out = np.empty(len(numbers), dtype=object)
    if len(numbers) == 0:
        return out
    ndig = np.maximum(width, np.floor(np.log10(np.maximum(numbers, 1))).astype(np.int64) + 1)
    for w in np.unique(ndig):
        rows = np.flatnonzero(ndig == w)
        out[rows] = _fill(prefix + "N" * int(w), _digits(numbers[rows], int(w)))
    return out


def _iso(values: np.ndarray, unit: str = "s") -> np.ndarray:
    """datetime64 array -> object array of ISO-8601 strings (None for NaT).

    ``unit="s"`` gives ``YYYY-MM-DDTHH:MM:SS``, ``unit="D"`` ``YYYY-MM-DD``.
    Years must be 0..9999.  About 5x faster than ``np.datetime_as_string``.
    """
    values = np.asarray(values)
    nat = np.isnat(values)
    secs = values.astype("datetime64[s]").astype(np.int64)
    secs[nat] = 0
    days, sod = np.divmod(secs, _DAY)
    # civil_from_days (H. Hinnant), vectorised
    z = days + 719_468
    era = np.floor_divide(z, 146_097)
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    if unit == "D":
        parts = (year, month, day)
        template = "NNNN-NN-NN"
        widths = (4, 2, 2)
    elif unit == "s":
        hour, rem = np.divmod(sod, 3600)
        minute, second = np.divmod(rem, 60)
        parts = (year, month, day, hour, minute, second)
        template = "NNNN-NN-NNTNN:NN:NN"
        widths = (4, 2, 2, 2, 2, 2)
    else:
        raise ValueError(f"unsupported unit {unit!r}")
    digits = np.concatenate([_digits(p, w) for p, w in zip(parts, widths)], axis=1)
    out = _fill(template, digits).astype(object)
    out[nat] = None
    return out


def _to_dt(seconds: np.ndarray) -> np.ndarray:
    return seconds.astype(np.int64).view("datetime64[s]")


# --------------------------------------------------------------------------
# Contacts
# --------------------------------------------------------------------------


def _contacts_range(seed: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of the contact base for ``seed`` as raw arrays.

    Text columns are object arrays (None = missing), timestamps int64 epoch
    seconds (``_NAT`` = missing).
    """
    b_start = (start // BLOCK_SIZE) * BLOCK_SIZE
    d = _Draws(seed, b_start, stop)
    m = stop - b_start
    pools = _pools(seed)
    gidx = np.arange(b_start, stop, dtype=np.int64)  # global row index
    local = gidx % BLOCK_SIZE

    # --- who and where -----------------------------------------------------
    u_res = d.u("residence")
    english = u_res < _P_ENGLISH
    residence = np.where(
        english,
        np.where(u_res < _P_ENGLISH * _P_EXPAT_GIVEN_EN, _RES_EXPAT, _RES_UK),
        _RES_RU,
    )
    female = d.u("gender") < 0.52
    name_group = 2 * english.astype(np.int64) + female
    first_i = pools.first_off[name_group] + d.integers("first_name", 1 << 30) % pools.first_size[name_group]
    last_i = pools.last_off[name_group] + d.integers("last_name", 1 << 30) % pools.last_size[name_group]

    ru_city = d.choice("city_ru", [c[3] for c in _RU_CITIES])
    uk_city = d.choice("city_uk", [c[2] for c in _UK_CITIES])
    # expats mostly in the two capitals
    u_expat = d.u("expat_city_en")
    expat_city = np.where(u_expat < 0.6, 0, np.where(u_expat < 0.85, 1, ru_city))
    ru_city = np.where(residence == _RES_EXPAT, expat_city, ru_city)
    in_uk = residence == _RES_UK

    # --- phones ------------------------------------------------------------
    fam_p = np.array([_FAMILY_P[r] for r in (_RES_RU, _RES_EXPAT, _RES_UK)])
    fam_cdf = np.cumsum(fam_p, axis=1)
    fam_cdf /= fam_cdf[:, -1:]
    u_fam = d.u("family")
    fam_slot = (u_fam[:, None] >= fam_cdf[residence]).sum(axis=1)
    family = np.asarray(_FAMILY_ORDER)[np.minimum(fam_slot, len(_FAMILY_ORDER) - 1)]
    # UK landline: area code of the UK city (London's 2-digit code otherwise).
    uk_area = [c[1] for c in _UK_CITIES]
    three_digit_area = np.array([len(a) == 3 for a in uk_area])[uk_city] & in_uk
    family = np.where((family == _F_UK_LANDLINE2) & three_digit_area, _F_UK_LANDLINE3, family)

    na = d.integers("national_a", 10_000_000)  # 7 subscriber digits
    nb = d.u("national_b")
    national = np.zeros(m, dtype=np.int64)
    f = family == _F_RU_MOBILE
    national[f] = _RU_MOBILE_CODES[_pick(nb[f], _RU_MOBILE_W)] * 10_000_000 + na[f]
    f = family == _F_GARBAGE
    national[f] = _RU_MOBILE_CODES[_pick(nb[f], _RU_MOBILE_W)] * 10_000_000 + na[f]
    f = family == _F_RU_LANDLINE
    national[f] = np.where(nb[f] < 0.6, 495, 499) * 10_000_000 + 2_000_000 + na[f] % 8_000_000
    f = family == _F_TOLL_FREE
    national[f] = 800 * 10_000_000 + na[f]
    f = family == _F_KZ_MOBILE
    national[f] = _KZ_CODES[_pick(nb[f], _KZ_W)] * 10_000_000 + na[f]
    f = family == _F_UK_MOBILE
    national[f] = _UK_MOBILE_PREFIX[(nb[f] * len(_UK_MOBILE_PREFIX)).astype(np.int64)] * 100_000_000 + (
        na[f] * 10 + (nb[f] * 1e6).astype(np.int64) % 10
    )
    f = family == _F_UK_LANDLINE2  # 20 + [378] + 7 digits
    national[f] = 2_000_000_000 + np.array([3, 7, 8])[(nb[f] * 3).astype(np.int64)] * 10_000_000 + na[f]
    f = family == _F_UK_LANDLINE3  # 1xx + [2-9] + 6 digits
    area_num = np.array([int(a) for a in uk_area], dtype=np.int64)
    national[f] = area_num[uk_city[f]] * 10_000_000 + 2_000_000 + na[f] % 8_000_000

    u_tpl = d.u("template")
    template = np.zeros(m, dtype=np.int64)
    for fam_code, items in _PHONE_TEMPLATES.items():
        f = family == fam_code
        template[f] = _TPL_FIRST[fam_code] + _pick(u_tpl[f], [w for _, w in items])

    # --- duplicates: the same person entered again -------------------------
    valid = np.isin(family, _VALID_FAMILIES)
    is_dup = (d.u("dup") < _P_DUPLICATE) & (local > 0)
    cand = np.flatnonzero(valid & ~is_dup) + b_start  # global, sorted
    block_lo = gidx - local
    lo = np.searchsorted(cand, block_lo)
    hi = np.searchsorted(cand, gidx)
    n_cand = hi - lo
    is_dup &= n_cand > 0
    dup = np.flatnonzero(is_dup)
    src = cand[lo[dup] + (d.u("dup_src")[dup] * n_cand[dup]).astype(np.int64)] - b_start
    for arr in (english, residence, female, first_i, last_i, ru_city, uk_city, in_uk, family, national):
        arr[dup] = arr[src]
    # a different way of writing the same number
    k = np.array([_TPL_COUNT[f] for f in family[dup]], dtype=np.int64)
    first_tpl = np.array([_TPL_FIRST[f] for f in family[dup]], dtype=np.int64)
    shift = 1 + (d.u("dup_template")[dup] * (k - 1)).astype(np.int64)
    template[dup] = first_tpl + (template[src] - first_tpl + shift) % k

    phone = _render_phones(template, national)

    # --- names -------------------------------------------------------------
    first_name = pools.first[first_i]
    u_fm = d.u("first_missing")
    first_missing = u_fm < _P_FIRST_NAME_MISSING
    first_missing[dup] = d.u("dup_first_missing")[dup] < _P_DUP_FIRST_NAME_MISSING
    blank = d.u("first_blank") < 0.2
    first_name[first_missing & blank] = ""
    first_name[first_missing & ~blank] = None
    last_name = pools.last[last_i]
    last_name[d.u("last_missing") < _P_LAST_NAME_MISSING] = None

    # --- city / timezone ---------------------------------------------------
    ru_names = np.array([c[0] for c in _RU_CITIES], dtype=object)
    en_names = np.array([c[1] for c in _RU_CITIES], dtype=object)
    ru_tz = np.array([c[2] for c in _RU_CITIES], dtype=object)
    uk_names = np.array([c[0] for c in _UK_CITIES], dtype=object)
    city = np.where(in_uk, uk_names[uk_city], np.where(english, en_names[ru_city], ru_names[ru_city]))
    timezone = np.where(in_uk, _UK_TZ, ru_tz[ru_city])
    city[d.u("city_missing") < _P_CITY_MISSING] = None
    timezone[d.u("tz_missing") < _P_TZ_MISSING] = None

    # --- birthday (needed for e-mails) -------------------------------------
    age_days = ((18 + 57 * d.u("birthday") ** 1.4) * 365.25).astype(np.int64)
    bday_days = _REF_S // _DAY - age_days
    bday_days[dup] = bday_days[src]
    birth_year = 1970 + np.floor((bday_days + 0.5) / 365.2425).astype(np.int64)
    bday_s = bday_days * _DAY
    bday_s[d.u("birthday_missing") < _P_BIRTHDAY_MISSING] = _NAT

    # --- e-mail ------------------------------------------------------------
    fl = pools.first_lat[first_i]
    ll = pools.last_lat[last_i]
    pattern = d.choice("email_pattern", (28, 12, 10, 8, 12, 8, 8, 6, 8))
    digits2 = d.integers("email_digits", 1000)
    local_part = np.empty(m, dtype=object)

    def put(code, fn):
        rows = np.flatnonzero(pattern == code)
        if len(rows):
            local_part[rows] = fn(rows)

    two = np.array([f"{i:02d}" for i in range(100)], dtype=object)
    three = np.array([str(i) for i in range(1000)], dtype=object)
    years = np.array([str(y) for y in range(1900, 2100)], dtype=object)
    initials = np.array([s[:1] for s in pools.first_lat], dtype=object)
    put(0, lambda r: fl[r] + "." + ll[r])
    put(1, lambda r: initials[first_i[r]] + "." + ll[r])
    put(2, lambda r: fl[r] + ll[r])
    put(3, lambda r: fl[r] + "_" + ll[r])
    put(4, lambda r: fl[r] + two[birth_year[r] % 100])
    put(5, lambda r: ll[r] + years[np.clip(birth_year[r], 1900, 2099) - 1900])
    put(6, lambda r: fl[r] + "." + ll[r] + two[digits2[r] % 100])
    put(7, lambda r: ll[r] + "." + fl[r])
    put(8, lambda r: ll[r] + three[digits2[r]])

    u_dom = d.u("email_domain")
    dom_i = np.where(
        english,
        _pick_cdf(u_dom, pools.domain_cdf[1]) + pools.domain_off[1],
        _pick_cdf(u_dom, pools.domain_cdf[0]),
    )
    domain = pools.domains[dom_i]
    corp = d.u("email_corporate") < _P_CORPORATE_EMAIL
    domain[corp] = pools.corporate[(u_dom[corp] * len(pools.corporate)).astype(np.int64)]
    email = local_part + "@" + domain
    u_bad = d.u("email_malformed")
    bad = np.flatnonzero(u_bad < _P_EMAIL_MALFORMED)
    if len(bad):
        kind = (u_bad[bad] / _P_EMAIL_MALFORMED * 4).astype(np.int64)
        sep = np.array(["@@", " at ", "", "@"], dtype=object)[kind]
        tail = np.where(kind == 3, domain[bad] + ".", domain[bad])
        email[bad] = local_part[bad] + sep + tail
    email[d.u("email_missing") < _P_EMAIL_MISSING] = None
    if len(dup):
        keep = d.u("dup_email")[dup] < 0.6
        email[dup[keep]] = email[src[keep]]
        email[dup[~keep]] = None

    # --- lifecycle timestamps ----------------------------------------------
    # steadily growing base: sign-up age density falls linearly over 6 years
    created = _REF_S - 3600 - (6 * _YEAR * (1 - np.sqrt(d.u("created")))).astype(np.int64)
    stage = d.choice("stage", _STAGE_P)
    if len(dup):
        stage[dup] = _pick(d.u("stage")[dup], _DUP_STAGE_P)
        room = np.maximum(_REF_S - 7200 - created[src], 0)
        created[dup] = created[src] + 1 + (room * d.u("dup_created")[dup]).astype(np.int64)
    churned = stage == 3
    min_age = 200 * _DAY
    created[churned] = np.minimum(created[churned], _REF_S - min_age - (d.u("created")[churned] * 4 * _YEAR).astype(np.int64))

    # orders summary
    orders = np.zeros(m, dtype=np.int64)
    base = d.poisson("orders_base", 1.8)
    whale = d.u("orders_whale") < 0.03
    whale_n = d.poisson("orders_whale_n", 12.0)
    customer = stage == 2
    orders[customer] = 1 + base[customer] + np.where(whale[customer], whale_n[customer], 0)
    orders[churned] = 1 + base[churned] // 2
    prospect_order = (stage == 1) & (d.u("orders_whale") > 0.85)
    orders[prospect_order] = 1

    avg_kop = np.exp(np.log(320_000) + 0.7 * d.normal("avg_order"))  # ~3 200 RUB
    factor = 0.7 + 0.3 * d.u("spent_factor")
    spent_kop = np.where(customer | churned, np.maximum(orders * 10_000, orders * avg_kop * factor), 0).astype(np.int64)
    total_spent = spent_kop / 100.0

    u_lo = d.u("last_order")
    last_order = np.full(m, _NAT, dtype=np.int64)
    span = _REF_S - 60 - created
    last_order[customer] = _REF_S - 60 - (span[customer] * (1 - np.sqrt(u_lo[customer]))).astype(np.int64)
    last_order[churned] = created[churned] + ((_REF_S - 180 * _DAY - created[churned]) * u_lo[churned]).astype(np.int64)
    last_order[prospect_order] = created[prospect_order] + (span[prospect_order] * u_lo[prospect_order]).astype(np.int64)

    consent = d.u("consent") < _CONSENT_P[stage]
    consent_at = np.where(consent, created + ((_REF_S - created) * d.u("consent_at") ** 3).astype(np.int64), _NAT)

    activity = created + ((_REF_S - created) * d.u("activity")).astype(np.int64)
    has_order = orders > 0
    activity[has_order] = np.maximum(activity[has_order], last_order[has_order])
    never_active = (stage == 0) & (d.u("activity_missing") < 0.3)
    activity[never_active] = _NAT

    # The record changes on sign-up, consent, orders and occasional manual
    # edits (web activity alone does not touch it), then settles a few days
    # later; a delay that would pass "now" lands anywhere in the remaining
    # window instead (no pile-up of identical timestamps at "now").
    u_edit = d.u("manual_edit")
    edit = np.where(u_edit < 0.4, created + ((_REF_S - created) * u_edit / 0.4).astype(np.int64), 0)
    latest = np.maximum.reduce(
        [created, np.where(consent, consent_at, 0), np.where(has_order, last_order, 0), edit]
    )
    room = np.maximum(_REF_S - 1 - latest, 0)
    delta = (3 * _DAY * d.exp("updated_delta")).astype(np.int64)
    late = delta > room
    delta[late] = (room[late] * d.u("updated_late")[late]).astype(np.int64)
    updated = latest + delta
    if len(dup):  # a re-entered person always has its own modification time
        same = updated[dup] == updated[src]
        updated[dup[same]] -= 1

    # --- assemble ------------------------------------------------------------
    keep = slice(start - b_start, m)
    return {
        "id": _make_ids("C", gidx[keep] + 1),
        "first_name": first_name[keep],
        "last_name": last_name[keep],
        "phone": phone[keep],
        "email": email[keep],
        "language": np.where(english[keep], "en", "ru").astype(object),
        "timezone": timezone[keep],
        "city": city[keep],
        "sms_consent": consent[keep],
        "consent_at": consent_at[keep],
        "updated_at": updated[keep],
        "funnel_stage": np.asarray(FUNNEL_STAGES, dtype=object)[stage[keep]],
        "last_activity_at": activity[keep],
        "orders_count": orders[keep],
        "total_spent": total_spent[keep],
        "last_order_at": last_order[keep],
        "birthday": bday_s[keep],
    }


_TEXT_COLUMNS = (
    "id", "first_name", "last_name", "phone", "email", "language",
    "timezone", "city", "funnel_stage",
)
_DATETIME_COLUMNS = ("consent_at", "updated_at", "last_activity_at", "last_order_at")
_DATE_COLUMNS = ("birthday",)


def _contacts_frame(cols: dict, start: int) -> pd.DataFrame:
    data = {}
    for name in CONTACT_COLUMNS:
        v = cols[name]
        if name in _TEXT_COLUMNS:
            data[name] = pd.array(v, dtype="str")
        elif name in _DATETIME_COLUMNS or name in _DATE_COLUMNS:
            data[name] = _to_dt(v)
        else:
            data[name] = v
    return pd.DataFrame(data, index=pd.RangeIndex(start, start + len(cols["id"])))


def _pick_cdf(u: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


_FRAME_CHUNK = 4 * BLOCK_SIZE


def _check_args(n: int, seed: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def generate_contacts(n: int, seed: int = 42) -> pd.DataFrame:
    """Generate ``n`` demo CRM contacts, deterministically for ``seed``.

    Columns are :data:`CONTACT_COLUMNS`.  The frame has a ``RangeIndex``
    ``0..n-1`` and contact ids ``C0000001``, ``C0000002``, ...  The first ``k``
    rows do not depend on ``n``.

    Data quality is intentionally realistic: ~80 % of phones are valid
    Russian mobiles written in many formats, the rest are landlines, toll-free,
    Kazakh and UK numbers, garbage, blanks and missing values; ~3 % of rows
    re-enter an earlier person under a new id with the same number written
    differently; ~5 % lack a first name.
    """
    _check_args(n, seed)
    n, seed = int(n), int(seed)
    step = _chunk_rows(_FRAME_CHUNK)
    if n <= step:
        return _contacts_frame(_contacts_range(seed, 0, n), 0)
    # build in chunks to keep the Python-object temporaries small
    parts = [_contacts_frame(_contacts_range(seed, lo, min(n, lo + step)), lo) for lo in range(0, n, step)]
    return pd.concat(parts, copy=False)


# --------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_K_ORDER = np.uint64(0xD1B54A32D192ED03)
_K_STREAM = np.uint64(0x8CB92BA72F3D8DD7)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _hash_uniform(key: np.ndarray, j: np.ndarray, stream: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = key ^ ((j.astype(np.uint64) + np.uint64(1)) * _K_ORDER + np.uint64(stream) * _K_STREAM)
    return (_mix64(x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generate_orders(contacts: pd.DataFrame, seed: int = 42) -> pd.DataFrame:
    """Generate the orders behind ``contacts``' order summary columns.

    For every contact the result holds exactly ``orders_count`` orders; the
    most recent one is created at ``last_order_at`` and the amounts of orders
    in :data:`REVENUE_STATUSES` sum to ``total_spent`` (to the kopeck).  Other
    statuses (``new``, ``cancelled``, ``returned``) do not count.

    Randomness is a hash of ``(seed, contact id, order number)``, so the
    orders of a contact do not depend on which other contacts are passed.
    Order ids are ``<contact id>-NN`` numbered oldest first; rows are sorted
    by contact (input order) and ``created_at``.
    """
    _check_args(0, seed)
    missing = {"id", "orders_count", "total_spent", "last_order_at"} - set(contacts.columns)
    if missing:
        raise ValueError(f"contacts frame lacks columns: {sorted(missing)}")

    ids_s = contacts["id"]
    if ids_s.isna().any():
        raise ValueError("contacts with a missing id cannot have orders")
    ids = ids_s.astype(str).to_numpy(dtype=object)
    k = contacts["orders_count"].fillna(0).to_numpy(dtype=np.int64)
    total_kop = np.rint(contacts["total_spent"].fillna(0).to_numpy(dtype=np.float64) * 100).astype(np.int64)
    last_col = pd.to_datetime(contacts["last_order_at"])
    if last_col.dt.tz is not None:
        last_col = last_col.dt.tz_convert("UTC").dt.tz_localize(None)
    last = last_col.to_numpy().astype("datetime64[s]")
    if (k < 0).any():
        raise ValueError("orders_count must be non-negative")
    if (np.isnat(last) & (k > 0)).any():
        raise ValueError("contacts with orders_count > 0 need last_order_at")
    if ((total_kop > 0) & (k == 0)).any():
        raise ValueError("contacts with total_spent > 0 need orders_count > 0")
    last_s = np.where(np.isnat(last), 0, last.astype(np.int64))

    cols = _orders_arrays(ids, k, total_kop, last_s, int(seed))
    return pd.DataFrame(
        {
            "id": pd.array(cols["id"], dtype="str"),
            "contact_id": pd.array(cols["contact_id"], dtype="str"),
            "status": pd.array(cols["status"], dtype="str"),
            "amount": cols["amount"],
            "created_at": _to_dt(cols["created_at"]),
        }
    )


def _orders_arrays(ids: np.ndarray, k: np.ndarray, total_kop: np.ndarray, last_s: np.ndarray, seed: int) -> dict:
    """Core of :func:`generate_orders` on raw arrays (ids: object array)."""
    m = len(ids)
    key = _mix64(pd.util.hash_array(ids) ^ _mix64(np.full(m, seed, dtype=np.uint64)))
    total = int(k.sum())
    c = np.repeat(np.arange(m), k)
    starts = np.cumsum(k) - k
    j = np.arange(total, dtype=np.int64) - starts[c]  # 0 = most recent

    kc = k[c]
    has_rev = total_kop[c] > 0
    jstar = (_hash_uniform(key, np.zeros(m, dtype=np.int64), 99) * np.maximum(k, 1)).astype(np.int64)
    kk = key[c]
    u1 = _hash_uniform(kk, j, 1)
    u2 = _hash_uniform(kk, j, 2)
    u3 = _hash_uniform(kk, j, 3)
    u4 = _hash_uniform(kk, j, 4)
    u5 = _hash_uniform(kk, j, 5)
    is_star = j == jstar[c]
    counting = has_rev & ((u1 < 0.88) | is_star)

    # timing: newest order at last_order_at, older ones spaced ~45 days apart
    gap = np.where(j == 0, 0, 3600 + (-np.log1p(-u2) * 45 * _DAY).astype(np.int64))
    cs = np.cumsum(gap)
    created = last_s[c] - (cs - cs[starts[c]]) if total else np.zeros(0, dtype=np.int64)
    age = np.maximum(_REF_S - created, 0)

    status = np.empty(total, dtype=np.int64)
    st_paid, st_shipped, st_delivered = 1, 2, 3
    st_new, st_cancelled, st_returned = 0, 4, 5
    status[:] = np.where(
        counting,
        np.where(age < 2 * _DAY, st_paid, np.where(age < 10 * _DAY, np.where(u3 < 0.7, st_shipped, st_paid), st_delivered)),
        np.where(age < 3 * _DAY, np.where(u3 < 0.6, st_new, st_cancelled), np.where(u3 < 0.65, st_cancelled, st_returned)),
    )

    # amounts (kopecks): split total_spent over counting orders exactly
    w = np.where(counting, 0.5 - np.log1p(-u4), 0.0)
    wsum = np.bincount(c, weights=w, minlength=m)
    share = np.zeros(total, dtype=np.int64)
    nz = counting & (wsum[c] > 0)
    share[nz] = np.floor(total_kop[c][nz] * (w[nz] / wsum[c][nz])).astype(np.int64)
    rest = total_kop - np.rint(np.bincount(c, weights=share, minlength=m)).astype(np.int64)
    star_rows = starts + jstar
    fix = (k > 0) & (total_kop > 0)
    share[star_rows[fix]] += rest[fix]
    normal = np.sqrt(-2.0 * np.log1p(-u5)) * np.cos(2 * np.pi * u4)
    other = (np.rint(np.exp(np.log(2500.0) + 0.7 * normal)) * 100).astype(np.int64)
    amount_kop = np.where(counting, share, other)

    # chronological order within each contact: position = start + (k-1-j)
    pos = starts[c] + (kc - 1 - j)
    seq = kc - j  # 1 = oldest
    out_c = np.empty(total, dtype=np.int64)
    out_c[pos] = c
    out_seq = np.empty(total, dtype=np.int64)
    out_seq[pos] = seq
    out_status = np.empty(total, dtype=np.int64)
    out_status[pos] = status
    out_amount = np.empty(total, dtype=np.int64)
    out_amount[pos] = amount_kop
    out_created = np.empty(total, dtype=np.int64)
    out_created[pos] = created

    maxk = int(k.max()) if m else 0
    suffix = np.array([f"-{s:02d}" for s in range(maxk + 1)], dtype=object)
    order_ids = ids[out_c] + suffix[out_seq] if total else np.empty(0, dtype=object)
    return {
        "id": order_ids,
        "contact_id": ids[out_c],
        "status": np.asarray(ORDER_STATUSES, dtype=object)[out_status],
        "amount": out_amount / 100.0,
        "created_at": out_created,
    }


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------

_CONTACTS_DDL = """
CREATE TABLE contacts (
    id TEXT PRIMARY KEY,
    first_name TEXT,
    last_name TEXT,
    phone TEXT,
    email TEXT,
    language TEXT,
    timezone TEXT,
    city TEXT,
    sms_consent INTEGER NOT NULL,
    consent_at TEXT,
    updated_at TEXT NOT NULL,
    funnel_stage TEXT,
    last_activity_at TEXT,
    orders_count INTEGER NOT NULL,
    total_spent REAL NOT NULL,
    last_order_at TEXT,
    birthday TEXT
)"""
_ORDERS_DDL = """
CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    contact_id TEXT NOT NULL REFERENCES contacts(id),
    status TEXT NOT NULL,
    amount REAL NOT NULL,
    created_at TEXT NOT NULL
)"""


def _export_columns(cols: dict) -> list[list]:
    """Raw contact arrays -> per-column Python lists for sqlite3/CSV."""
    out = []
    for name in CONTACT_COLUMNS:
        v = cols[name]
        if name in _DATETIME_COLUMNS:
            out.append(_iso(_to_dt(v), "s").tolist())
        elif name in _DATE_COLUMNS:
            out.append(_iso(_to_dt(v), "D").tolist())
        elif name == "sms_consent":
            out.append(v.astype(np.int64).tolist())
        else:
            out.append(v.tolist())
    return out


def _chunk_rows(chunk: int) -> int:
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk!r}")
    # whole blocks per chunk so no block is generated twice
    return max(BLOCK_SIZE, (chunk // BLOCK_SIZE) * BLOCK_SIZE)


def _remove_db(path: Path) -> None:
    for p in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def write_crm_sqlite(path: str | os.PathLike, n: int, seed: int = 42, chunk: int = 200_000) -> Path:
    """Write a demo CRM with ``n`` contacts (and their orders) to SQLite.

    The file is replaced if it exists.  Tables ``contacts`` and ``orders``
    hold exactly ``generate_contacts(n, seed)`` and
    ``generate_orders(contacts, seed)``; timestamps are ISO-8601 text
    (``YYYY-MM-DDTHH:MM:SS``, naive UTC), birthdays ``YYYY-MM-DD``,
    ``sms_consent`` is 0/1 and missing values are NULL.  Rows are generated
    and inserted ``chunk`` at a time (rounded to whole :data:`BLOCK_SIZE`
    blocks) to bound memory.  Indexes: ``contacts(updated_at)``,
    ``orders(contact_id)``.
    """
    _check_args(n, seed)
    step = _chunk_rows(chunk)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute(_CONTACTS_DDL)
        conn.execute(_ORDERS_DDL)
        c_sql = f"INSERT INTO contacts VALUES ({','.join('?' * len(CONTACT_COLUMNS))})"
        o_sql = f"INSERT INTO orders VALUES ({','.join('?' * len(ORDER_COLUMNS))})"
        conn.execute("BEGIN")
        for lo in range(0, int(n), step):
            cols = _contacts_range(int(seed), lo, min(int(n), lo + step))
            conn.executemany(c_sql, zip(*_export_columns(cols)))
            orders = _orders_arrays(
                cols["id"],
                cols["orders_count"],
                np.rint(cols["total_spent"] * 100).astype(np.int64),
                np.where(cols["last_order_at"] == _NAT, 0, cols["last_order_at"]),
                int(seed),
            )
            del cols
            conn.executemany(
                o_sql,
                zip(
                    orders["id"].tolist(),
                    orders["contact_id"].tolist(),
                    orders["status"].tolist(),
                    orders["amount"].tolist(),
                    _iso(_to_dt(orders["created_at"]), "s").tolist(),
                ),
            )
            del orders
        conn.execute("CREATE INDEX ix_contacts_updated_at ON contacts(updated_at)")
        conn.execute("CREATE INDEX ix_orders_contact_id ON orders(contact_id)")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return path


def write_crm_csv(path: str | os.PathLike, n: int, seed: int = 42) -> Path:
    """Write ``generate_contacts(n, seed)`` as UTF-8 CSV (header, comma, LF).

    Readable with ``pd.read_csv``.  Timestamps are ISO-8601
    ``YYYY-MM-DDTHH:MM:SS`` (naive UTC), birthdays ``YYYY-MM-DD``,
    ``sms_consent`` is ``True``/``False``; missing values and empty strings
    are both empty fields.  Generated in whole blocks to bound memory.
    """
    _check_args(n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = _chunk_rows(200_000)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(CONTACT_COLUMNS)
        for lo in range(0, int(n), step):
            cols = _contacts_range(int(seed), lo, min(int(n), lo + step))
            out = _export_columns(cols)
            out[CONTACT_COLUMNS.index("sms_consent")] = cols["sms_consent"].tolist()
            writer.writerows(zip(*out))
    return path
