"""quarantine indexed by (campaign_id, contact_id): the campaign funnel asks, per contact, whether its
message failed to render; without it that is a scan of every render failure per contact

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_quarantine_campaign_contact", "quarantine", ["campaign_id", "contact_id"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_campaign_contact", table_name="quarantine")
