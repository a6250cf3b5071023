"""journeys: one instance per (journey, entity), one step row per (instance, step)

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

IdType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JsonType = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "journey_instances",
        sa.Column("id", IdType, autoincrement=True, nullable=False),
        sa.Column("journey", sa.String(100), nullable=False),
        sa.Column("entity_id", sa.String(200), nullable=False),
        sa.Column("source", sa.String(100), nullable=True),
        sa.Column("contact_id", IdType, sa.ForeignKey("contacts.id", ondelete="SET NULL"), nullable=True),
        sa.Column("phone_e164", sa.String(20), nullable=True),
        sa.Column("language", sa.String(8), nullable=True),
        sa.Column("data", JsonType, nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("exit_reason", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("journey", "entity_id", name="uq_journey_instances_entity"),
    )
    op.create_index("ix_journey_instances_status", "journey_instances", ["status"])
    op.create_index("ix_journey_instances_contact", "journey_instances", ["contact_id"])
    op.create_table(
        "journey_steps",
        sa.Column("id", IdType, autoincrement=True, nullable=False),
        sa.Column("instance_id", IdType, sa.ForeignKey("journey_instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("outbox_key", sa.String(200), nullable=True),
        sa.Column("wake_run_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_id", "step", name="uq_journey_steps_step"),
    )
    op.create_index("ix_journey_steps_status_due", "journey_steps", ["status", "due_at"])


def downgrade() -> None:
    op.drop_table("journey_steps")
    op.drop_table("journey_instances")
