"""Contact policy, enforced when a message is claimed for sending (and previewed by dry runs).

- Send windows in the recipient's local time: the CRM's time zone, else the number's when
  phonenumbers gives exactly one zone, else the campaign's default. Marketing by default
  10:00-21:00 every day except Russian public holidays; transactional any time except
  22:00-08:00. Weekends/holidays a window excludes are lifted for contacts who agreed
  (attribute ``sms_on_holidays``). Outside its window a message is deferred to the next
  allowed moment, never dropped; past the campaign's end it expires with a reason.
- Frequency caps per contact per day / week / month (rolling), global or per message type,
  counted over what was actually submitted; transactional exempt by configuration.
- Consent: marketing only to consented, not-opted-out contacts; transactional by its own rule.
Pure functions: the clock is always a parameter.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator, model_validator
from smsflow.privacy import mask_phone, phone_hash
from store.db import executemany, fetch_tuples, is_postgres, read_frame
from smsflow.values import truthy

UTC = timezone.utc
PERIOD_DAYS = {"day": 1, "week": 7, "month": 30}


class SendWindow(BaseModel):
    """Allowed local hours [start, end) on the listed weekdays (0 = Monday)."""

    start: time = time(10, 0)
    end: time = time(21, 0)
    days: list[int] = Field(default_factory=lambda: list(range(7)))
    skip_holidays: bool = True

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[int]) -> list[int]:
        if not v or any(d < 0 or d > 6 for d in v):
            raise ValueError("days must be a non-empty list of weekdays 0 (Monday) .. 6 (Sunday)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _order(self) -> "SendWindow":
        if self.start >= self.end:
            raise ValueError(f"window start {self.start} must be before end {self.end} (no night sends)")
        return self


class FrequencyCap(BaseModel):
    period: Literal["day", "week", "month"]
    limit: int = Field(ge=1)
    message_type: Literal["marketing", "transactional"] | None = None  # None: all messages

    @property
    def rule(self) -> str:
        return f"cap_{self.period}" + (f"_{self.message_type}" if self.message_type else "")


class ContactPolicy(BaseModel):
    marketing_window: SendWindow = Field(default_factory=SendWindow)
    transactional_window: SendWindow = Field(
        default_factory=lambda: SendWindow(start=time(8, 0), end=time(22, 0), skip_holidays=False)
    )
    caps: list[FrequencyCap] = Field(default_factory=list)
    transactional_exempt_from_caps: bool = True
    transactional_requires_consent: bool = False
    transactional_respects_opt_out: bool = True
    default_timezone: str = "Europe/Moscow"
    holiday_country: str = "RU"
    holiday_optin_attribute: str = "sms_on_holidays"

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        zone(v)
        return v

    def window_for(self, kind: str) -> SendWindow:
        return self.transactional_window if kind == "transactional" else self.marketing_window


def always_open() -> ContactPolicy:
    """No windows and no caps (consent and opt-out still apply): for tests of sending mechanics
    and for operators who explicitly take responsibility for timing."""
    w = SendWindow(start=time(0, 0), end=time(23, 59, 59, 999999), skip_holidays=False)
    return ContactPolicy(marketing_window=w, transactional_window=w)


# ----------------------------------------------------------------------------- time zones


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def valid_zone(name: str | None) -> bool:
    if not name or not isinstance(name, str):
        return False
    try:
        zone(name.strip())
        return True
    except ValueError:
        return False


@lru_cache(maxsize=200_000)
def zone_from_number(e164: str | None) -> str | None:
    """The number's zone when phonenumbers gives exactly one (landlines, small countries)."""
    if not e164:
        return None
    import phonenumbers
    from phonenumbers import timezone as pn_tz

    try:
        zones = pn_tz.time_zones_for_number(phonenumbers.parse(e164, None))
    except phonenumbers.NumberParseException:
        return None
    zones = [z for z in zones if z != "Etc/Unknown"]
    return zones[0] if len(zones) == 1 else None


@lru_cache(maxsize=1)
def _fast_path_mobile_zone() -> tuple[bool, str | None]:
    """(usable, zone) for every number on ``smsflow.phones``' fast path (mobiles of its one country code).
    phonenumbers gives a mobile number the zones of its country code unless that country's mobiles are
    geographical, so all of them get the answer of any one of them; not usable otherwise."""
    import phonenumbers
    from phonenumbers import PhoneNumberType

    from smsflow.phones import FAST_PATH_COUNTRY_CODE, fast_path_mobiles

    cc = FAST_PATH_COUNTRY_CODE
    if cc is None or phonenumbers.is_number_type_geographical(PhoneNumberType.MOBILE, cc):
        return False, None
    sample = f"+{cc}9161234567"
    if not fast_path_mobiles([sample])[0]:
        return False, None
    return True, zone_from_number.__wrapped__(sample)


