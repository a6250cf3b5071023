"""short_links and clicks: tracked links of rendered messages and every request to them.

A short link is written with its message (the render transaction); a click is written before the
service answers the redirect. IPs are stored as a keyed hash only.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "short_links",
        sa.Column("code", sa.String(16), primary_key=True),
        sa.Column("campaign_id", IdType, nullable=False),
        sa.Column("contact_id", IdType, nullable=True),
        sa.Column("outbox_key", sa.String(200), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_short_links_campaign", "short_links", ["campaign_id"])
    op.create_table(
        "clicks",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("code", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("user_agent", sa.String(500), nullable=True),
        sa.Column("ip_hash", sa.String(64), nullable=True),
        sa.Column("bot_reason", sa.String(20), nullable=True),  # NULL: a person's click (see smsflow/links.py)
    )
    op.create_index("ix_clicks_code", "clicks", ["code"])


def downgrade() -> None:
    op.drop_table("clicks")
    op.drop_table("short_links")
