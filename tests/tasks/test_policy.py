"""Contact policy: property-based proof over random contacts, zones, clocks, consent and caps."""
from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.policy import (
    ContactPolicy,
    FrequencyCap,
    SendWindow,
    allowed_now,
    cap_defer,
    decide,
    is_holiday,
    next_allowed,
    resolve_timezone,
)

UTC = timezone.utc
ZONES = ["Europe/Kaliningrad", "Europe/Moscow", "Europe/Samara", "Asia/Yekaterinburg", "Asia/Novosibirsk",
         "Asia/Vladivostok", "Asia/Kamchatka", "Europe/London", "America/New_York", "Australia/Lord_Howe",
         "Pacific/Auckland", "Pacific/Chatham", "Pacific/Kiritimati", "America/Havana", "Asia/Kathmandu", "Pacific/Apia"]

clocks = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31)).map(lambda d: d.replace(tzinfo=UTC))
windows = st.builds(
    lambda s, length, days, hol: SendWindow(start=time(s // 60, s % 60), end=time(min(23, (s + length) // 60), (s + length) % 60 if (s + length) // 60 < 24 else 59),
                                            days=days, skip_holidays=hol),
    st.integers(0, 20 * 60), st.integers(30, 12 * 60),
    st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True), st.booleans(),
).filter(lambda w: w.start < w.end)
caps = st.lists(st.builds(FrequencyCap, period=st.sampled_from(["day", "week", "month"]), limit=st.integers(1, 4),
                          message_type=st.sampled_from([None, "marketing", "transactional"])), max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(now=clocks, tz=st.sampled_from(ZONES), window=windows, agreed=st.booleans())
def test_next_allowed_is_inside_the_window_in_local_time(now, tz, window, agreed):
    at, rule = next_allowed(now, tz, window, "RU", agreed)
    assert at >= now
    assert allowed_now(at, tz, window, "RU", agreed), (at, at.astimezone(__import__("zoneinfo").ZoneInfo(tz)))
    if at == now:
        assert rule == ""
    else:
        assert rule in ("quiet_hours", "weekend", "day_off", "holiday")
        # nothing earlier was allowed: check a few instants in between
        step = (at - now) / 7
        for k in range(1, 7):
            assert not allowed_now(now + step * k, tz, window, "RU", agreed) or step * k < timedelta(minutes=1)


@settings(max_examples=300, deadline=None)
@given(
    now=clocks,
    kind=st.sampled_from(["marketing", "transactional"]),
    consent=st.booleans(),
    opted_out=st.booleans(),
    tz=st.one_of(st.none(), st.sampled_from(ZONES), st.just("Not/AZone")),
    caps_=caps,
    tx_consent=st.booleans(),
    history=st.lists(st.tuples(st.integers(0, 40 * 24 * 60), st.sampled_from(["marketing", "transactional"])), max_size=8),
)
def test_decide_never_breaks_a_rule(now, kind, consent, opted_out, tz, caps_, tx_consent, history):
    policy = ContactPolicy(caps=caps_, transactional_requires_consent=tx_consent)
    hist = [(now - timedelta(minutes=m), k) for m, k in history]
    d = decide(now=now, kind=kind, policy=policy, consent=consent, opted_out=opted_out, crm_tz=tz,
               e164="+79161234567", history=hist)
    if d.action in ("send", "defer"):
        assert not opted_out
        if kind == "marketing" or tx_consent:
            assert consent
        window = policy.window_for(kind)
        assert allowed_now(d.send_at, d.timezone, window, "RU")
        # 0 cap violations at the moment it will be sent
        assert cap_defer(d.send_at, hist, kind, policy)[0] is None
    if d.action == "send":
        assert d.send_at == now


def test_simulated_sender_respects_caps_and_windows():
    """Many campaigns hitting the same contacts over a month of 15-minute ticks."""
    import random

    rnd = random.Random(5)
    policy = ContactPolicy(caps=[FrequencyCap(period="day", limit=1), FrequencyCap(period="week", limit=3),
                                 FrequencyCap(period="month", limit=2, message_type="transactional")],
                           transactional_exempt_from_caps=False)
    contacts = [{"tz": rnd.choice(ZONES), "hist": []} for _ in range(40)]
    start = datetime(2026, 3, 20, tzinfo=UTC)  # spans the March DST changes
    sent = 0
    for tick in range(30 * 24 * 4):
        now = start + timedelta(minutes=15 * tick)
        for c in rnd.sample(contacts, 5):
            kind = rnd.choice(["marketing", "marketing", "transactional"])
            d = decide(now=now, kind=kind, policy=policy, consent=True, opted_out=False, crm_tz=c["tz"], history=c["hist"])
            if d.action == "send":
                assert allowed_now(now, c["tz"], policy.window_for(kind), "RU")
                c["hist"].append((now, kind))
                sent += 1
    assert sent > 100
    for c in contacts:
        times = sorted(t for t, _ in c["hist"])
        for i, t in enumerate(times):
            assert sum(1 for u in times if t - timedelta(days=1) < u <= t) <= 1
            assert sum(1 for u in times if t - timedelta(days=7) < u <= t) <= 3
        tx = sorted(t for t, k in c["hist"] if k == "transactional")
        for t in tx:
            assert sum(1 for u in tx if t - timedelta(days=30) < u <= t) <= 2


def test_defaults_marketing_and_transactional():
    p = ContactPolicy()
    night = datetime(2026, 11, 24, 20, 30, tzinfo=UTC)  # 23:30 Moscow
    d = decide(now=night, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz="Europe/Moscow")
    assert d.action == "defer" and d.rule == "quiet_hours" and d.send_at == datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    t = decide(now=night, kind="transactional", policy=p, consent=False, opted_out=False, crm_tz="Europe/Moscow")
    assert t.action == "defer" and t.send_at == datetime(2026, 11, 25, 5, 0, tzinfo=UTC)  # 08:00 Moscow
    day = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert decide(now=day, kind="transactional", policy=p, consent=False, opted_out=False, crm_tz="Europe/Moscow").action == "send"
    assert decide(now=day, kind="marketing", policy=p, consent=False, opted_out=False).rule == "no_consent"
    assert decide(now=day, kind="marketing", policy=p, consent=True, opted_out=True).rule == "opted_out"


def test_russian_public_holiday_moves_marketing_unless_agreed():
    assert is_holiday(datetime(2026, 11, 4).date(), "RU")
    p = ContactPolicy()
    unity_day = datetime(2026, 11, 4, 9, 0, tzinfo=UTC)  # 12:00 in Moscow on Unity Day
    d = decide(now=unity_day, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz="Europe/Moscow")
    assert d.action == "defer" and d.rule == "holiday" and d.send_at.astimezone(UTC).date().isoformat() == "2026-11-05"
    agreed = decide(now=unity_day, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz="Europe/Moscow",
                    agreed_days_off=True)
    assert agreed.action == "send"


def test_b2b_working_days_window():
    b2b = SendWindow(start=time(10), end=time(18), days=[0, 1, 2, 3, 4])
    saturday = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    at, rule = next_allowed(saturday, "Europe/Moscow", b2b)
    assert rule == "weekend" and at == datetime(2026, 11, 30, 7, 0, tzinfo=UTC)


def test_campaign_end_expires_instead_of_deferring():
    p = ContactPolicy()
    night = datetime(2026, 11, 24, 20, 30, tzinfo=UTC)
    d = decide(now=night, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz="Europe/Moscow",
               ends_at=datetime(2026, 11, 24, 23, 59, tzinfo=UTC))
    assert d.action == "expire" and d.rule == "campaign_ended"


def test_timezone_resolution():
    assert resolve_timezone("Asia/Omsk", "+79161234567", "Europe/Moscow") == ("Asia/Omsk", "crm")
    assert resolve_timezone("", "+74232123456", "Europe/Moscow") == ("Asia/Vladivostok", "number")  # Vladivostok landline
    assert resolve_timezone(None, "+79161234567", "Europe/Moscow") == ("Europe/Moscow", "default")  # mobile: many zones
    assert resolve_timezone("Mars/Olympus", None, "Asia/Kamchatka") == ("Asia/Kamchatka", "default")


def test_bad_windows_are_refused():
    with pytest.raises(ValueError):
        SendWindow(start=time(22), end=time(8))
    with pytest.raises(ValueError):
        ContactPolicy(default_timezone="Nowhere/Land")


NUMBERS = ["+79161234567", "+79031112233", "+79991234567", "+74951234567", "+74232123456", "+73432123456",
           "+77012345678", "+77172123456", "+4915112345678", "+493012345678", "+12025550123", "+442071234567",
           "+37255512345", "+8613812345678", "+5511912345678", "+79161234567", "", None, "garbage", "+7916",
           "+7916123456789", "79161234567", "+78001234567", "+79001234567"]


def test_zones_for_many_numbers_are_those_of_each_number_alone():
    """The batch lookup (RU mobiles recognised at once, without phonenumbers) gives every number the
    answer zone_from_number gives it alone: landlines with one zone, mobiles of many-zone and of
    one-zone countries, Kazakhstan inside +7, invalid and missing numbers."""
    from tasks.policy import zone_from_number, zones_from_numbers

    expected = [zone_from_number.__wrapped__(n) for n in NUMBERS]
    assert zones_from_numbers(NUMBERS) == expected
    assert "Asia/Vladivostok" in expected and "Europe/Berlin" in expected  # the cases are not all None


def test_ru_mobiles_in_a_batch_skip_phonenumbers():
    from tasks.policy import zone_from_number, zones_from_numbers

    mobiles = [f"+7916{i:07d}" for i in range(500)]
    zone_from_number.cache_clear()
    zones = zones_from_numbers(mobiles)
    assert zones == [zone_from_number.__wrapped__(mobiles[0])] * 500
    assert zone_from_number.cache_info().currsize == 0  # none of them went through phonenumbers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(now=clocks, window=windows, cases=st.lists(st.tuples(st.sampled_from(ZONES + [None, "Mars/Olympus"]),
                                                            st.sampled_from(NUMBERS), st.booleans()),
                                                  min_size=1, max_size=12))
def test_decisions_of_a_batch_equal_decisions_one_by_one(now, window, cases):
    """enforce_at_claim's shortcuts (number zones found beforehand, one send moment per zone,
    window and agreement at one clock) change no decision."""
    from tasks.policy import by_number_zone

    p = ContactPolicy(marketing_window=window)
    moments: dict = {}
    zones = by_number_zone([c[1] for c in cases], [c[0] for c in cases])
    for (tz, phone, agreed), number_zone in zip(cases, zones):
        alone = decide(now=now, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz=tz, e164=phone,
                       agreed_days_off=agreed)
        batch = decide(now=now, kind="marketing", policy=p, consent=True, opted_out=False, crm_tz=tz, e164=phone,
                       agreed_days_off=agreed, number_zone=number_zone, moments=moments)
        assert batch == alone