def zones_from_numbers(numbers: Sequence[str | None]) -> list[str | None]:
    """``zone_from_number`` of each number, the same answers: the mobiles of ``smsflow.phones``' fast
    path (RU) are recognised at once (vectorised, no phonenumbers call: all share one answer), the
    rest go to ``zone_from_number``."""
    usable, mobile_zone = _fast_path_mobile_zone()
    if not usable or len(numbers) < 2:
        return [zone_from_number(e164) for e164 in numbers]
    from smsflow.phones import fast_path_mobiles

    return [mobile_zone if fast else zone_from_number(e164) for e164, fast in zip(numbers, fast_path_mobiles(numbers))]


def by_number_zone(numbers: Sequence[str | None], crm_zones: Sequence[str | None]) -> list[str | None | Literal[False]]:
    """For ``decide(number_zone=...)``: each number's zone where the CRM's zone is not valid (found
    at once by ``zones_from_numbers``), False (not needed) where it is."""
    need = [i for i, z in enumerate(crm_zones) if not valid_zone(z)]
    out: list[str | None | Literal[False]] = [False] * len(numbers)
    for i, z in zip(need, zones_from_numbers([numbers[i] for i in need])):
        out[i] = z
    return out


def resolve_timezone(crm_tz: str | None, e164: str | None, default: str, *,
                     number_zone: str | None | Literal[False] = False) -> tuple[str, str]:
    """(zone, where it came from: crm | number | default). ``number_zone``: the number's zone when the
    caller already knows it (``zones_from_numbers``), else it is looked up here."""
    if valid_zone(crm_tz):
        return crm_tz.strip(), "crm"
    z = zone_from_number(e164) if number_zone is False else number_zone
    if z and valid_zone(z):
        return z, "number"
    return default, "default"


# ----------------------------------------------------------------------------- windows


@lru_cache(maxsize=64)
def _holidays(country: str, year: int) -> frozenset[date]:
    import holidays

    return frozenset(holidays.country_holidays(country, years=year).keys())


def is_holiday(d: date, country: str) -> bool:
    return d in _holidays(country, d.year)


def _local_to_utc(d: date, t: time, tz: ZoneInfo) -> datetime:
    """The first real instant at or after local wall time d+t (a DST gap moves it forward)."""
    naive = datetime.combine(d, t)
    utc = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) == naive:
        return utc
    # spring-forward gap: search between the two readings of the missing wall time
    lo = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    hi = utc if utc > lo else naive.replace(tzinfo=tz, fold=0).astimezone(UTC) + timedelta(hours=3)
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).replace(tzinfo=None) >= naive:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0) + (timedelta(seconds=1) if hi.microsecond else timedelta(0))


def _day_rule(d: date, window: SendWindow, country: str, agreed: bool) -> str:
    """'' if the day is allowed, else why not ('weekend' for an excluded weekday, 'holiday')."""
    if agreed:
        return ""
    if d.weekday() not in window.days:
        return "weekend" if d.weekday() >= 5 else "day_off"
    if window.skip_holidays and is_holiday(d, country):
        return "holiday"
    return ""


def allowed_now(now: datetime, tz_name: str, window: SendWindow, country: str, agreed: bool = False) -> bool:
    local = now.astimezone(zone(tz_name))
    if _day_rule(local.date(), window, country, agreed):
        return False
    return window.start <= local.time().replace(tzinfo=None) < window.end


