"""The policy as enforced by the real send path (store + sandbox gateway), property-based."""
from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from blocks.gateway import SandboxGateway
from store.db import bulk_insert, get_engine
from tasks.policy import ContactPolicy, FrequencyCap, allowed_now, always_open, resolve_timezone
from smsflow.ratelimit import TokenBucket
from tasks.send import send_messages

UTC = timezone.utc
ZONES = ["Europe/Kaliningrad", "Europe/Moscow", "Asia/Kamchatka", "Europe/London", "Pacific/Auckland", ""]
_counter = itertools.count()

contacts_st = st.lists(
    st.tuples(st.sampled_from(ZONES), st.booleans(), st.booleans()),  # zone, consent, opted out
    min_size=1, max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(contacts=contacts_st, clock=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 12, 31)),
       steps=st.lists(st.integers(10, 600), min_size=1, max_size=6), campaigns=st.integers(1, 3))
def test_send_path_never_breaks_the_policy(tmp_path_factory, contacts, clock, steps, campaigns):
    tmp = tmp_path_factory.mktemp("prop")
    engine = get_engine(f"sqlite:///{tmp / 'store.sqlite'}")
    gw = SandboxGateway(state_path=str(tmp / "gw.sqlite"), rejected_rate=0, undelivered_rate=0, expired_rate=0)
    policy = ContactPolicy(caps=[FrequencyCap(period="day", limit=1), FrequencyCap(period="week", limit=2)])
    n = next(_counter)
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status", "timezone", "opted_out_at"),
                    [("s", f"{n}-{i}", f"+7916{n:03d}{i:04d}", consent, "valid", tz or None, clock if out else None)
                     for i, (tz, consent, out) in enumerate(contacts)])
        ids = [r[0] for r in c.execute(text("SELECT id FROM contacts ORDER BY id"))]
        for k in range(campaigns):
            c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                           "policy) VALUES (:n, 's', 'all', 't', 'marketing', 0, 'running', :p)"),
                      {"n": f"c{k}", "p": policy.model_dump_json()})
        camp_ids = [r[0] for r in c.execute(text("SELECT id FROM campaigns ORDER BY id"))]
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"k{cid}:{ct}", cid, ct, "main", f"+7916{n:03d}{j:04d}", "hi", "GSM-7", 1, 0, "planned", 0, clock, clock)
                     for cid in camp_ids for j, ct in enumerate(ids)])
    now = clock.replace(tzinfo=UTC)
    for minutes in steps:  # the sender wakes up at random moments and sends whatever is due
        for cid in camp_ids:
            send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(100_000), claimer="p",
                          max_messages=1000, now=now)
        now += timedelta(minutes=minutes * 7)
    with engine.begin() as c:
        sent = c.execute(text(
            "SELECT o.contact_id, o.submitted_at, ct.timezone, ct.phone_e164, ct.sms_consent, ct.opted_out_at "
            "FROM outbox o JOIN contacts ct ON ct.id = o.contact_id WHERE o.submitted_at IS NOT NULL")).fetchall()
    by_contact: dict[int, list[datetime]] = {}
    for contact_id, sub_at, tz, phone, consent, opted_out in sent:
        sub = (datetime.fromisoformat(sub_at) if isinstance(sub_at, str) else sub_at).replace(tzinfo=UTC)
        assert consent and opted_out is None  # 0 to non-consented or opted-out
        zone, _ = resolve_timezone(tz, phone, policy.default_timezone)
        assert allowed_now(sub, zone, policy.marketing_window, "RU")  # 0 outside the local window
        by_contact.setdefault(contact_id, []).append(sub)
    for times in by_contact.values():  # 0 cap violations
        times.sort()
        for t in times:
            assert sum(1 for u in times if t - timedelta(days=1) < u <= t) <= 1
            assert sum(1 for u in times if t - timedelta(days=7) < u <= t) <= 2
    engine.dispose()


