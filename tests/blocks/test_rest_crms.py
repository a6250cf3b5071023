"""amoCRM, Bitrix24 and HubSpot CRM sources (extract + write-back) against offline fakes that
follow each vendor's documented API: paging, limits, rate-limit answers, error bodies."""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

import pandas as pd
import pytest
from sqlalchemy import text

from blocks.amocrm import AmoCrm
from blocks.bitrix24 import Bitrix24Crm
from blocks.crm import CONTACT_COLUMNS, CrmSourceError
from blocks.crm_writeback import WriteBackItem, keys_in, marker
from blocks.hubspot import HubSpotCrm
from tasks.extract import extract_source
from tests.fakes.amocrm import FakeAmoCrm
from tests.fakes.bitrix24 import FakeBitrix24
from tests.fakes.hubspot import FakeHubSpot

N = 620
BASE = 1_767_261_600  # 2026-01-01T10:00:00Z
FAST = dict(backoff_s=0.02, max_backoff_s=0.5)


def ts(i: int) -> int:
    """Three contacts per second: ties inside a page, never a page of one second."""
    return BASE + i // 3


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def mobile(i: int) -> str:
    return f"+7 926 {i:03d}-{i % 100:02d}-{i % 97:02d}"


def landline(i: int) -> str:
    return f"+7 495 {i:03d}-00-00"


def consent(i: int) -> bool:
    return i % 5 != 0


def one_frame(source, since=None) -> pd.DataFrame:
    frames = list(source.fetch(since=since))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CONTACT_COLUMNS))


def check_mapping(df: pd.DataFrame, ids: range) -> None:
    assert list(df.columns[:len(CONTACT_COLUMNS)]) == list(CONTACT_COLUMNS)
    assert sorted(df["id"].astype(int)) == list(ids)  # every contact exactly once
    for r in df.itertuples():
        i = int(r.id)
        assert r.phone == mobile(i), "the mobile number is preferred over a work number"
        assert r.email == f"u{i}@example.ru"
        assert r.first_name == f"Имя{i}" and r.last_name == "Петрова"
        assert r.sms_consent is consent(i)
        assert r.updated_at.startswith("2026-01-01T") and r.updated_at.endswith("Z")


def items_for(ids, kind="delivery", prefix="d"):
    return [WriteBackItem(f"{prefix}:{i}", str(i), kind, f"SMS {kind} #{i}") for i in ids]


# =========================================================================== amoCRM
def amo_fake(n=N, stamp=ts, **kw) -> FakeAmoCrm:
    fake = FakeAmoCrm(**{"rate_per_s": 100, **kw})
    for i in range(1, n + 1):
        fake.add_contact(i, first_name=f"Имя{i}", last_name="Петрова", updated_at=stamp(i),
                         phones=[(landline(i), "WORK"), (mobile(i), "MOB")], emails=[(f"u{i}@example.ru", "WORK")],
                         consent=consent(i), lead_ids=[i * 10] if i % 2 else [])
        if i % 2:
            fake.add_lead(i * 10, status_id=142, pipeline_id=7, price=1000 + i, updated_at=stamp(i))
    return fake


def amo(fake: FakeAmoCrm, **kw) -> AmoCrm:
    kw = {"rate_per_second": 1000, **FAST, **kw}
    return AmoCrm(base_url=fake.base_url, access_token=fake.token, source_name="amo", **kw).with_transport(fake.transport())


@pytest.mark.parametrize("pages_per_query", [1, 100])
def test_amocrm_full_extract(pages_per_query):
    fake = amo_fake()
    df = one_frame(amo(fake, lead_details=True, pages_per_query=pages_per_query))
    check_mapping(df, range(1, N + 1))
    row = df[df["id"] == "7"].iloc[0]
    assert row["lead_count"] == 1 and row["last_lead_id"] == 70 and row["last_lead_status_id"] == 142
    assert row["last_lead_price"] == 1007 and row["name"] == "Имя7 Петрова"
    contact_gets = [p for m, p in fake.log if p == "/api/v4/contacts"]
    assert len(contact_gets) <= 5  # 620 contacts, 250 per page


def test_amocrm_contacts_sharing_one_second_are_walked_by_id():
    fake = amo_fake(stamp=lambda i: BASE if i <= 600 else BASE + i)
    df = one_frame(amo(fake, with_leads=False))
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))


def test_amocrm_incremental_from_watermark():
    fake = amo_fake()
    since = iso(ts(300))
    df = one_frame(amo(fake), since=since)
    expected = [i for i in range(1, N + 1) if ts(i) >= ts(300)]
    assert sorted(df["id"].astype(int)) == expected  # the watermark second again, then only newer
    assert one_frame(amo(fake), since=iso(BASE + 10_000)).empty  # 204 No Content


def test_amocrm_burst_gets_429_and_recovers():
    fake = amo_fake(rate_per_s=10)
    df = one_frame(amo(fake, page_size=50, with_leads=False))
    assert fake.throttled >= 1
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))