def next_allowed(now: datetime, tz_name: str, window: SendWindow, country: str = "RU",
                 agreed: bool = False) -> tuple[datetime, str]:
    """(the first allowed UTC instant >= now, the rule that deferred it or '' when now is allowed)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    tz = zone(tz_name)
    local = now.astimezone(tz)
    first_rule = ""
    for offset in range(0, 800):
        d = local.date() + timedelta(days=offset)
        rule = _day_rule(d, window, country, agreed)
        if rule:
            first_rule = first_rule or rule
            continue
        start = _local_to_utc(d, window.start, tz)
        end = _local_to_utc(d, window.end, tz)
        if offset == 0 and start <= now < end:
            return now, ""
        if start > now:
            return start, first_rule or "quiet_hours"
        # today's window already over (or now is inside a gap): look at the next day
        first_rule = first_rule or "quiet_hours"
    raise ValueError(f"no allowed send moment within 800 days for window {window} in {tz_name}")


# ----------------------------------------------------------------------------- caps


def cap_defer(now: datetime, history: Sequence[tuple[datetime, str]], kind: str, policy: ContactPolicy
              ) -> tuple[datetime | None, str]:
    """When a capped contact may get its next message of ``kind`` (None: not capped now).

    ``history``: (submitted_at UTC, kind) of what was actually submitted to this contact."""
    if kind == "transactional" and policy.transactional_exempt_from_caps:
        return None, ""
    until: datetime | None = None
    rule = ""
    for cap in policy.caps:
        if cap.message_type and cap.message_type != kind:
            continue
        span = timedelta(days=PERIOD_DAYS[cap.period])
        times = sorted(t for t, k in history if (cap.message_type is None or k == cap.message_type) and now - span < t <= now)
        if len(times) >= cap.limit:
            free = times[len(times) - cap.limit] + span
            if until is None or free > until:
                until, rule = free, cap.rule
    return until, rule


# ----------------------------------------------------------------------------- one decision


class Decision(BaseModel):
    action: Literal["send", "defer", "hold", "expire"]
    send_at: datetime | None = None  # UTC
    rule: str = ""
    timezone: str = ""


def days_matter(window: SendWindow) -> bool:
    """Whether the window excludes any day (a weekday or a holiday): only then does a contact's
    agreement to messages on days off change anything."""
    return window.skip_holidays or len(window.days) < 7


def decide(
    *,
    now: datetime,
    kind: str,
    policy: ContactPolicy,
    consent: bool,
    opted_out: bool,
    suppressed: bool = False,
    crm_tz: str | None = None,
    e164: str | None = None,
    agreed_days_off: bool = False,
    history: Iterable[tuple[datetime, str]] = (),
    ends_at: datetime | None = None,
    number_zone: str | None | Literal[False] = False,
    moments: dict | None = None,
) -> Decision:
    """Send now, defer to a later moment, hold back (never for this campaign), or expire.

    For many decisions at the same ``now`` (a claimed batch, a preview): ``number_zone`` is the
    number's zone found beforehand (``zones_from_numbers``), and ``moments`` a dict the caller keeps
    for that ``now`` only, where each (zone, window, agreement) send moment is computed once."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    tz_name, _ = resolve_timezone(crm_tz, e164, policy.default_timezone, number_zone=number_zone)
    if suppressed:
        return Decision(action="hold", rule="suppressed", timezone=tz_name)
    if kind == "marketing" or policy.transactional_respects_opt_out:
        if opted_out:
            return Decision(action="hold", rule="opted_out", timezone=tz_name)
    if (kind == "marketing" or policy.transactional_requires_consent) and not consent:
        return Decision(action="hold", rule="no_consent", timezone=tz_name)
    window = policy.window_for(kind)
    if moments is None:
        at, rule = next_allowed(now, tz_name, window, policy.holiday_country, agreed_days_off)
    else:
        key = (tz_name, id(window), policy.holiday_country, agreed_days_off)
        found = moments.get(key)
        if found is None:  # the window is kept in the value, so its id is not reused while ``moments`` lives
            found = moments[key] = (window, *next_allowed(now, tz_name, window, policy.holiday_country, agreed_days_off))
        at, rule = found[1], found[2]
    cap_until, cap_rule = cap_defer(at, list(history), kind, policy) if policy.caps else (None, "")
    if cap_until is not None:
        # a capped contact is held back for this message (the cap protects them from the campaign)
        return Decision(action="hold", rule=cap_rule, timezone=tz_name)
    if ends_at is not None:
        end = ends_at if ends_at.tzinfo else ends_at.replace(tzinfo=UTC)
        if at > end:
            return Decision(action="expire", rule="campaign_ended", timezone=tz_name)
    if at > now:
        return Decision(action="defer", send_at=at, rule=rule, timezone=tz_name)
    return Decision(action="send", send_at=now, rule="", timezone=tz_name)


# ----------------------------------------------------------------------------- store side: at claim time