def test_claim_lifts_holidays_only_for_contacts_who_agreed(engine):
    """On a public holiday a window that skips holidays defers everyone except the contacts whose CRM
    attribute says they agreed (parsed only when the window excludes a day); on both stores."""
    from tasks.send import claim

    holiday = datetime(2027, 1, 1, 9, 0)  # 12:00 in Moscow, New Year's Day
    policy = ContactPolicy()  # marketing 10:00-21:00, skips Russian holidays
    people = [("yes", '{"sms_on_holidays": "да"}'), ("no", '{"sms_on_holidays": "no"}'), ("none", None)]
    with engine.begin() as c:
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status", "timezone", "attributes"),
                    [("s", crm, f"+791600000{i:02d}", True, "valid", "Europe/Moscow", attrs)
                     for i, (crm, attrs) in enumerate(people)])
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                       "policy) VALUES ('hol', 's', 'all', 't', 'marketing', 0, 'running', :p)"),
                  {"p": policy.model_dump_json()})
        cid = c.execute(text("SELECT id FROM campaigns WHERE name = 'hol'")).scalar()
        rows = c.execute(text("SELECT id, crm_id, phone_e164 FROM contacts ORDER BY id")).fetchall()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"h:{r[1]}", cid, r[0], "main", r[2], "hi", "GSM-7", 1, 0, "planned", 0, holiday, holiday)
                     for r in rows])
    got = claim(engine, cid, 10, "t", now=holiday.replace(tzinfo=UTC))
    assert got["idempotency_key"].tolist() == ["h:yes"]
    assert got.attrs["policy"] == {"holiday": 2}
    with engine.begin() as c:
        deferred = dict(c.execute(text("SELECT idempotency_key, send_after FROM outbox WHERE state = 'planned'")).fetchall())
    assert sorted(deferred) == ["h:no", "h:none"]
    assert all(str(v).startswith("2027-01-09 07:00") for v in deferred.values()), deferred  # after the New Year break


def test_a_capped_claim_reads_the_contacts_history_through_an_index(engine):
    """Frequency caps count what each claimed contact was sent lately in any campaign: that read must go
    through ``ix_outbox_contact_submitted`` (migration 0016), not scan the whole outbox once per claim;
    and the cap still holds: the contact sent a message an hour ago is deferred, the other one is sent."""
    from store.db import is_postgres
    from tasks.send import claim
    from tests.helpers import analyze, numbers_sql, plan_of, statements_run

    clock = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)
    naive = clock.replace(tzinfo=None)
    policy = always_open().model_copy(update={"caps": [FrequencyCap(period="day", limit=1)]})
    with engine.begin() as c:
        pg = is_postgres(c)
        for name in ("old", "capped"):
            c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status, "
                           "policy) VALUES (:n, 's', 'all', 't', 'marketing', 0, 'running', :p)"),
                      {"n": name, "p": policy.model_dump_json()})
        old, cid = (c.execute(text("SELECT id FROM campaigns WHERE name = :n"), {"n": n}).scalar() for n in ("old", "capped"))
        bulk_insert(c, "contacts", ("source", "crm_id", "phone_e164", "sms_consent", "status", "timezone"),
                    [("s", f"p{i}", f"+7916{i:07d}", True, "valid", "Europe/Moscow") for i in range(2000)])
        first = c.execute(text("SELECT MIN(id) FROM contacts")).scalar()
        # a long history: 20,000 messages of the old campaign, all sent 60 days ago ...
        c.execute(text(f"INSERT INTO outbox (idempotency_key, campaign_id, contact_id, step, phone_e164, text, encoding, "
                       f"segments, cost, state, attempts, planned_at, updated_at, submitted_at) "
                       f"SELECT 'h' || n, :old, :first + n % 2000, 'main', '+7916', 'hi', 'GSM-7', 1, 0, 'delivered', 1, "
                       f":t, :t, :t FROM ({numbers_sql(pg, 20000)}) AS q"), {"old": old, "first": first, "t": naive - timedelta(days=60)})
        # ... and one sent an hour ago to the first contact
        c.execute(text("UPDATE outbox SET submitted_at = :t WHERE idempotency_key = 'h0'"), {"t": naive - timedelta(hours=1)})
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "phone_e164", "text", "encoding",
                                  "segments", "cost", "state", "attempts", "planned_at", "updated_at"),
                    [(f"cap:{k}", cid, first + k, "main", f"+7916{k:07d}", "hi", "GSM-7", 1, 0, "planned", 0, naive, naive)
                     for k in (0, 1)])
    analyze(engine, "outbox")

    with statements_run(engine) as seen:
        got = claim(engine, cid, 10, "t", now=clock)
    assert got["idempotency_key"].tolist() == ["cap:1"]
    assert got.attrs["policy"] == {"cap_day": 1}
    history = [(s, p) for s, p in seen if "submitted_at >" in s]
    assert len(history) == 1, [s[:80] for s, _ in seen]
    plan = plan_of(engine, *history[0])
    assert "ix_outbox_contact_submitted" in plan, plan