def test_amocrm_token_bucket_stays_under_the_limit():
    fake = amo_fake(n=300, rate_per_s=7, block_after_429=1)  # one 429 and the "IP" would be blocked
    df = one_frame(amo(fake, rate_per_second=7, page_size=50, with_leads=False))
    assert len(df) == 300 and fake.throttled == 0


def test_amocrm_401_is_a_clear_error_without_the_token():
    fake = amo_fake(n=3)
    src = AmoCrm(base_url=fake.base_url, access_token="wrong-secret-token-123", source_name="amo").with_transport(fake.transport())
    with pytest.raises(CrmSourceError) as e:
        one_frame(src)
    assert "amoCRM" in str(e.value) and "token" in str(e.value)
    assert "wrong-secret-token-123" not in str(e.value) and "wrong-secret-token-123" not in repr(src)


def test_amocrm_write_back_batches_opt_out_and_crash_window():
    fake = amo_fake(n=150)
    src = amo(fake, note_batch_size=50, update_batch_size=50)
    items = items_for(range(1, 101)) + items_for(range(101, 111), "reply", "r") + items_for(range(111, 121), "opt_out", "o")
    items.append(WriteBackItem("d:404", "99999", "delivery", "no such contact"))
    res = {r.key: r for r in src.write_back(items)}
    assert all(res[i.key].ok for i in items[:-1])
    assert not res["d:404"].ok and not res["d:404"].transient and "NotFound" in res["d:404"].error
    assert all(n <= 50 for _, n in fake.write_sizes)
    assert sum(n for p, n in fake.write_sizes if p == "notes") == 120
    assert fake.consent_of(115) is False and fake.consent_of(5) is False and fake.consent_of(6) is True
    note = fake.notes_of(1)[0]["params"]["text"]
    assert note.startswith("SMS delivery #1") and note.endswith(marker("d:1"))
    assert src.existing_keys(items) == {i.key for i in items[:-1]}

    # crash window: the notes are created, the answer is lost
    more = items_for(range(121, 151), prefix="x")
    fake.lose_responses = 1
    res2 = src.write_back(more)
    assert all(r.ok for r in res2)
    # the caller lost its table of done keys: a full rerun creates nothing twice
    before = len(fake.notes)
    res3 = src.write_back(items[:-1] + more)
    assert len(fake.notes) == before
    assert all(r.ok and r.crm_ref for r in res3)
    for i in range(1, 151):
        keys = [k for n in fake.notes_of(i) for k in keys_in(n["params"]["text"])]
        assert len(keys) == len(set(keys)) == 1


def test_amocrm_extract_into_the_store(sqlite_engine):
    fake = amo_fake()
    src = amo(fake)
    stats = extract_source(sqlite_engine, src)
    assert stats.rows == N and stats.quarantined == 0
    with sqlite_engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM contacts WHERE source='amo'")).scalar() == N
        r = c.execute(text("SELECT phone_raw, email, sms_consent, attributes FROM contacts WHERE crm_id='7'")).one()
    assert r.phone_raw == mobile(7) and r.email == "u7@example.ru" and bool(r.sms_consent) is True
    assert "lead_count" in str(r.attributes)
    fake.add_contact(9001, first_name="Новый", updated_at=BASE + 5000, phones=[("+7 916 555-00-01", "MOB")])
    again = extract_source(sqlite_engine, src)
    assert again.rows < 10  # only the watermark second and the new contact
    with sqlite_engine.begin() as c:
        assert c.execute(text("SELECT COUNT(*) FROM contacts WHERE source='amo'")).scalar() == N + 1


def test_amocrm_deals_become_orders_incrementally(any_store):
    """Leads as orders (GET /api/v4/leads?with=contacts, paged, walked by updated_at): won (142) is revenue,
    lost (143) not; the main contact links the order; a lead changed later is re-read and updated; 429s
    are waited out."""
    from store.db import get_engine
    from tasks.orders import extract_orders

    engine = get_engine(any_store)
    fake = amo_fake()  # odd contacts have lead i*10, won, price 1000 + i
    fake.add_lead(20, status_id=143, pipeline_id=7, price=500, updated_at=BASE + 10)
    fake.contacts[2]["_lead_ids"].append(20)
    src = amo(fake)
    extract_source(engine, src)
    fake.force_429 = 2
    res = extract_orders(engine, src)
    n_leads = (N + 1) // 2 + 1
    assert (res.rows, res.stored, res.quarantined) == (n_leads, n_leads, 0)
    with engine.begin() as c:
        rows = {r[0]: r[1:] for r in c.execute(text(
            "SELECT o.crm_order_id, o.amount, o.revenue, k.crm_id, o.status FROM orders o "
            "LEFT JOIN contacts k ON k.id = o.contact_id"))}
    assert rows["70"][0] == 1007 and bool(rows["70"][1]) and rows["70"][2] == "7" and rows["70"][3] == "won"
    assert not bool(rows["20"][1]) and rows["20"][2] == "2" and rows["20"][3] == "lost"
    assert fake.throttled >= 2
    # a lead won later: the next run reads what changed since the watermark, the sale counts now
    fake.leads[20].update(status_id=142, updated_at=BASE + 9000)
    again = extract_orders(engine, src)
    assert again.rows <= 3  # the watermark second again and the changed lead
    with engine.begin() as c:
        assert bool(c.execute(text("SELECT revenue FROM orders WHERE crm_order_id = '20'")).scalar())
        assert c.execute(text("SELECT COUNT(*) FROM orders")).scalar() == n_leads


