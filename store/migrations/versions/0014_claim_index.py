"""The claim's index: outbox (campaign_id, state, id) instead of (campaign_id, state).

A claim takes a campaign's first planned messages in id order (``ORDER BY id LIMIT n``). With
(campaign_id, state) the database read every planned message of the campaign and sorted them for
each claim (a 1M-message campaign: 100 claims of 10,000, each reading up to 1M index entries); with
the id in the index the claim reads the entries in order and stops after n. Every query that used the
old index (campaign_id, or campaign_id and state) uses the new one the same way.

Revision ID: 0014
Revises: 0013
"""
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_outbox_campaign_state", table_name="outbox")
    op.create_index("ix_outbox_campaign_state", "outbox", ["campaign_id", "state", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_campaign_state", table_name="outbox")
    op.create_index("ix_outbox_campaign_state", "outbox", ["campaign_id", "state"])
