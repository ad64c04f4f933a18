"""Initial schema: hosts, probes, dispatches, scores, host_rounds, reputation_events, feedback.

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = "'new', 'trusted', 'probation', 'flagged', 'disabled'"
VERDICTS = "'pass', 'fail', 'inconclusive', 'error'"


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _table(name: str, *columns, key: tuple[str, ...] = ()) -> None:
    """Create a table whose primary key is `key`, or else a leading integer `id`."""
    ident = () if key else (sa.Column("id", sa.Integer(), autoincrement=True),)
    op.create_table(name, *ident, *columns,
                    sa.PrimaryKeyConstraint(*(key or ("id",)), name=f"pk_{name}"))


def _probe_fk(table: str) -> sa.Column:
    return sa.Column("probe_id", sa.String(64),
                     sa.ForeignKey("probes.id", name=f"fk_{table}_probe_id_probes"), nullable=False)


def _host_fk(table: str) -> sa.Column:
    return sa.Column("host_id", sa.Integer(),
                     sa.ForeignKey("hosts.id", name=f"fk_{table}_host_id_hosts"), nullable=False)


def upgrade() -> None:
    _table(
        "hosts",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("token_env", sa.String(128), nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="new"),
        sa.Column("score", sa.Double(), nullable=True),
        _when("added_at"),
        _when("removed_at", nullable=True),
        _when("flagged_since", nullable=True),
        _when("last_seen", nullable=True),
        sa.UniqueConstraint("name", name="uq_hosts_name"),
        sa.CheckConstraint(f"state IN ({STATES})", name="ck_hosts_state"),
    )
    _table(
        "probes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        _host_fk("probes"),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.String(128), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("configs", sa.JSON(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        _when("created_at"),
        sa.UniqueConstraint("round", "host_id", "index", name="uq_probes_round_host_id_index"),
        key=("id",),
    )
    op.create_index("ix_probes_host_id", "probes", ["host_id"])
    _table(
        "dispatches",
        _probe_fk("dispatches"),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("ttfb_s", sa.Double(), nullable=True),
        sa.Column("total_s", sa.Double(), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("served_by", sa.String(256), nullable=True),
        _when("finished_at"),
        sa.Column("validator", sa.String(128), nullable=False),
        sa.Column("score_owner", sa.String(128), nullable=True),
        _when("score_lease_until", nullable=True),
        sa.UniqueConstraint("probe_id", name="uq_dispatches_probe_id"),
    )
    op.create_index("ix_dispatches_finished_at", "dispatches", ["finished_at"])
    _table(
        "scores",
        _probe_fk("scores"),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("p_value", sa.Double(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _when("scored_at"),
        sa.Column("validator", sa.String(128), nullable=False),
        sa.UniqueConstraint("probe_id", name="uq_scores_probe_id"),
        sa.CheckConstraint(f"verdict IN ({VERDICTS})", name="ck_scores_verdict"),
    )
    _table(
        "host_rounds",
        _host_fk("host_rounds"),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        _when("lease_until"),
        _when("done_at", nullable=True),
        key=("host_id", "round"),
    )
    op.create_index("ix_host_rounds_round", "host_rounds", ["round"])
    _table(
        "reputation_events",
        _host_fk("reputation_events"),
        _when("at"),
        sa.Column("state_from", sa.String(16), nullable=False),
        sa.Column("state_to", sa.String(16), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_reputation_events_host_id_at", "reputation_events", ["host_id", "at"])
    _table(
        "feedback",
        _probe_fk("feedback"),
        sa.Column("rating", sa.Double(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        _when("at"),
    )
    op.create_index("ix_feedback_probe_id", "feedback", ["probe_id"])


def downgrade() -> None:
    for table in ("feedback", "reputation_events", "host_rounds", "scores", "dispatches",
                  "probes", "hosts"):
        op.drop_table(table)