# =========================================================================== Bitrix24
def bx_fake(n=N, stamp=ts, **kw) -> FakeBitrix24:
    fake = FakeBitrix24(**{"bucket_size": 50, "drain_per_s": 100, **kw})
    for i in range(1, n + 1):
        fake.add_contact(i, name=f"Имя{i}", last_name="Петрова", modified=stamp(i),
                         phones=[(landline(i), "WORK"), (mobile(i), "MOBILE")], emails=[(f"u{i}@example.ru", "WORK")],
                         consent="1" if consent(i) else "0")
    return fake


def bx(fake: FakeBitrix24, **kw) -> Bitrix24Crm:
    kw = {"rate_per_second": 1000, **FAST, **kw}
    return Bitrix24Crm(webhook_url=fake.webhook_url, source_name="bx", **kw).with_transport(fake.transport())


@pytest.mark.parametrize("pages_per_query", [1, 100])
def test_bitrix24_full_extract(pages_per_query):
    fake = bx_fake()
    df = one_frame(bx(fake, pages_per_query=pages_per_query, extra_fields=["ASSIGNED_BY_ID"]))
    check_mapping(df, range(1, N + 1))
    assert df.iloc[0]["assigned_by_id"] == "1"
    assert len(fake.log) <= 15  # 50 per page


def test_bitrix24_contacts_sharing_one_second_are_walked_by_id():
    fake = bx_fake(n=180, stamp=lambda i: BASE if i <= 170 else BASE + i)
    df = one_frame(bx(fake))
    assert sorted(df["id"].astype(int)) == list(range(1, 181))


def test_bitrix24_incremental_from_watermark():
    fake = bx_fake()
    df = one_frame(bx(fake), since=iso(ts(500)))
    assert sorted(df["id"].astype(int)) == [i for i in range(1, N + 1) if ts(i) >= ts(500)]


def test_bitrix24_burst_gets_query_limit_exceeded_and_recovers():
    fake = bx_fake(bucket_size=4, drain_per_s=40)
    df = one_frame(bx(fake))
    assert fake.throttled >= 1
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))


def test_bitrix24_invalid_webhook_is_a_clear_error_without_the_secret(caplog):
    fake = bx_fake(n=3)
    bad = f"https://{fake.portal}/rest/1/not-the-secret-987/"
    src = Bitrix24Crm(webhook_url=bad, source_name="bx").with_transport(fake.transport())
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CrmSourceError) as e:
        one_frame(src)
    assert "INVALID_CREDENTIALS" in str(e.value)
    assert "not-the-secret-987" not in str(e.value) and "not-the-secret-987" not in caplog.text
    one_frame(bx(fake))
    assert fake.secret not in caplog.text  # httpx's request lines are masked


def test_bitrix24_write_back_batches_opt_out_and_crash_window():
    fake = bx_fake(n=150)
    src = bx(fake)
    items = items_for(range(1, 101)) + items_for(range(101, 111), "reply", "r") + items_for(range(111, 121), "opt_out", "o")
    items.append(WriteBackItem("d:404", "99999", "delivery", "no such contact"))
    res = {r.key: r for r in src.write_back(items)}
    assert all(res[i.key].ok for i in items[:-1])
    assert not res["d:404"].ok and not res["d:404"].transient
    assert max(fake.batch_sizes) <= 50
    assert fake.contacts[115]["UF_CRM_SMS_CONSENT"] == "0" and fake.contacts[6]["UF_CRM_SMS_CONSENT"] == "1"
    assert fake.comments_of(1)[0]["COMMENT"].endswith(marker("d:1"))

    more = items_for(range(121, 151), prefix="x")
    fake.lose_responses = 1
    assert all(r.ok for r in src.write_back(more))
    before = len(fake.comments)
    res3 = src.write_back(items[:-1] + more)
    assert len(fake.comments) == before and all(r.ok for r in res3)
    for i in range(1, 151):
        keys = [k for c in fake.comments_of(i) for k in keys_in(c["COMMENT"])]
        assert len(keys) == len(set(keys)) == 1


