"""contact policy: send windows, holds, campaign end, consent audit, suppression list

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("contacts") as b:
        b.add_column(sa.Column("consent_text_version", sa.String(40), nullable=True))
    with op.batch_alter_table("campaigns") as b:
        b.add_column(sa.Column("policy", JsonType, nullable=True))
        b.add_column(sa.Column("ends_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("outbox") as b:
        b.add_column(sa.Column("send_after", sa.DateTime(), nullable=True))
        b.add_column(sa.Column("hold_rule", sa.String(40), nullable=True))
    op.create_table(
        "consent_changes",
        sa.Column("id", IdType, autoincrement=True, nullable=False),
        sa.Column("contact_id", IdType, nullable=True),
        sa.Column("changed_at", sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False),
        sa.Column("change", sa.String(20), nullable=False),
        sa.Column("method", sa.String(40), nullable=True),
        sa.Column("source", sa.String(100), nullable=True),
        sa.Column("text_version", sa.String(40), nullable=True),
        sa.Column("details", JsonType, nullable=True),
        sa.ForeignKeyConstraint(["contact_id"], ["contacts.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_consent_changes_contact", "consent_changes", ["contact_id"])
    op.create_table(
        "suppression_list",
        sa.Column("phone_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False),
        sa.PrimaryKeyConstraint("phone_hash"),
    )


def downgrade() -> None:
    op.drop_table("suppression_list")
    op.drop_index("ix_consent_changes_contact", table_name="consent_changes")
    op.drop_table("consent_changes")
    with op.batch_alter_table("outbox") as b:
        b.drop_column("hold_rule")
        b.drop_column("send_after")
    with op.batch_alter_table("campaigns") as b:
        b.drop_column("ends_at")
        b.drop_column("policy")
    with op.batch_alter_table("contacts") as b:
        b.drop_column("consent_text_version")
