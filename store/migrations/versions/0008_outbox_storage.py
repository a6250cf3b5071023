"""PostgreSQL storage settings for the long-lived queue tables: outbox rows are updated several times
each (planned -> queued -> submitted -> final), so its pages keep 20 % free for the new row versions
(fillfactor 80: an update lands on the same page, and is HOT when no indexed column changes, e.g.
attempts, error, timestamps), and autovacuum visits it after 5 % of its rows changed instead of 20 %
(delivery receipts change most of a campaign within minutes). SQLite: nothing to set.

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = {
    "outbox": "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02",
    "delivery_receipts": "autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02",
    "contacts": "fillfactor = 90, autovacuum_analyze_scale_factor = 0.02",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, options in TABLES.items():
        op.execute(f"ALTER TABLE {table} SET ({options})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, options in TABLES.items():
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(o.split('=')[0].strip() for o in options.split(','))})")
