"""The store: SQLAlchemy 2 typed models.

All datetimes are naive UTC. The outbox is the source of truth for every message:
one row per idempotency key, states only move forward (see ``OutboxState``).
"""
from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")
# BigInteger ids on PostgreSQL, INTEGER PRIMARY KEY (rowid alias) on SQLite.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class ContactStatus(str, enum.Enum):
    new = "new"  # extracted, not validated yet
    valid = "valid"  # E.164 number that can receive SMS
    quarantined = "quarantined"  # bad phone; reason in phone_reason
    duplicate = "duplicate"  # merged into duplicate_of


class OutboxState(str, enum.Enum):
    planned = "planned"
    queued = "queued"
    submitted = "submitted"
    delivered = "delivered"
    undelivered = "undelivered"
    expired = "expired"
    rejected = "rejected"
    failed = "failed"


FINAL_STATES = frozenset(
    {OutboxState.delivered, OutboxState.undelivered, OutboxState.expired, OutboxState.rejected, OutboxState.failed}
)
STATE_RANK = {
    OutboxState.planned: 0,
    OutboxState.queued: 1,
    OutboxState.submitted: 2,
    **{s: 3 for s in FINAL_STATES},
}


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint("source", "crm_id", name="uq_contacts_source_crm_id"),
        Index("ix_contacts_source_status", "source", "status"),
        Index("ix_contacts_phone_e164", "phone_e164"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(100))
    crm_id: Mapped[str] = mapped_column(String(100))
    first_name: Mapped[str | None] = mapped_column(String(200))
    last_name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    phone_raw: Mapped[str | None] = mapped_column(String(100))
    phone_e164: Mapped[str | None] = mapped_column(String(20))
    phone_region: Mapped[str | None] = mapped_column(String(4))
    language: Mapped[str | None] = mapped_column(String(8))
    timezone: Mapped[str | None] = mapped_column(String(64))
    sms_consent: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_at: Mapped[datetime | None] = mapped_column(DateTime)
    consent_method: Mapped[str | None] = mapped_column(String(40))
    consent_source: Mapped[str | None] = mapped_column(String(100))
    consent_text_version: Mapped[str | None] = mapped_column(String(40))
    opted_out_at: Mapped[datetime | None] = mapped_column(DateTime)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    crm_updated_at: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(16), default=ContactStatus.new.value)
    status_reason: Mapped[str | None] = mapped_column(Text)
    duplicate_of: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    validated_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class Quarantine(Base):
    """A row a step could not use, kept with the reason (never silently dropped)."""

    __tablename__ = "quarantine"
    __table_args__ = (
        UniqueConstraint("step", "source", "row_key", name="uq_quarantine_step_source_key"),
        Index("ix_quarantine_campaign_contact", "campaign_id", "contact_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    step: Mapped[str] = mapped_column(String(40))
    source: Mapped[str] = mapped_column(String(100))
    row_key: Mapped[str] = mapped_column(String(200))
    campaign_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    reason_code: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class Watermark(Base):
    """Incremental extract position per CRM source."""

    __tablename__ = "watermarks"

    source: Mapped[str] = mapped_column(String(100), primary_key=True)
    mark: Mapped[str | None] = mapped_column(String(64))  # max updated-at seen, in the source's own format
    rows_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(100))
    segment: Mapped[str] = mapped_column(String(100))
    template_name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20), default="marketing")
    gateway: Mapped[str | None] = mapped_column(String(100))
    price_per_segment: Mapped[float] = mapped_column(Float, default=0.0)
    currency: Mapped[str] = mapped_column(String(3), default="RUB", server_default="RUB")  # of every cost
    status: Mapped[str] = mapped_column(String(20), default="created")
    params: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    policy: Mapped[dict[str, Any] | None] = mapped_column(JsonType)  # tasks.policy.ContactPolicy
    ends_at: Mapped[datetime | None] = mapped_column(DateTime)  # messages not sent by then expire
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Segment(Base):
    __tablename__ = "segments"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    definition: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    computed_at: Mapped[datetime | None] = mapped_column(DateTime)


