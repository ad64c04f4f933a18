"""Every score says what produced it: a `provenances` table (one row per distinct body:
the reference checkpoint's identity, the calibration file's hash, the verdict rule, the
validator's version) and `scores.provenance_id`. Scores stored before have none.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provenances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_provenances"),
        sa.UniqueConstraint("digest", name="uq_provenances_digest"),
    )
    # SQLite cannot add a foreign key in place: batch mode copies the scores table there
    # (once, at upgrade); PostgreSQL alters it in place.
    with op.batch_alter_table("scores") as batch:
        batch.add_column(sa.Column("provenance_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_scores_provenance_id_provenances", "provenances", ["provenance_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("scores") as batch:
        batch.drop_constraint("fk_scores_provenance_id_provenances", type_="foreignkey")
        batch.drop_column("provenance_id")
    op.drop_table("provenances")