def test_bitrix24_deals_become_orders_incrementally(any_store):
    """Deals as orders (crm.deal.list, 50 per page, walked by DATE_MODIFY then ID): won (semantic S, also in a
    pipeline C1:WON) is revenue, lost (F) and in-progress not; CONTACT_ID (the primary) links the order, a deal
    without contacts is stored unlinked; a won deal moved to LOSE later is re-read and stops counting; the
    portal's QUERY_LIMIT_EXCEEDED is waited out."""
    from store.db import get_engine
    from tasks.orders import extract_orders

    engine = get_engine(any_store)
    fake = bx_fake()
    n_deals = 130  # three pages, several deals per second
    for d in range(1, n_deals + 1):
        stage = "C1:WON" if d == 7 else ("WON" if d % 3 else ("LOSE" if d % 2 else "PREPARATION"))
        fake.add_deal(1000 + d, contact_ids=[d, d + 1] if d != 5 else [], stage=stage, modified=BASE + d // 4,
                      opportunity=100 * d + 0.5, currency="USD" if d == 9 else "RUB", closed_at=BASE - 86400 + d)
    src = bx(fake)
    assert src.has_orders
    extract_source(engine, src)
    fake.force_limit = 2
    res = extract_orders(engine, src)
    assert (res.rows, res.stored, res.quarantined) == (n_deals, n_deals, 0)
    assert fake.throttled >= 2 and "crm.deal.list" in fake.log
    with engine.begin() as c:
        rows = {r[0]: r[1:] for r in c.execute(text(
            "SELECT o.crm_order_id, o.amount, o.revenue, k.crm_id, o.status, o.currency, o.ordered_at FROM orders o "
            "LEFT JOIN contacts k ON k.id = o.contact_id"))}
    assert len(rows) == n_deals
    won = rows["1004"]
    assert won[0] == 400.5 and bool(won[1]) and won[2] == "4" and won[3] == "won" and won[4] == "RUB"
    assert str(won[5]).startswith(datetime.fromtimestamp(BASE - 86400 + 4, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
    assert bool(rows["1007"][1]) and rows["1007"][3] == "won"  # C1:WON, another pipeline
    assert not bool(rows["1003"][1]) and rows["1003"][3] == "lost"
    assert not bool(rows["1006"][1]) and rows["1006"][3] == "open-preparation"
    assert rows["1005"][2] is None  # no contact: stored, not linked
    assert rows["1009"][4] == "USD"
    # the won deal 1004 is lost later: re-read since the watermark, its revenue is off
    fake.set_stage(fake.deals[1004], "LOSE", modified=BASE + 9000)
    again = extract_orders(engine, src)
    assert again.rows <= 5  # the watermark second again and the changed deal
    with engine.begin() as c:
        assert not bool(c.execute(text("SELECT revenue FROM orders WHERE crm_order_id = '1004'")).scalar())
        assert c.execute(text("SELECT COUNT(*) FROM orders")).scalar() == n_deals


def test_bitrix24_deals_can_be_turned_off():
    assert not bx(bx_fake(n=1), deals=False).has_orders
    assert bx(bx_fake(n=1), deals=False).fetch_orders() is None


# =========================================================================== HubSpot
def hs_fake(n=N, stamp=lambda i: BASE * 1000 + (i // 3) * 7, **kw) -> FakeHubSpot:
    fake = FakeHubSpot(**{"limit_per_window": 1000, "search_per_s": 1000, **kw})
    for i in range(1, n + 1):
        fake.add_contact(i, modified_ms=stamp(i), firstname=f"Имя{i}", lastname="Петрова", phone=landline(i),
                         mobilephone=mobile(i), email=f"u{i}@example.ru", sms_consent="true" if consent(i) else "false")
    return fake


def hs(fake: FakeHubSpot, **kw) -> HubSpotCrm:
    kw = {"requests_per_10s": 10_000, "search_rate_per_second": 1000, **FAST, **kw}
    return HubSpotCrm(base_url=fake.base_url, access_token=fake.token, source_name="hs", **kw).with_transport(fake.transport())


@pytest.mark.parametrize("pages_per_query", [1, 100])
def test_hubspot_full_extract(pages_per_query):
    fake = hs_fake()
    df = one_frame(hs(fake, pages_per_query=pages_per_query))
    check_mapping(df, range(1, N + 1))
    assert set(df["language"]) == {"ru"} and set(df["timezone"]) == {"Europe/Moscow"}
    body = fake.search_bodies[0]
    assert body["sorts"] == [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}] and body["limit"] == 100
    assert {"firstname", "lastname", "phone", "mobilephone", "email", "hs_language", "lastmodifieddate",
            "sms_consent"} <= set(body["properties"])


def test_hubspot_deals_become_orders_incrementally(any_store):
    """Deals as orders (POST /crm/v3/objects/deals/search on hs_lastmodifieddate, contacts by the v4 batch
    association read, 207 for deals without contacts): closed won is revenue, closed lost and open deals not;
    re-queried past the search cap; a won deal lost later is re-read and stops counting; 429s are waited out."""
    from store.db import get_engine
    from tasks.orders import extract_orders

    engine = get_engine(any_store)
    fake = hs_fake(search_cap=300)
    n_deals = 450
    for d in range(1, n_deals + 1):
        stage = "closedwon" if d % 3 else ("closedlost" if d % 2 else "contractsent")
        fake.add_deal(5000 + d, contact_ids=[] if d == 5 else [d + 1, d], dealstage=stage, amount=10 * d + 0.25,
                      currency="EUR" if d == 8 else "RUB", modified_ms=BASE * 1000 + (d // 3) * 11)
    src = hs(fake, search_cap=300, pages_per_query=1000)
    assert src.has_orders
    extract_source(engine, src)
    fake.force_429 = 2
    res = extract_orders(engine, src)
    assert (res.rows, res.stored, res.quarantined) == (n_deals, n_deals, 0)
    assert fake.throttled >= 2
    deal_searches = [b for b in fake.search_bodies if "hs_is_closed_won" in b.get("properties", [])]
    assert all(int(b.get("after") or 0) < 300 for b in deal_searches)
    assert deal_searches[0]["sorts"] == [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}]
    assert ("POST", "/crm/v4/associations/deals/contacts/batch/read") in fake.log
    with engine.begin() as c:
        rows = {r[0]: r[1:] for r in c.execute(text(
            "SELECT o.crm_order_id, o.amount, o.revenue, k.crm_id, o.status, o.currency FROM orders o "
            "LEFT JOIN contacts k ON k.id = o.contact_id"))}
    assert len(rows) == n_deals
    assert rows["5004"][0] == 40.25 and bool(rows["5004"][1]) and rows["5004"][2] == "4" and rows["5004"][3] == "won"
    assert not bool(rows["5003"][1]) and rows["5003"][3] == "lost"
    assert not bool(rows["5006"][1]) and rows["5006"][3] == "open-contractsent"
    assert rows["5005"][2] is None and rows["5008"][4] == "EUR"
    later = BASE * 1000 + 9_000_000
    fake.set_stage(fake.deals["5004"], "closedlost", modified_ms=later)
    again = extract_orders(engine, src)
    assert again.rows <= 5
    with engine.begin() as c:
        assert not bool(c.execute(text("SELECT revenue FROM orders WHERE crm_order_id = '5004'")).scalar())
        assert c.execute(text("SELECT COUNT(*) FROM orders")).scalar() == n_deals


def test_hubspot_search_cap_is_handled_by_requerying():
    fake = hs_fake(search_cap=300)
    df = one_frame(hs(fake, pages_per_query=1000, search_cap=300))
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))
    assert all(int(b.get("after") or 0) < 300 for b in fake.search_bodies)  # never paged into the 400
    assert sum(1 for b in fake.search_bodies if b["filterGroups"]) >= 2  # re-queried from lastmodifieddate


def test_hubspot_unexpected_cap_400_also_requeries():
    fake = hs_fake(search_cap=300)
    df = one_frame(hs(fake, pages_per_query=1000))  # the block believes in 10,000
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))
    assert any(int(b.get("after") or 0) >= 300 for b in fake.search_bodies)  # it did get the 400