def agreed_to_days_off(attributes, policy: ContactPolicy) -> bool:
    """The contact's CRM attribute that lifts weekend/holiday rules (same truthy words as the CRM import)."""
    import json


    if isinstance(attributes, str):
        attributes = json.loads(attributes) if attributes else {}
    value = (attributes or {}).get(policy.holiday_optin_attribute)
    return truthy(value)


def load_policy(raw) -> ContactPolicy:
    import json

    if raw is None or raw == "":
        return ContactPolicy()
    if isinstance(raw, str):
        raw = json.loads(raw)
    return ContactPolicy() if raw is None else ContactPolicy.model_validate(raw)  # JSON 'null' too


def enforce_at_claim(conn, campaign_id: int, claimed, now: datetime) -> tuple[list[int], dict[str, int]]:
    """Decide every claimed message against the policy as it is NOW (consent, opt-out, erasure,
    window in the contact's local time, caps over what was actually submitted, campaign end).
    ``claimed``: the claimed messages' columns (``tasks.send.Claimed`` or a DataFrame): id, contact_id,
    phone_e164 and, for A/B tests, variant.
    Held-back messages end 'rejected' (POLICY_<RULE>), expired ones 'expired' (CAMPAIGN_ENDED),
    deferred ones go back to 'planned' with ``send_after``. Returns (ids to send, counts by rule)."""

    from sqlalchemy import text


    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    naive_now = now.astimezone(UTC).replace(tzinfo=None)
    camp = conn.execute(text("SELECT kind, policy, ends_at FROM campaigns WHERE id = :c"), {"c": campaign_id}).one()
    kind, policy, ends_at = camp[0], load_policy(camp[1]), camp[2]
    by_variant = variant_policies(conn, campaign_id, policy) if "variant" in claimed else {}
    if isinstance(ends_at, str):
        ends_at = datetime.fromisoformat(ends_at)
    ids = [int(i) for i in claimed["id"]]
    cids = [int(c) if c is not None and c == c else None for c in claimed["contact_id"]]  # (NaN: a frame's None)
    contact_ids = sorted({c for c in cids if c is not None})
    contacts: dict[int, tuple] = {}
    history: dict[int, list[tuple[datetime, str]]] = {}
    # the CRM attributes (JSON) matter only for the agreement to messages on days off
    days = any(days_matter(p.window_for(kind)) for p in (policy, *by_variant.values()))
    columns = "sms_consent, opted_out_at, timezone, " + ("attributes" if days else "NULL")
    # PostgreSQL: the ids as one array, joined (an index lookup each: lists of 900 literals, and even
    # ``= ANY(array)``, were planned as sequential scans of every contact testing each row against the whole
    # list, 60 ms per 1,000 ids at 20,000 contacts); SQLite: IN lists of at most 900 (its parameter limit)
    if is_postgres(conn):
        parts = [("IN (SELECT unnest(CAST(:ids AS bigint[])))", {"ids": contact_ids})] if contact_ids else []
    else:
        parts = [(f"IN ({','.join(map(str, contact_ids[i : i + 900]))})", {}) for i in range(0, len(contact_ids), 900)]
    for where, params in parts:
        # plain DBAPI tuples (SQLAlchemy Rows cost ~6 us a message here, in the thread that competes with the send)
        rows = fetch_tuples(conn, f"SELECT id, {columns} FROM contacts WHERE id {where}", params)
        contacts.update((row[0], row[1:]) for row in rows)
        if policy.caps:
            since = naive_now - timedelta(days=max(PERIOD_DAYS[c.period] for c in policy.caps))
            for cid, sub_at, k in conn.execute(text(
                    "SELECT o.contact_id, o.submitted_at, k.kind FROM outbox o JOIN campaigns k ON k.id = o.campaign_id "
                    f"WHERE o.contact_id {where} AND o.submitted_at IS NOT NULL AND o.submitted_at > :since"),
                    {"since": since, **params}):
                t = datetime.fromisoformat(sub_at) if isinstance(sub_at, str) else sub_at
                history.setdefault(int(cid), []).append((t.replace(tzinfo=UTC), k))
    phones = [p for p in claimed["phone_e164"] if p]
    suppressed = set()
    if phones and conn.execute(text("SELECT 1 FROM suppression_list LIMIT 1")).first() is not None:
        hashes = {phone_hash(p): p for p in phones}
        keys = list(hashes)
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            marks = ",".join(f":h{j}" for j in range(len(chunk)))
            rows = conn.execute(text(f"SELECT phone_hash FROM suppression_list WHERE phone_hash IN ({marks})"),
                                {f"h{j}": h for j, h in enumerate(chunk)})
            suppressed.update(hashes[r[0]] for r in rows)
    send: list[int] = []
    counts: dict[str, int] = {}
    held, expired, deferred = [], [], []
    variants = list(claimed["variant"]) if "variant" in claimed else [None] * len(ids)
    found = [contacts.get(c) if c is not None else None for c in cids]
    phones_all = list(claimed["phone_e164"])
    number_zones = by_number_zone(phones_all, [c[2] if c is not None else None for c in found])
    moments: dict = {}  # send moments at this ``now``, computed once per (zone, window, agreement)
    # without caps a decision depends only on these inputs (``number_zone`` stands for the number: it is
    # False only where the CRM zone is valid, and then the number is not looked at): decided once each
    decided: dict[tuple, Decision] | None = None if policy.caps else {}
    days_default = days_matter(policy.window_for(kind))
    days_by_variant = {v: days_matter(p.window_for(kind)) for v, p in by_variant.items()}
    for oid, cid, c, phone, variant, number_zone in zip(ids, cids, found, phones_all, variants, number_zones):
        pol = by_variant.get(variant, policy)
        if c is None and kind == "marketing":
            d = Decision(action="hold", rule="no_contact")
        else:
            consent, opted_out_at, crm_tz, attrs = c if c is not None else (False, None, None, None)
            agreed = agreed_to_days_off(attrs, pol) if days_by_variant.get(variant, days_default) else False
            key = (variant, bool(consent), opted_out_at is not None, phone in suppressed, crm_tz, number_zone, agreed)
            d = decided.get(key) if decided is not None else None
            if d is None:
                d = decide(now=now, kind=kind, policy=pol, consent=bool(consent), opted_out=opted_out_at is not None,
                           suppressed=phone in suppressed, crm_tz=crm_tz, e164=phone, agreed_days_off=agreed,
                           history=history.get(cid, ()) if c is not None else (), ends_at=ends_at,
                           number_zone=number_zone, moments=moments)
                if decided is not None:
                    decided[key] = d
        if d.action == "send":
            send.append(oid)
            if c is not None and policy.caps:  # (A/B arms differ only in their windows)
                history.setdefault(cid, []).append((now, kind))  # a second message in this batch counts it
            continue
        counts[d.rule] = counts.get(d.rule, 0) + 1
        if d.action == "hold":
            held.append(("rejected", f"POLICY_{d.rule.upper()}", d.rule, f"held back by contact policy: {d.rule}",
                         naive_now, naive_now, oid))
        elif d.action == "expire":
            expired.append(("expired", "CAMPAIGN_ENDED", d.rule, "the campaign ended before an allowed send moment",
                            naive_now, naive_now, oid))
        else:
            deferred.append(("planned", d.send_at.astimezone(UTC).replace(tzinfo=None), d.rule, naive_now, oid))
    guard = " WHERE id = ? AND state = 'queued'"
    executemany(conn, "UPDATE outbox SET state = ?, error_code = ?, hold_rule = ?, last_error = ?, final_at = ?, "
                      "claimed_by = NULL, updated_at = ?" + guard, held + expired)
    executemany(conn, "UPDATE outbox SET state = ?, send_after = ?, hold_rule = ?, claimed_by = NULL, "
                      "attempts = attempts - 1, updated_at = ?" + guard, deferred)
    return send, counts


