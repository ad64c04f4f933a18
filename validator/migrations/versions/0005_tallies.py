"""Running totals per host (`tallies`), counted as answers and scores are stored, so that
the host list and /metrics stop aggregating every answer ever stored; filled here from
the rows already stored.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# validator.store.SCORING_LATENCY_BUCKETS as of this revision (a migration is a snapshot)
BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)

COUNTS = {  # tally name (SQL) -> FROM/WHERE of what it counts, per host
    "'probes'": "probes p",
    "'calls'": "dispatches d JOIN probes p ON p.id = d.probe_id",
    "'failed'": "dispatches d JOIN probes p ON p.id = d.probe_id WHERE d.ok = :no",
    "'error:' || d.error": "dispatches d JOIN probes p ON p.id = d.probe_id WHERE d.error IS NOT NULL",
    "'scored'": "scores s JOIN probes p ON p.id = s.probe_id",
}


def _bucket(seconds: float) -> str:
    bound = next((b for b in BUCKETS if seconds <= b), None)
    return f"latency_le:{'+Inf' if bound is None else repr(bound)}"


def upgrade() -> None:
    tallies = op.create_table(
        "tallies",
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(96), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name="fk_tallies_host_id_hosts"),
        sa.PrimaryKeyConstraint("host_id", "name", name="pk_tallies"),
    )
    conn = op.get_bind()
    for name, source in COUNTS.items():
        group = "p.host_id" + (", d.error" if "d.error" in name else "")
        stmt = sa.text(f"INSERT INTO tallies (host_id, name, value) SELECT p.host_id, {name}, "
                       f"count(*) FROM {source} GROUP BY {group}")
        conn.execute(stmt.bindparams(no=False) if ":no" in source else stmt)
    if conn.dialect.name == "sqlite":
        seconds = "(julianday(s.scored_at) - julianday(d.finished_at)) * 86400.0"
    else:
        seconds = "extract(epoch from s.scored_at - d.finished_at)"
    latency: dict[tuple[int, str], float] = {}
    rows = conn.execute(sa.text(f"SELECT p.host_id, {seconds} FROM scores s "
                                "JOIN dispatches d ON d.probe_id = s.probe_id "
                                "JOIN probes p ON p.id = s.probe_id"))
    for host_id, sec in rows:
        sec = float(sec)
        for name, amount in (("latency_count", 1.0), ("latency_sum_s", sec), (_bucket(sec), 1.0)):
            latency[host_id, name] = latency.get((host_id, name), 0.0) + amount
    if latency:
        op.bulk_insert(tallies, [{"host_id": h, "name": n, "value": v} for (h, n), v in latency.items()])


def downgrade() -> None:
    op.drop_table("tallies")
