"""The outbox's index of gateway message ids holds only the messages that have one.

Receipts that carry no reference of ours are matched on ``gateway_message_id`` (``tasks.reconcile``); a
message gets that id only when it is submitted, yet every planned and every claimed message had an entry
(NULL) written into this index: once when it was planned, again when it was claimed (the claim's new row
version is not HOT: it changes ``state``). Partial (WHERE gateway_message_id IS NOT NULL), planning and
claiming write nothing into it; the join on ``o.gateway_message_id = r.gateway_message_id`` implies the
predicate on both stores, so the receipts still find their messages through it
(``tests/tasks/test_reconcile.py`` checks the plan). Rebuilding it locks writes to the outbox while it is
built: run the migration outside a send.

Revision ID: 0017
Revises: 0016
"""
import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_WHERE = sa.text("gateway_message_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_outbox_gateway_message_id", table_name="outbox")
    op.create_index("ix_outbox_gateway_message_id", "outbox", ["gateway_message_id"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_outbox_gateway_message_id", table_name="outbox")
    op.create_index("ix_outbox_gateway_message_id", "outbox", ["gateway_message_id"])