def variant_policies(conn, campaign_id: int, policy: ContactPolicy) -> dict[str, ContactPolicy]:
    """The policy of each A/B arm with its own send window (a send-time test); others use the campaign's."""
    import json

    from sqlalchemy import text

    spec = conn.execute(text("SELECT spec FROM ab_tests WHERE campaign_id = :c"), {"c": campaign_id}).scalar()
    if spec is None:
        return {}
    spec = spec if isinstance(spec, dict) else json.loads(spec)
    out = {}
    for v in spec.get("variants", ()):
        if v.get("window"):
            start, end = (time.fromisoformat(x) for x in v["window"].split("-"))
            w = policy.marketing_window.model_copy(update={"start": start, "end": end})
            out[v["name"]] = policy.model_copy(update={"marketing_window": w, "transactional_window": w})
    return out


# ----------------------------------------------------------------------------- preview (dry runs)

PLAN_COLUMNS = ("contact_id", "phone", "timezone", "send_at_local", "send_at_utc", "rule", "text", "parts", "cost",
                "currency")


def preview_plan(engine, campaign_id: int, now: datetime) -> list[dict]:
    """One row per planned message (when it would go out under the policy at ``now``, its text,
    parts and cost) and one per contact held back (no consent, opted out, capped, erased), with
    empty times and the rule. Phones are masked."""

    from sqlalchemy import text


    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    with engine.begin() as conn:
        camp = conn.execute(text("SELECT kind, policy, ends_at, source, segment, currency FROM campaigns WHERE id = :c"),
                            {"c": campaign_id}).one()
        kind, policy, ends_at, source, segment = camp[0], load_policy(camp[1]), camp[2], camp[3], camp[4]
        currency = camp[5]
        if isinstance(ends_at, str):
            ends_at = datetime.fromisoformat(ends_at)
        df = read_frame(
            conn,
            "SELECT c.id, c.crm_id, c.phone_e164, c.timezone, c.sms_consent, c.opted_out_at, c.attributes, "
            "o.id AS oid, o.state, o.text, o.segments, o.cost "
            "FROM segment_memberships m JOIN contacts c ON c.id = m.contact_id "
            "LEFT JOIN outbox o ON o.campaign_id = :cid AND o.contact_id = c.id "
            "WHERE m.segment = :g AND c.source = :s AND c.status = 'valid' ORDER BY c.id",
            {"cid": campaign_id, "g": segment, "s": source},
        )
        history: dict[int, list[tuple[datetime, str]]] = {}
        if policy.caps and len(df):
            since = now.astimezone(UTC).replace(tzinfo=None) - timedelta(days=max(PERIOD_DAYS[c.period] for c in policy.caps))
            hist = read_frame(conn, "SELECT o.contact_id, o.submitted_at, k.kind FROM outbox o JOIN campaigns k "
                                    "ON k.id = o.campaign_id WHERE o.submitted_at > :since AND o.contact_id IS NOT NULL",
                              {"since": since}, parse_dates=["submitted_at"])
            for cid, t, k in zip(hist["contact_id"], hist["submitted_at"], hist["kind"]):
                history.setdefault(int(cid), []).append((t.to_pydatetime().replace(tzinfo=UTC), k))
        suppressed = {r[0] for r in conn.execute(text("SELECT phone_hash FROM suppression_list"))}
    rows = []
    number_zones = by_number_zone(df["phone_e164"].tolist(), df["timezone"].tolist())
    moments: dict = {}
    days = days_matter(policy.window_for(kind))
    for r, number_zone in zip(df.itertuples(index=False), number_zones):
        agreed = agreed_to_days_off(r.attributes, policy) if days else False
        opted_out = r.opted_out_at is not None and r.opted_out_at == r.opted_out_at
        d = decide(now=now, kind=kind, policy=policy, consent=bool(r.sms_consent), opted_out=opted_out,
                   suppressed=bool(suppressed) and phone_hash(r.phone_e164) in suppressed, crm_tz=r.timezone,
                   e164=r.phone_e164, agreed_days_off=agreed, history=history.get(int(r.id), ()), ends_at=ends_at,
                   number_zone=number_zone, moments=moments)
        if r.oid is None or r.oid != r.oid:  # not planned: only policy reasons can explain it here
            if d.action in ("send", "defer"):
                d = Decision(action="hold", rule="render_error", timezone=d.timezone)
        elif r.state not in ("planned", "queued"):
            continue  # already sent or final: not part of the plan
        planned = r.oid is not None and r.oid == r.oid
        message = {"text": r.text, "parts": int(r.segments), "cost": round(float(r.cost or 0), 4),
                   "currency": currency} if planned else {"text": "", "parts": "", "cost": "", "currency": ""}
        if d.action in ("send", "defer"):
            local = d.send_at.astimezone(zone(d.timezone))
            rows.append({"contact_id": r.crm_id, "phone": mask_phone(r.phone_e164), "timezone": d.timezone,
                         "send_at_local": local.isoformat(timespec="seconds"),
                         "send_at_utc": d.send_at.astimezone(UTC).isoformat(timespec="seconds"), "rule": d.rule,
                         **message})
        else:
            rows.append({"contact_id": r.crm_id, "phone": mask_phone(r.phone_e164), "timezone": d.timezone,
                         "send_at_local": "", "send_at_utc": "", "rule": d.rule, **message})
    return rows


def write_plan_csv(rows: list[dict], path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PLAN_COLUMNS)
        w.writeheader()
        w.writerows(rows)
