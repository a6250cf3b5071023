"""campaign_shards: the pieces of a campaign run as separate flow runs in distributed mode.

A render shard is a contact-id range of one campaign; it is marked done in the same transaction
that writes its messages, so a shard is done exactly once whatever reruns it. ``attempts`` names
the deployment run of the shard (idempotency key ``smsflow:<campaign>:<step>:<shard>:<attempts>``):
rerunning the parent finds the same run, and a crashed run is replaced by the next attempt.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "campaign_shards",
        sa.Column("campaign_id", IdType, sa.ForeignKey("campaigns.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.String(20), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("lo_id", IdType, nullable=True),
        sa.Column("hi_id", IdType, nullable=True),
        sa.Column("contacts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("state", sa.String(20), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("flow_run_id", sa.String(40), nullable=True),
        sa.Column("stats", sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("done_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("campaign_id", "step", "shard"),
    )


def downgrade() -> None:
    op.drop_table("campaign_shards")
