"""The index of unapplied receipts is ordered by arrival, so receipts that name no message can be found by age.

Reconcile parks a receipt that still names no message an hour after it arrived (``tasks.reconcile.ORPHAN_AFTER``):
until now such receipts (another sender on the same Kannel, messages sent by hand, erased messages) stayed
unapplied for ever and every apply pass joined all of them against the outbox again. The index keeps its name and
its predicate (``WHERE applied_at IS NULL``, migration 0018) and now holds ``received_at``: the apply's join reads
it whole as before, and the parking reads only its oldest entries. Building it reads the whole table and locks
writes to it (the callback service waits meanwhile): run the migration outside a send.

Revision ID: 0019
Revises: 0018
"""
import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_WHERE = sa.text("applied_at IS NULL")


def upgrade() -> None:
    op.drop_index("ix_receipts_unapplied", table_name="delivery_receipts")
    op.create_index("ix_receipts_unapplied", "delivery_receipts", ["received_at"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_receipts_unapplied", table_name="delivery_receipts")
    op.create_index("ix_receipts_unapplied", "delivery_receipts", ["applied_at"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)
