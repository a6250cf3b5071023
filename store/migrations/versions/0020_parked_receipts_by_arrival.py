"""An index of the parked receipts (applied, naming no message), ordered by arrival, for their retention.

Reconcile parks a receipt that still names no message an hour after it arrived (migration 0019). Such receipts
keep their raw payload (which can carry a phone number) and belong to no campaign, so archiving campaigns never
removed them. ``smsflow archive`` now deletes those older than its ``--older-than-days``, oldest first, in short
transactions; this partial index holds only them (an apply moves a receipt to its message, never into it), so
the deletion reads no other receipt. Building it reads the whole table and locks writes to it: run the migration
outside a send.

Revision ID: 0020
Revises: 0019
"""
import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

_WHERE = sa.text("applied_at IS NOT NULL AND outbox_id IS NULL")


def upgrade() -> None:
    op.create_index("ix_receipts_parked", "delivery_receipts", ["received_at"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_receipts_parked", table_name="delivery_receipts")