def test_hubspot_cap_with_one_millisecond_for_everyone():
    fake = hs_fake(n=450, stamp=lambda i: BASE * 1000 if i <= 420 else BASE * 1000 + i, search_cap=300)
    df = one_frame(hs(fake, pages_per_query=1000, search_cap=300))
    assert sorted(df["id"].astype(int)) == list(range(1, 451))


def test_hubspot_incremental_from_watermark():
    fake = hs_fake()
    mark = BASE * 1000 + (400 // 3) * 7
    since = datetime.fromtimestamp(mark / 1000, timezone.utc).isoformat()
    df = one_frame(hs(fake), since=since)
    assert sorted(df["id"].astype(int)) == [i for i in range(1, N + 1) if BASE * 1000 + (i // 3) * 7 >= mark]
    f = fake.search_bodies[-1]["filterGroups"][0]["filters"][0]
    assert f["propertyName"] == "lastmodifieddate" and f["operator"] == "GTE"


def test_hubspot_burst_gets_429_and_recovers():
    fake = hs_fake(limit_per_window=5, window_s=0.2, search_per_s=10, retry_after="0.05")
    df = one_frame(hs(fake, page_size=50))
    assert fake.throttled >= 1
    assert sorted(df["id"].astype(int)) == list(range(1, N + 1))


def test_hubspot_401_is_a_clear_error_without_the_token():
    fake = hs_fake(n=3)
    src = HubSpotCrm(access_token="pat-na1-wrong-token-xyz", base_url=fake.base_url, source_name="hs").with_transport(fake.transport())
    with pytest.raises(CrmSourceError) as e:
        one_frame(src)
    assert "HubSpot" in str(e.value) and "token" in str(e.value) and "INVALID_AUTHENTICATION" in str(e.value)
    assert "pat-na1-wrong-token-xyz" not in str(e.value)


def test_hubspot_write_back_batches_opt_out_and_crash_window():
    fake = hs_fake(n=300)
    src = hs(fake)
    items = items_for(range(1, 221)) + items_for(range(221, 231), "reply", "r") + items_for(range(231, 241), "opt_out", "o")
    items += [WriteBackItem("d:404", "99999", "delivery", "no such contact"),
              WriteBackItem("o:404", "99998", "opt_out", "STOP")]
    res = {r.key: r for r in src.write_back(items)}
    assert all(res[i.key].ok for i in items[:-2])
    assert not res["d:404"].ok and not res["d:404"].transient
    assert not res["o:404"].ok and "OBJECT_NOT_FOUND" in res["o:404"].error
    assert all(n <= 100 for _, n in fake.write_sizes)
    assert fake.contacts["235"]["properties"]["sms_opt_out"] == "true"
    body = fake.notes_of(1)[0]["properties"]["hs_note_body"]
    assert body.startswith("<p>SMS delivery #1</p>") and marker("d:1") in body

    more = items_for(range(241, 300), prefix="x")
    fake.lose_responses = 1
    assert all(r.ok for r in src.write_back(more))
    before = len(fake.notes)
    res3 = src.write_back(items[:-2] + more)
    assert len(fake.notes) == before and all(r.ok for r in res3)
    for i in range(1, 300):
        keys = [k for n in fake.notes_of(i) for k in keys_in(n["properties"]["hs_note_body"])]
        assert len(keys) == len(set(keys)) == 1
    # and the opt-out reaches the next extract as a revoked consent
    df = one_frame(src, since=iso(BASE))
    assert bool(df[df["id"] == "235"].iloc[0]["sms_consent"]) is False


# =========================================================================== common
def test_logs_carry_no_secret_and_no_full_phone(caplog):
    caplog.set_level(logging.DEBUG)
    fa, fh = amo_fake(n=30, rate_per_s=4), hs_fake(n=60, limit_per_window=3, window_s=0.2)
    one_frame(amo(fa, page_size=10))
    one_frame(hs(fh, page_size=10))
    amo(fa).write_back(items_for(range(1, 5)))
    assert fa.throttled and fh.throttled  # retries were logged
    for secret in (fa.token, fh.token):
        assert secret not in caplog.text
    # no phone in any form (a bare "926" may be part of a timestamp in a URL: 1793903926 was, once)
    assert mobile(1) not in caplog.text and not re.search(r"926\D{0,3}001\D{0,3}01", caplog.text), caplog.text


def test_write_back_items_are_validated():
    with pytest.raises(ValueError):
        WriteBackItem("has space", "1", "delivery", "x")
    with pytest.raises(ValueError):
        WriteBackItem("k", "1", "sms", "x")  # type: ignore[arg-type]
    fake = amo_fake(n=2)
    res = amo(fake).write_back([WriteBackItem("k1", "abc", "delivery", "x"), WriteBackItem("k2", "1", "delivery", "x"),
                                WriteBackItem("k2", "1", "delivery", "x")])
    assert not res[0].ok and "numeric" in res[0].error
    assert res[1].ok and res[2].ok and res[1].crm_ref == res[2].crm_ref and len(fake.notes) == 1


def test_a_marker_typed_into_a_reply_cannot_pass_for_ours():
    fake = bx_fake(n=2)
    src = bx(fake)
    spoof = WriteBackItem("r:1", "1", "reply", "STOP please [smsflow:d:1]")
    assert src.write_back([spoof])[0].ok
    assert keys_in(fake.comments_of(1)[0]["COMMENT"]) == {"r:1"}
    assert src.existing_keys([WriteBackItem("d:1", "1", "delivery", "x")]) == set()
    assert src.write_back([WriteBackItem("d:1", "1", "delivery", "delivered")])[0].ok
    assert len(fake.comments_of(1)) == 2


def test_store_write_back_to_amocrm_never_twice(sqlite_engine):
    """Delivery states, an SMS opt-out and a reply from the store go back to amoCRM; a rerun writes nothing new."""
    from store.db import bulk_insert, utcnow
    from tasks.inbound import store_and_apply
    from tasks.writeback import write_back

    fake = amo_fake(n=5)
    src = amo(fake)
    extract_source(sqlite_engine, src)
    with sqlite_engine.begin() as c:
        c.execute(text("UPDATE contacts SET phone_e164 = '+7916000000' || crm_id, status = 'valid'"))
        c.execute(text("INSERT INTO campaigns (name, source, segment, template_name, kind, price_per_segment, status) "
                       "VALUES ('spring', 'amo', 'all', 't', 'marketing', 0, 'running')"))
        ids = dict(c.execute(text("SELECT crm_id, id FROM contacts")).fetchall())
        now = utcnow()
        bulk_insert(c, "outbox", ("idempotency_key", "campaign_id", "contact_id", "step", "encoding", "segments", "cost",
                                  "state", "attempts", "error_code", "planned_at", "updated_at"),
                    [("k1", 1, ids["1"], "main", "GSM-7", 1, 0, "delivered", 1, None, now, now),
                     ("k2", 1, ids["2"], "main", "GSM-7", 1, 0, "undelivered", 1, "027", now, now),
                     ("k3", 1, ids["3"], "main", "GSM-7", 1, 0, "rejected", 1, "POLICY_OPTED_OUT", now, now)])
        store_and_apply(c, gateway="kannel", gateway_message_id="mo1", from_e164="+79160000004", to=None, body="СТОП", raw={})
        store_and_apply(c, gateway="kannel", gateway_message_id="mo2", from_e164="+79160000005", to=None, body="Когда?", raw={})
    s = write_back(sqlite_engine, src, "amo")
    assert (s.queued, s.written, s.failed, s.pending) == (4, 4, 0, 0)
    assert fake.consent_of(4) is False
    assert len(fake.notes_of(1)) == 1 and "delivered" in fake.notes_of(1)[0]["params"]["text"]
    assert "Когда?" in fake.notes_of(5)[0]["params"]["text"]
    before = len(fake.notes)
    again = write_back(sqlite_engine, src, "amo")
    assert (again.queued, again.written) == (0, 0) and len(fake.notes) == before


# =========================================================================== webhook events: whose deal is it?
# Each vendor's world: a deal with two contacts (the main/primary one is not the lowest id), a deal
# without contacts, and the webhook bodies as the vendor sends them (parsed by service/webhooks.py).
def _event(kind: str, body):
    """(event_type, entity_id, fields) as the journey passes them to ``event_customer``."""
    import json

    from service.webhooks import parse

    (ev,) = parse(kind, body if isinstance(body, bytes) else json.dumps(body).encode())
    return ev.event_type, ev.entity_id, {**ev.payload, "event_type": ev.event_type}


def amo_world(**kw):
    fake = amo_fake(n=0, **kw)
    fake.add_contact(11, first_name="Анна", updated_at=BASE, phones=[(landline(11), "WORK"), (mobile(11), "MOB")],
                     lead_ids=[777])
    fake.add_contact(12, first_name="Борис", updated_at=BASE, phones=[(landline(12), "WORK"), (mobile(12), "MOB")],
                     lead_ids=[777])
    fake.add_lead(777, status_id=142, pipeline_id=7, price=1, updated_at=BASE, main_contact_id=12)
    fake.add_lead(778, status_id=142, pipeline_id=7, price=1, updated_at=BASE)

    def lead(i):
        return _event("amocrm", f"leads[status][0][id]={i}&leads[status][0][status_id]=142&leads[status][0][pipeline_id]=7".encode())

    events = {"deal": lead(777), "no_contacts": lead(778), "unknown": lead(999),
              "contact": _event("amocrm", b"contacts[update][0][id]=11&contacts[update][0][name]=x")}
    return fake, amo(fake), events


def bx_world(**kw):
    fake = bx_fake(n=0, **kw)
    for i in (11, 12):
        fake.add_contact(i, name=f"Имя{i}", modified=BASE, phones=[(landline(i), "WORK"), (mobile(i), "MOBILE")])
    fake.add_deal(777, contact_ids=[11, 12], primary=12)
    fake.add_deal(778)

    def deal(i, event="ONCRMDEALUPDATE"):
        return _event("bitrix24", f"event={event}&data[FIELDS][ID]={i}&ts=1767261600&auth[application_token]=t".encode())

    events = {"deal": deal(777), "no_contacts": deal(778), "unknown": deal(999), "contact": deal(11, "ONCRMCONTACTUPDATE")}
    return fake, bx(fake), events


def hs_world(**kw):
    fake = hs_fake(n=0, **kw)
    for i in (11, 12):
        fake.add_contact(i, modified_ms=BASE * 1000, firstname=f"Имя{i}", phone=landline(i), mobilephone=mobile(i),
                         hs_language="en" if i == 11 else "ru")
    fake.add_deal(777, contact_ids=[11, 12])
    fake.add_deal(778)

    def hook(i, sub="deal.propertyChange"):
        return _event("generic", {"type": sub, "subscriptionType": sub, "objectId": i, "propertyName": "dealstage",
                                  "propertyValue": "closedwon", "eventId": 100 + i, "portalId": 62515})

    events = {"deal": hook(777), "no_contacts": hook(778), "unknown": hook(999), "contact": hook(12, "contact.creation")}
    return fake, hs(fake), events


# vendor -> (world, customer of deal 777, customer of the contact event)
WORLDS = {
    "amocrm": (amo_world, {"crm_id": "12", "phone": mobile(12), "language": None},
               {"crm_id": "11", "phone": mobile(11), "language": None}),
    "bitrix24": (bx_world, {"crm_id": "12", "phone": mobile(12), "language": None},
                 {"crm_id": "11", "phone": mobile(11), "language": None}),
    "hubspot": (hs_world, {"crm_id": "11", "phone": mobile(11), "language": "en"},  # deals have no primary: the first
                {"crm_id": "12", "phone": mobile(12), "language": "ru"}),
}


@pytest.mark.parametrize("vendor", WORLDS)
def test_event_customer_of_a_deal_and_of_a_contact(vendor):
    world, of_deal, of_contact = WORLDS[vendor]
    fake, src, events = world()
    assert src.event_customer(*events["deal"]) == of_deal
    assert src.event_customer(*events["contact"]) == of_contact
    assert src.event_customer("order.created", "777", {}) is None  # not a CRM entity: nothing asked
    assert src.event_customer(events["deal"][0], None, {}) is None  # no id: nothing asked


def test_event_customer_requests_follow_the_vendor_docs():
    fake, src, events = amo_world()
    src.event_customer(*events["deal"])
    assert fake.log == [("GET", "/api/v4/leads/777"), ("GET", "/api/v4/contacts/12")]
    fake, src, events = bx_world()
    src.event_customer(*events["deal"])
    assert fake.log == ["crm.deal.get", "crm.contact.get"]
    fake, src, events = hs_world()
    src.event_customer(*events["deal"])
    assert fake.log == [("GET", "/crm/v4/objects/deals/777/associations/contacts"), ("GET", "/crm/v3/objects/contacts/11")]


@pytest.mark.parametrize("vendor", WORLDS)
def test_event_customer_is_none_without_contacts_or_entity(vendor):
    world, _, _ = WORLDS[vendor]
    fake, src, events = world()
    assert src.event_customer(*events["no_contacts"]) is None
    assert src.event_customer(*events["unknown"]) is None
    etype, _, fields = events["contact"]
    assert src.event_customer(etype, "999", fields) is None  # a contact that does not exist (204 / 400 / 404)


@pytest.mark.parametrize("vendor", WORLDS)
def test_event_customer_honours_retry_after_on_a_429(vendor):
    world, of_deal, _ = WORLDS[vendor]
    fake, src, events = world(retry_after="0.4")  # the blocks' own backoff here is 0.02 s
    if vendor == "bitrix24":
        fake.force_limit = 1  # 503 QUERY_LIMIT_EXCEEDED
    else:
        fake.force_429 = 1
    assert src.event_customer(*events["deal"]) == of_deal
    assert fake.throttled == 1
    assert fake.times[1] - fake.times[0] >= 0.38  # waited as told, not the 0.02 s backoff


@pytest.mark.parametrize("vendor", WORLDS)
def test_event_customer_with_a_rejected_token_is_a_source_error(vendor):
    world, _, _ = WORLDS[vendor]
    fake, good, events = world()
    if vendor == "bitrix24":
        bad = Bitrix24Crm(webhook_url=f"https://{fake.portal}/rest/1/not-the-secret-987/", source_name="bx")
        secret = "not-the-secret-987"
    else:
        secret = "wrong-token-for-lookups"
        bad = type(good)(**{**good.model_dump(), "access_token": secret})
    bad.with_transport(fake.transport())
    with pytest.raises(CrmSourceError) as e:
        bad.event_customer(*events["deal"])
    assert secret not in str(e.value)


def test_event_customer_gives_up_as_a_source_error_not_none():
    fake, src, events = amo_world()
    fake.force_429 = 100
    with pytest.raises(CrmSourceError, match="429"):
        amo(fake, max_retries=1).event_customer(*events["deal"])


def test_amocrm_lead_without_a_main_flag_takes_the_first_contact():
    fake, src, events = amo_world()
    del fake.leads[777]["_main_contact_id"]
    assert src.event_customer(*events["deal"])["crm_id"] == "11"


def test_bitrix24_lead_events_use_the_leads_contact_else_its_own_phone():
    fake, src, _ = bx_world()
    fake.add_lead(50, contact_id=12, phones=[("+7 903 000-00-50", "WORK")])
    fake.add_lead(51, phones=[("+7 903 000-00-51", "WORK"), ("+7 916 000-00-51", "MOBILE")])
    fake.add_lead(52)

    def lead(i):
        return _event("bitrix24", f"event=ONCRMLEADADD&data[FIELDS][ID]={i}&ts=1&auth[application_token]=t".encode())

    assert src.event_customer(*lead(50)) == {"crm_id": "12", "phone": mobile(12), "language": None}
    assert src.event_customer(*lead(51)) == {"crm_id": None, "phone": "+7 916 000-00-51", "language": None}
    assert src.event_customer(*lead(52)) is None


def test_hubspot_deal_whose_contact_was_deleted_is_none():
    fake, src, events = hs_world()
    fake.add_deal(779, contact_ids=[404])
    etype, _, fields = events["deal"]
    assert src.event_customer(etype, None, {**fields, "objectId": 779}) is None
    assert ("GET", "/crm/v3/objects/contacts/404") in fake.log
