"""orders: orders/deals from the CRM (incremental, upserted by CRM id: a refund or cancellation
re-read from the CRM turns an order's revenue off), for conversion attribution (tasks/attribution.py).

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", IdType, primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("crm_order_id", sa.String(100), nullable=False),
        sa.Column("crm_contact_id", sa.String(100), nullable=True),
        sa.Column("contact_id", IdType, nullable=True),
        sa.Column("amount", sa.Float(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False, server_default="RUB"),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("revenue", sa.Boolean(), nullable=False),  # counts as a sale (paid/shipped/...; not refunded)
        sa.Column("ordered_at", sa.DateTime(), nullable=False),
        sa.Column("stored_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("source", "crm_order_id", name="uq_orders_source_crm_id"),
    )
    op.create_index("ix_orders_contact_time", "orders", ["contact_id", "ordered_at"])


def downgrade() -> None:
    op.drop_table("orders")
