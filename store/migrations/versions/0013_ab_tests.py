"""A/B tests (smsflow/abtest.py, tasks/abtest.py): the arm of every message (outbox.variant), the test
and its decision (ab_tests: one row per campaign, decided once), every look with its numbers
(ab_looks), and the holdout's members (ab_members: they get nothing, for the incremental lift).

Revision ID: 0013
Revises: 0012
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("outbox") as b:
        b.add_column(sa.Column("variant", sa.String(40), nullable=True))
    op.create_table(
        "ab_tests",
        sa.Column("campaign_id", IdType, primary_key=True),
        sa.Column("spec", JsonType, nullable=False),
        sa.Column("phase", sa.String(20), nullable=False),  # test | decided | rolled_out
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("winner", sa.String(40), nullable=True),
        sa.Column("verdict", sa.Text(), nullable=True),
    )
    op.create_table(
        "ab_looks",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("campaign_id", IdType, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("winner", sa.String(40), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("numbers", JsonType, nullable=False),
    )
    op.create_index("ix_ab_looks_campaign", "ab_looks", ["campaign_id", "id"])
    op.create_table(
        "ab_members",
        sa.Column("campaign_id", IdType, primary_key=True),
        sa.Column("contact_id", IdType, primary_key=True),
        sa.Column("phone_e164", sa.String(20), nullable=True),
        sa.Column("arm", sa.String(40), nullable=False),
        sa.Column("assigned_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ab_members")
    op.drop_table("ab_looks")
    op.drop_table("ab_tests")
    with op.batch_alter_table("outbox") as b:
        b.drop_column("variant")
