"""Applying receipts writes less: no foreign-key check on ``delivery_receipts.outbox_id`` (PostgreSQL) and
the index of unapplied receipts holds only those (both stores).

Reconcile sets ``outbox_id`` on every receipt it applies, from the outbox row it has just joined in the
same transaction. PostgreSQL checked the key per updated receipt with a ``SELECT ... FOR KEY SHARE`` on
the message (a row lock, which dirties the message's page): 3.8-4.0 s of each pass of 500,000 receipts,
about 8 s of the 46 s that 1M receipts took to apply (``EXPLAIN ANALYZE``: ``bench/notes/postgresql-receipts.md``).
Messages are deleted only by the archive job, which deletes their receipts first in the same transaction
(``tasks/archive.py``). SQLite keeps its key (an index lookup, no lock).

``ix_receipts_unapplied`` indexed ``applied_at`` of every receipt ever stored; only the unapplied ones are
looked up (``WHERE applied_at IS NULL``). Partial now: an applied receipt's new row version writes nothing
into it, and it stays as small as the backlog. Building it reads the whole table and locks writes to it (the
callback service waits meanwhile): run the migration outside a send.

Revision ID: 0018
Revises: 0017
"""
import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

_WHERE = sa.text("applied_at IS NULL")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for fk in sa.inspect(bind).get_foreign_keys("delivery_receipts"):
            if fk.get("name") and fk["constrained_columns"] == ["outbox_id"]:
                op.drop_constraint(fk["name"], "delivery_receipts", type_="foreignkey")
    op.drop_index("ix_receipts_unapplied", table_name="delivery_receipts")
    op.create_index("ix_receipts_unapplied", "delivery_receipts", ["applied_at"],
                    postgresql_where=_WHERE, sqlite_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_receipts_unapplied", table_name="delivery_receipts")
    op.create_index("ix_receipts_unapplied", "delivery_receipts", ["applied_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.create_foreign_key("delivery_receipts_outbox_id_fkey", "delivery_receipts", "outbox", ["outbox_id"], ["id"],
                              ondelete="SET NULL")