class SegmentMembership(Base):
    # On PostgreSQL this table, the outbox and consent_changes have no foreign-key constraints (migration
    # 0009: a row-locking check per bulk-inserted row); tasks/erasure.py does what ON DELETE would.
    __tablename__ = "segment_memberships"

    segment: Mapped[str] = mapped_column(String(100), ForeignKey("segments.name", ondelete="CASCADE"), primary_key=True)
    contact_id: Mapped[int] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="CASCADE"), primary_key=True)
    rfm_score: Mapped[str | None] = mapped_column(String(3))


class Outbox(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_campaign_state", "campaign_id", "state", "id"),  # the claim: ORDER BY id LIMIT n
        Index("ix_outbox_campaign_contact", "campaign_id", "contact_id"),
        # receipts that name only the gateway's id; a message has one only once submitted (migration 0017)
        Index("ix_outbox_gateway_message_id", "gateway_message_id",
              postgresql_where=sql_text("gateway_message_id IS NOT NULL"),
              sqlite_where=sql_text("gateway_message_id IS NOT NULL")),
        # frequency caps at claim time: a contact's messages submitted lately, across all campaigns
        Index("ix_outbox_contact_submitted", "contact_id", "submitted_at",
              postgresql_where=sql_text("submitted_at IS NOT NULL"), sqlite_where=sql_text("submitted_at IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    campaign_id: Mapped[int] = mapped_column(IdType, ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    step: Mapped[str] = mapped_column(String(60), default="main")
    segment: Mapped[str | None] = mapped_column(String(100))
    phone_e164: Mapped[str | None] = mapped_column(String(20))
    language: Mapped[str | None] = mapped_column(String(8))
    text: Mapped[str | None] = mapped_column(Text)
    encoding: Mapped[str] = mapped_column(String(8))
    segments: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(12), default=OutboxState.planned.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    gateway: Mapped[str | None] = mapped_column(String(100))
    gateway_message_id: Mapped[str | None] = mapped_column(String(100))
    error_code: Mapped[str | None] = mapped_column(String(40))
    last_error: Mapped[str | None] = mapped_column(Text)
    send_after: Mapped[datetime | None] = mapped_column(DateTime)  # deferred by a send window or a cap
    hold_rule: Mapped[str | None] = mapped_column(String(40))  # the rule that deferred or held it
    variant: Mapped[str | None] = mapped_column(String(40))  # the A/B arm (smsflow/abtest.py)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claim_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    planned_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime)
    final_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class DeliveryReceipt(Base):
    """A delivery receipt exactly as received; applied to the outbox by reconcile."""

    __tablename__ = "delivery_receipts"
    __table_args__ = (
        Index("ix_receipts_unapplied", "received_at",  # only the backlog (migrations 0018, 0019), oldest first
              postgresql_where=sql_text("applied_at IS NULL"), sqlite_where=sql_text("applied_at IS NULL")),
        Index("ix_receipts_parked", "received_at",  # parked: naming no message (migration 0020), for retention
              postgresql_where=sql_text("applied_at IS NOT NULL AND outbox_id IS NULL"),
              sqlite_where=sql_text("applied_at IS NOT NULL AND outbox_id IS NULL")),
        Index("ix_receipts_gateway_msg", "gateway", "gateway_message_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    gateway: Mapped[str] = mapped_column(String(100))
    gateway_message_id: Mapped[str | None] = mapped_column(String(100))
    reference: Mapped[str | None] = mapped_column(String(200))  # our idempotency key, when the gateway echoes it
    status: Mapped[str] = mapped_column(String(20))  # normalized: accepted|enroute|delivered|undelivered|expired|rejected|unknown
    error_code: Mapped[str | None] = mapped_column(String(40))
    raw: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    event_at: Mapped[datetime | None] = mapped_column(DateTime)
    received_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    outbox_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("outbox.id", ondelete="SET NULL"))
    applied_at: Mapped[datetime | None] = mapped_column(DateTime)


class InboundMessage(Base):
    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    gateway: Mapped[str] = mapped_column(String(100))
    gateway_message_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    from_e164: Mapped[str | None] = mapped_column(String(20))
    to_address: Mapped[str | None] = mapped_column(String(40))
    text: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(String(12))  # stop|start|help|reply
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    raw: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    received_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)


class EventLog(Base):
    __tablename__ = "event_log"
    __table_args__ = (Index("ix_event_log_kind_ts", "kind", "ts"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    kind: Mapped[str] = mapped_column(String(60))
    campaign_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("campaigns.id", ondelete="CASCADE"))
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JsonType)


class ConsentChange(Base):
    """Audit log of every consent change: who, when, how, from what to what."""

    __tablename__ = "consent_changes"
    __table_args__ = (Index("ix_consent_changes_contact", "contact_id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    changed_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    change: Mapped[str] = mapped_column(String(20))  # granted | revoked | opted_out | opted_in | erased
    method: Mapped[str | None] = mapped_column(String(40))  # web_form | sms_keyword | call_centre | import | erasure
    source: Mapped[str | None] = mapped_column(String(100))
    text_version: Mapped[str | None] = mapped_column(String(40))
    details: Mapped[dict[str, Any] | None] = mapped_column(JsonType)


class Suppression(Base):
    """Salted hashes of erased numbers: a later import can never message them."""

    __tablename__ = "suppression_list"

    phone_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(40), default="erased")
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class CrmEvent(Base):
    """A CRM webhook event, stored before the 2xx; the dedup key makes a repeated delivery harmless."""

    __tablename__ = "crm_events"
    __table_args__ = (
        UniqueConstraint("source", "dedup_key", name="uq_crm_events_source_key"),
        # the journey engine's poll (``processed_at IS NULL ORDER BY id LIMIT n``) reads only what is left to do
        Index("ix_crm_events_unprocessed", "id", postgresql_where=sql_text("processed_at IS NULL"),
              sqlite_where=sql_text("processed_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(100))
    dedup_key: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(100))  # e.g. order.created, deal.stage_changed
    entity_id: Mapped[str | None] = mapped_column(String(100))
    payload: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    received_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)


class CrmWriteback(Base):
    """What was (to be) written back to the CRM: one row per key, so a rerun never writes twice."""

    __tablename__ = "crm_writebacks"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    source: Mapped[str] = mapped_column(String(100))
    crm_id: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))  # delivery | opt_out | reply
    text: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending | done | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    crm_ref: Mapped[str | None] = mapped_column(String(100))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())
    done_at: Mapped[datetime | None] = mapped_column(DateTime)


class JourneyInstance(Base):
    """One run of a journey for one entity (an order, a deal, or a contact on a date):
    unique per (journey, entity), so a repeated trigger starts nothing twice. ``data`` is the
    entity's current CRM data, merged from its events; conditions are evaluated against it."""

    __tablename__ = "journey_instances"
    __table_args__ = (
        UniqueConstraint("journey", "entity_id", name="uq_journey_instances_entity"),
        Index("ix_journey_instances_status", "status"),
        Index("ix_journey_instances_contact", "contact_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    journey: Mapped[str] = mapped_column(String(100))
    entity_id: Mapped[str] = mapped_column(String(200))
    source: Mapped[str | None] = mapped_column(String(100))
    contact_id: Mapped[int | None] = mapped_column(IdType, ForeignKey("contacts.id", ondelete="SET NULL"))
    phone_e164: Mapped[str | None] = mapped_column(String(20))
    language: Mapped[str | None] = mapped_column(String(8))
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    status: Mapped[str] = mapped_column(String(12))  # active | completed | exited
    exit_reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)


class JourneyStep(Base):
    """A step of an instance, due at ``due_at``: scheduled -> planned (in the outbox, key
    ``outbox_key``) | skipped (condition false) | cancelled (the journey exited) | failed
    (template error). Unique per (instance, step): at most one message per step, ever."""

    __tablename__ = "journey_steps"
    __table_args__ = (
        UniqueConstraint("instance_id", "step", name="uq_journey_steps_step"),
        Index("ix_journey_steps_status_due", "status", "due_at"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(IdType, ForeignKey("journey_instances.id", ondelete="CASCADE"))
    step: Mapped[str] = mapped_column(String(100))
    due_at: Mapped[datetime] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String(12))
    reason: Mapped[str | None] = mapped_column(Text)
    outbox_key: Mapped[str | None] = mapped_column(String(200))
    wake_run_id: Mapped[str | None] = mapped_column(String(64))  # the Prefect flow run scheduled for due_at
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Lease(Base):
    """A named lock that expires unless its holder renews it (``store.leases``): whatever a dead
    process held is free again ``ttl`` seconds after its last renewal."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class CampaignShard(Base):
    """A piece of a campaign run as its own flow run in distributed mode (``tasks/shards.py``): a render
    shard is a contact-id range, marked done in the transaction that writes its messages; a send shard is
    one sender (gateway bind). ``attempts`` names the shard's deployment run (its idempotency key)."""

    __tablename__ = "campaign_shards"

    campaign_id: Mapped[int] = mapped_column(IdType, ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[str] = mapped_column(String(20), primary_key=True)  # 'render' | 'send'
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    lo_id: Mapped[int | None] = mapped_column(IdType)  # contact ids lo_id..hi_id (render)
    hi_id: Mapped[int | None] = mapped_column(IdType)
    contacts: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20), default="pending")  # pending | done
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    flow_run_id: Mapped[str | None] = mapped_column(String(40))
    stats: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    done_at: Mapped[datetime | None] = mapped_column(DateTime)


class ShortLink(Base):
    """A recipient's tracked link (``smsflow/links.py``), written with its message."""

    __tablename__ = "short_links"

    code: Mapped[str] = mapped_column(String(16), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(IdType)  # ix_short_links_campaign (migration 0011)
    contact_id: Mapped[int | None] = mapped_column(IdType)
    outbox_key: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Click(Base):
    """Every request to a short link, stored before the redirect; ``bot_reason`` NULL = a person."""

    __tablename__ = "clicks"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(16))  # ix_clicks_code (migration 0011)
    at: Mapped[datetime] = mapped_column(DateTime)
    method: Mapped[str] = mapped_column(String(8))
    user_agent: Mapped[str | None] = mapped_column(String(500))
    ip_hash: Mapped[str | None] = mapped_column(String(64))
    bot_reason: Mapped[str | None] = mapped_column(String(20))


class Order(Base):
    """An order/deal from the CRM (``tasks/orders.py``); ``revenue`` is False once refunded or cancelled."""

    __tablename__ = "orders"
    __table_args__ = (UniqueConstraint("source", "crm_order_id", name="uq_orders_source_crm_id"),
                      Index("ix_orders_contact_time", "contact_id", "ordered_at"))

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(100))
    crm_order_id: Mapped[str] = mapped_column(String(100))
    crm_contact_id: Mapped[str | None] = mapped_column(String(100))
    contact_id: Mapped[int | None] = mapped_column(IdType)
    amount: Mapped[float] = mapped_column(Float)
    currency: Mapped[str] = mapped_column(String(3), default="RUB")
    status: Mapped[str] = mapped_column(String(40))
    revenue: Mapped[bool] = mapped_column(Boolean)
    ordered_at: Mapped[datetime] = mapped_column(DateTime)
    stored_at: Mapped[datetime] = mapped_column(DateTime)


class ABTestRow(Base):
    """A campaign's A/B test (``tasks/abtest.py``): its design, phase and the one decision."""

    __tablename__ = "ab_tests"

    campaign_id: Mapped[int] = mapped_column(IdType, primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)  # smsflow.abtest.ABTest
    phase: Mapped[str] = mapped_column(String(20))  # test | decided | rolled_out
    started_at: Mapped[datetime] = mapped_column(DateTime)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime)
    winner: Mapped[str | None] = mapped_column(String(40))
    verdict: Mapped[str | None] = mapped_column(Text)


class ABLook(Base):
    """One look of the sequential test, with every number it used (the decision log)."""

    __tablename__ = "ab_looks"
    __table_args__ = (Index("ix_ab_looks_campaign", "campaign_id", "id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    campaign_id: Mapped[int] = mapped_column(IdType)
    at: Mapped[datetime] = mapped_column(DateTime)
    winner: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    numbers: Mapped[dict[str, Any]] = mapped_column(JsonType)


class ABMember(Base):
    """A contact kept out of the campaign by its test's holdout."""

    __tablename__ = "ab_members"

    campaign_id: Mapped[int] = mapped_column(IdType, primary_key=True)
    contact_id: Mapped[int] = mapped_column(IdType, primary_key=True)
    phone_e164: Mapped[str | None] = mapped_column(String(20))
    arm: Mapped[str] = mapped_column(String(40))
    assigned_at: Mapped[datetime] = mapped_column(DateTime)
