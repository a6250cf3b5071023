"""An index of each contact's submitted messages: outbox (contact_id, submitted_at) WHERE submitted_at IS NOT NULL.

A claim of a campaign with frequency caps reads, for the contacts it took, what they were sent lately across
all campaigns (``tasks.policy.enforce_at_claim``: ``contact_id IN (...) AND submitted_at > :since``). No
index began with contact_id, so that read was a sequential scan of the whole outbox on PostgreSQL and on
SQLite, once per claim: 203-253 ms per claim of 2,500 at 1,000,000 outbox rows of 200 campaigns (PostgreSQL,
EXPLAIN ANALYZE), growing with the store's history; with this index, 5.5-8 ms. Partial: a message not yet
submitted (planned, queued: what a claim writes) has no entry, so claims do not maintain it.

Revision ID: 0016
Revises: 0015
"""
import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_WHERE = sa.text("submitted_at IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_outbox_contact_submitted", "outbox", ["contact_id", "submitted_at"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_outbox_contact_submitted", table_name="outbox")
