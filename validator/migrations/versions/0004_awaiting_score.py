"""Answers awaiting a score, indexed: claiming the next batch to score and counting the
queue read only those, not every answer ever stored (which a months-old database has
millions of; the claim used to walk all of them, checking each for a score). And scores
indexed by time, for the status's last score.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dispatches", sa.Column("awaiting_score", sa.Boolean(), nullable=False,
                                          server_default=sa.false()))
    op.execute(sa.text("UPDATE dispatches SET awaiting_score = :yes WHERE ok = :yes AND NOT EXISTS "
                       "(SELECT 1 FROM scores WHERE scores.probe_id = dispatches.probe_id)")
               .bindparams(yes=True))
    op.create_index("ix_dispatches_awaiting_score", "dispatches", ["finished_at", "id"],
                    sqlite_where=sa.text("awaiting_score = 1"),
                    postgresql_where=sa.text("awaiting_score"))
    op.create_index("ix_scores_scored_at", "scores", ["scored_at"])


def downgrade() -> None:
    op.drop_index("ix_scores_scored_at", table_name="scores")
    op.drop_index("ix_dispatches_awaiting_score", table_name="dispatches")
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_column("awaiting_score")
