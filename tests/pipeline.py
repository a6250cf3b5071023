"""Builders shared by the step tests: a CRM export loaded, a campaign planned, a batch submitted."""
from __future__ import annotations

from sqlalchemy import text

from blocks.gateway import SandboxGateway
from smsflow.ratelimit import TokenBucket
from smsflow.templates import MessageTemplate
from store.db import utcnow
from tasks.accounting import ensure_campaign
from tasks.policy import always_open
from tasks.render import plan_messages
from tasks.segment import ALL, build_membership
from tasks.send import send_messages
from tests.helpers import contact, load_csv, write_csv

TPL = MessageTemplate(name="promo", variants={"ru": "{{ first_name | default('клиент') }}, скидка 10%!",
                                              "en": "{{ first_name | default('friend') }}, 10% off!"})


def q(engine, sql: str, **p):
    with engine.begin() as c:
        return c.execute(text(sql), p).scalar()


def _base(tmp_path, n=40, over=None):
    over = over or {}
    rows = [contact(i, **over.get(i, {})) for i in range(n)]
    return write_csv(tmp_path / "crm.csv", rows)


def _planned(engine, tmp_path, n=30, template=TPL, over=None):
    path = _base(tmp_path, n, over)
    load_csv(engine, path)
    build_membership(engine, "test", ALL, utcnow())
    cid = ensure_campaign(engine, name="camp", source="test", segment="all", template_name=template.name,
                          kind=template.kind, gateway="sandbox", price_per_segment=2.0,
                          policy=always_open().model_dump(mode="json"))
    stats = plan_messages(engine, campaign_id=cid, source="test", segment="all", template=template,
                          price_per_segment=2.0, gateway="sandbox")
    return cid, stats


def _gw(tmp_path, **kw) -> SandboxGateway:
    kw.setdefault("min_delay_s", 0.0)
    kw.setdefault("max_delay_s", 0.0)
    return SandboxGateway(state_path=str(tmp_path / "gw.sqlite"), **kw)


def _submitted(engine, tmp_path, n=20, **gw_kw):
    cid, _ = _planned(engine, tmp_path, n)
    gw = _gw(tmp_path, rejected_rate=0.0, **gw_kw)
    send_messages(engine, campaign_id=cid, gateway=gw, bucket=TokenBucket(10_000), claimer="a", max_messages=10_000)
    return cid, gw

