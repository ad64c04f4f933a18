"""Each score keeps the small record its answer adds to the host's pooled evidence
(`scores.pooled`: the log-prob statistic and its log-MGF, the tokens beyond the support's
edge, or a greedy answer's tokens off the reference's argmax), so that the reputation
refresh reads it without the score's much larger metrics. Scores stored before have none
(they add nothing to the pooled evidence).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("scores", sa.Column("pooled", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.drop_column("pooled")
