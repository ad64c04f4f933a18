"""Each answer carries its host (copied from its probe) and is indexed by host and time:
a host's newest answers (the answers page, the API) and its whole history in order (the
reputation refresh after every scoring batch) are one index range, not a sort of every
answer the host ever gave.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dispatches", sa.Column("host_id", sa.Integer(), nullable=True))
    op.execute("UPDATE dispatches SET host_id = "
               "(SELECT probes.host_id FROM probes WHERE probes.id = dispatches.probe_id)")
    # SQLite cannot add NOT NULL or a foreign key in place: batch mode copies the table
    # (its indexes, the partial one's predicate included, are re-created with it)
    with op.batch_alter_table("dispatches") as batch:
        batch.alter_column("host_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_dispatches_host_id_hosts", "hosts", ["host_id"], ["id"])
    op.create_index("ix_dispatches_host_id_finished_at_id", "dispatches", ["host_id", "finished_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_dispatches_host_id_finished_at_id", table_name="dispatches")
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_constraint("fk_dispatches_host_id_hosts", type_="foreignkey")
        batch.drop_column("host_id")
