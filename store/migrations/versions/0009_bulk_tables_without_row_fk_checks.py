"""PostgreSQL: no foreign-key checks on the tables our steps fill in bulk (segment memberships, the
outbox, consent changes). PostgreSQL checks a foreign key per inserted row with a
``SELECT ... FOR KEY SHARE`` on the referenced row (a row lock, which dirties the referenced page):
inserting 840,000 memberships took 6.3 s with the two keys and 1.2 s without (measured here). These
rows are written only by our steps from rows they have just read in the same transaction, and the one
place that deletes contacts (``tasks/erasure.py``) removes or anonymises what refers to them itself, in
its transaction; campaigns and segments are never deleted. SQLite keeps its keys (checked there by an
index lookup, no lock).

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

KEYS = {  # table -> (column, referenced table, ON DELETE) of the keys dropped
    "segment_memberships": [("contact_id", "contacts", "CASCADE"), ("segment", "segments", "CASCADE")],
    "outbox": [("contact_id", "contacts", "SET NULL"), ("campaign_id", "campaigns", "CASCADE")],
    "consent_changes": [("contact_id", "contacts", "SET NULL")],
}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    insp = sa.inspect(bind)
    for table, keys in KEYS.items():
        columns = {c for c, _, _ in keys}
        for fk in insp.get_foreign_keys(table):
            if fk.get("name") and len(fk["constrained_columns"]) == 1 and fk["constrained_columns"][0] in columns:
                op.drop_constraint(fk["name"], table, type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, keys in KEYS.items():
        for column, ref, on_delete in keys:
            key = "name" if ref == "segments" else "id"
            op.create_foreign_key(f"{table}_{column}_fkey", table, ref, [column], [key], ondelete=on_delete)
