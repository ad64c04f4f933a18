"""Storage: hosts, probes, answers (dispatches), scores and reputation history.

SQLAlchemy 2.0 typed models; the schema is owned by the Alembic migrations in
`validator/migrations/`. `upgrade(url)` brings a database to head (a no-op when it is
current); `Store` never creates tables itself.

Backends
- SQLite (`sqlite:///path.db`, see `Store.default_url`): WAL journal, foreign keys on,
  30 s busy timeout. A read-write transaction starts with BEGIN IMMEDIATE, so processes
  sharing one file serialise their writes: that is what makes the claims below exclusive
  (SQLite has no SKIP LOCKED).
- PostgreSQL (`postgresql+psycopg://...`): the deployment for several validators. Claims
  lock rows with `SELECT ... FOR UPDATE SKIP LOCKED`, and every "write once" insert uses
  `INSERT ... ON CONFLICT DO NOTHING`, so two writers never both win.

Conventions
- Every method runs in its own transaction and has committed when it returns. One Store
  may be shared by threads; each process opens its own.
- Methods return plain dicts (column name -> value, see `row`), never ORM objects, so
  results outlive their session. Datetimes are timezone-aware UTC; JSON columns come
  back as lists/dicts. `Store.session()` gives the ORM models to code that needs more.
- Bad input (an unknown host, adding a live host twice, an unknown state or verdict)
  raises ValueError.
- `owner` / `validator` strings are free-form instance ids. A claim never takes what
  another owner holds under a live lease, but hands an owner back its own live leases
  (so a validator restarted under the same id resumes its work). Leases use this
  machine's clock: keep validators' clocks in sync to well under the lease TTLs.
- PostgreSQL text cannot hold NUL characters: there they are stored as U+FFFD (SQLite
  keeps text exactly).
- What is read often must not grow with the history (months of answers): the scoring
  queue has its own partial index (`Dispatch.awaiting_score`), counts come from running
  totals (`Tally`) kept in the transaction that stores what they count, a host's answers
  come newest first from one (host, time) index range (`Dispatch.host_id`), and
  reputation reads only its columns (`host_outcomes`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import (
    JSON, CheckConstraint, DateTime, Double, ForeignKey, Index, MetaData, String, Text,
    TypeDecorator, UniqueConstraint, and_, create_engine, event, exists, false, func, or_,
    select, true, update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, sessionmaker

if TYPE_CHECKING:  # validator.probing.client imports torch (via sampling): keep this module light
    from validator.probing.client import CallRecord

STATES = ("new", "trusted", "probation", "flagged", "disabled")
VERDICTS = ("pass", "fail", "inconclusive", "error")
API_ROLES = ("admin", "reader")
# Upper bounds (seconds, "le") of the scoring-latency histogram kept in `tallies`: changing
# them needs a migration that recounts the stored scores (see 0005).
SCORING_LATENCY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK = 0x76616C64  # pg_advisory_xact_lock key serialising concurrent upgrades


def _now() -> datetime:
    return datetime.now(UTC)


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in and out on every backend (SQLite stores naive UTC text).
    A naive datetime passed in is taken to be UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SafeText(TypeDecorator):
    """Text. PostgreSQL rejects NUL in text, so there a NUL is stored as U+FFFD."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and dialect.name == "postgresql":
            return value.replace("\x00", "\ufffd")
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime(), float: Double(), dict: JSON(), list: JSON()}


class Host(Base):
    __tablename__ = "hosts"
    __table_args__ = (CheckConstraint(f"state IN ({_in(STATES)})", name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    model: Mapped[str] = mapped_column(String(128))  # registry name the host claims
    token_env: Mapped[str | None] = mapped_column(String(128))  # env var with its bearer token
    state: Mapped[str] = mapped_column(String(16), default="new", server_default="new")
    score: Mapped[float | None]
    added_at: Mapped[datetime] = mapped_column(default=_now)
    removed_at: Mapped[datetime | None]  # soft delete: history stays
    flagged_since: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]


class Probe(Base):
    __tablename__ = "probes"
    __table_args__ = (UniqueConstraint("round", "host_id", "index"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # deterministic, from the caller
    round: Mapped[int]
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), index=True)
    index: Mapped[int]
    prompt_id: Mapped[str] = mapped_column(String(128))
    messages: Mapped[list]
    configs: Mapped[dict]
    stream: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Dispatch(Base):
    """One answer per probe, ever (unique probe_id)."""

    __tablename__ = "dispatches"
    # The scoring queue: only answers awaiting a score are in this index, oldest first.
    # (The predicates are written as the queries write them, which SQLite needs to use it.)
    # A host's answers newest first (answers page, reputation): one range of the second.
    __table_args__ = (Index("ix_dispatches_awaiting_score", "finished_at", "id",
                            sqlite_where=sql_text("awaiting_score = 1"),
                            postgresql_where=sql_text("awaiting_score")),
                      Index("ix_dispatches_host_id_finished_at_id", "host_id", "finished_at", "id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    probe_id: Mapped[str] = mapped_column(ForeignKey("probes.id"), unique=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))  # the probe's, copied for the index
    ok: Mapped[bool]
    text: Mapped[str | None] = mapped_column(SafeText)  # the raw answer, exact
    status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(SafeText, default="")
    ttfb_s: Mapped[float | None]
    total_s: Mapped[float]
    bytes: Mapped[int]
    attempts: Mapped[int]
    served_by: Mapped[str | None] = mapped_column(String(256))
    finished_at: Mapped[datetime] = mapped_column(default=_now, index=True)
    validator: Mapped[str] = mapped_column(String(128))
    score_owner: Mapped[str | None] = mapped_column(String(128))
    score_lease_until: Mapped[datetime | None]
    # ok and not scored yet: set with the answer, cleared in the score's transaction
    awaiting_score: Mapped[bool] = mapped_column(default=False, server_default=false())


class Provenance(Base):
    """What produced scores (validator.service.provenance): one row per distinct body."""

    __tablename__ = "provenances"

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of the sorted JSON
    body: Mapped[dict]
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (CheckConstraint(f"verdict IN ({_in(VERDICTS)})", name="verdict"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    probe_id: Mapped[str] = mapped_column(ForeignKey("probes.id"), unique=True)
    verdict: Mapped[str] = mapped_column(String(16))
    p_value: Mapped[float | None]
    reasons: Mapped[list]
    metrics: Mapped[dict]
    scored_at: Mapped[datetime] = mapped_column(default=_now, index=True)  # status: the last score
    validator: Mapped[str] = mapped_column(String(128))
    provenance_id: Mapped[int | None] = mapped_column(ForeignKey("provenances.id"))  # None: an error
    pooled: Mapped[dict | None]  # what the answer adds to the host's pooled evidence (reputation)


class HostRound(Base):
    """Who probes a host in a round: a lease until done_at is set."""

    __tablename__ = "host_rounds"

    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), primary_key=True)
    round: Mapped[int] = mapped_column(primary_key=True, index=True)
    owner: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime]
    done_at: Mapped[datetime | None]


class ReputationEvent(Base):
    __tablename__ = "reputation_events"
    __table_args__ = (Index("ix_reputation_events_host_id_at", "host_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    at: Mapped[datetime] = mapped_column(default=_now)
    state_from: Mapped[str] = mapped_column(String(16))
    state_to: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None]
    components: Mapped[dict]
    evidence: Mapped[dict]
    reason: Mapped[str] = mapped_column(SafeText, default="")


class Tally(Base):
    """Running totals per host, counted in the transaction that stores what they count,
    so that the host list and /metrics read a few rows instead of aggregating every
    answer ever stored. Names: probes, calls (answers recorded, failed or not), failed,
    error:<class>, scored, latency_count, latency_sum_s, latency_le:<bound> (scores whose
    latency falls in that bucket and no lower one; "+Inf" above the last)."""

    __tablename__ = "tallies"

    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    value: Mapped[float]


def latency_bucket(seconds: float) -> str:
    """The tally name of the scoring-latency bucket `seconds` falls in."""
    bound = next((b for b in SCORING_LATENCY_BUCKETS if seconds <= b), None)
    return f"latency_le:{'+Inf' if bound is None else repr(bound)}"


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    probe_id: Mapped[str] = mapped_column(ForeignKey("probes.id"), index=True)
    rating: Mapped[float]
    note: Mapped[str] = mapped_column(SafeText, default="")
    at: Mapped[datetime] = mapped_column(default=_now)


class ValidatorInstance(Base):
    """A validator process's heartbeat: how `validator status` tells alive from gone."""

    __tablename__ = "validators"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int]
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]


class ApiToken(Base):
    """A bearer token of `validator serve`: only the SHA-256 of its secret is kept."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(f"role IN ({_in(API_ROLES)})", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)
    revoked_at: Mapped[datetime | None]


def row(obj: Base | None) -> dict[str, Any] | None:
    """An ORM object as a plain dict of its columns."""
    if obj is None:
        return None
    return {c.key: getattr(obj, c.key) for c in obj.__mapper__.column_attrs}


# -- engines and migrations -------------------------------------------------------------

def _sqlite_connect(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # the driver's own BEGINs off: _sqlite_begin emits ours
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _sqlite_begin(conn) -> None:
    deferred = conn.get_execution_options().get("sqlite_deferred", False)
    conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


def engine_for(url: str) -> Engine:
    """An Engine for a SQLite file or PostgreSQL URL, set up as the module docstring says."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        return create_engine(u, pool_pre_ping=True)
    raise ValueError(f"unsupported database URL {u.render_as_string(hide_password=True)!r}: "
                     "use sqlite:/// or postgresql+psycopg://")


def alembic_config():
    """Alembic's Config for the migrations shipped inside this package (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    cfg.set_main_option("path_separator", "os")
    return cfg


def upgrade(url: str) -> None:
    """Run the migrations to head, in one transaction (a no-op on a current database).
    Concurrent upgraders are serialised (SQLite write lock, PostgreSQL advisory lock)."""
    from alembic import command

    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


# -- the store ----------------------------------------------------------------------------

# The scoring queue, as ix_dispatches_awaiting_score's predicate reads (a literal true, not
# a bound parameter, so that SQLite can prove the index applies). The score's existence is
# checked too: the flag is a cache of it.
_AWAITING_SCORE = Dispatch.awaiting_score == true()
_SCORED = exists().where(Score.probe_id == Dispatch.probe_id)

# The CallRecord fields a dispatch keeps, with CallRecord's defaults.
_CALL_FIELDS = {"ok": None, "text": None, "status": None, "error": None, "detail": "",
                "ttfb_s": None, "total_s": 0.0, "bytes": 0, "attempts": 0, "served_by": None}


_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def bounded(table, values: dict) -> dict:
    """`values` made storable in `table`, for what a host controls (a header of any
    length, an error message of any characters must not fail the insert): lone
    surrogates, which UTF-8 cannot encode, become U+FFFD in every string; a string for a
    String(N) column also loses NUL (PostgreSQL refuses it; Text columns keep theirs,
    see SafeText) and is cut to N characters, its end saying so (`...[300 chars]`)."""
    out = dict(values)
    for name, value in values.items():
        column = table.c.get(name)
        if not isinstance(value, str) or column is None:
            continue
        length = getattr(column.type, "length", None)
        value = (_UNSTORABLE if length else _SURROGATE).sub("\ufffd", value)
        if length and len(value) > length:
            marker = f"...[{len(value)} chars]"
            value = value[:length - len(marker)] + marker
        out[name] = value
    return out


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = engine_for(url)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(self.engine.execution_options(sqlite_deferred=True),
                                    expire_on_commit=False)
        # Provenance ids by digest, once committed: every score of a model shares one, and a
        # stored provenance is never deleted.
        self._provenance_ids: dict[str, int] = {}

    @staticmethod
    def default_url(path: str | Path) -> str:
        return f"sqlite:///{Path(path).expanduser().resolve()}"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """One transaction: commits on exit, rolls back on an exception. On SQLite a
        read-write session holds the write lock from its start; `readonly=True` does not."""
        with (self._reader if readonly else self._writer).begin() as s:
            yield s

    def _insert(self, model: type[Base]):
        """INSERT for this dialect (both offer .on_conflict_do_nothing())."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(model.__table__)

    def _insert_new(self, s: Session, model: type[Base], values: dict, *unique: str) -> bool:
        """INSERT ... ON CONFLICT (unique, or any key) DO NOTHING: True if the row went in.
        (RETURNING, because rowcount is -1 for it on psycopg.)"""
        stmt = (self._insert(model).values(values)
                .on_conflict_do_nothing(index_elements=list(unique) or None)
                .returning(*model.__table__.primary_key))
        return s.execute(stmt).first() is not None

    def _count(self, s: Session, host_id: int, amounts: dict[str, float]) -> None:
        """Add `amounts` to the host's tallies (in `s`'s transaction). Rows are taken in
        name order, so two transactions counting for one host cannot deadlock."""
        stmt = self._insert(Tally)
        stmt = stmt.on_conflict_do_update(index_elements=["host_id", "name"],
                                          set_={"value": Tally.__table__.c.value + stmt.excluded.value})
        s.execute(stmt.values([{"host_id": host_id, "name": k, "value": float(amounts[k])}
                               for k in sorted(amounts)]))

    @staticmethod
    def _tallies(s: Session, *names: str, prefix: str | None = None) -> list[tuple[str, str, float]]:
        """(host name, tally name, value) of the named tallies and those starting with `prefix`."""
        match = [Tally.name.in_(names)] + ([Tally.name.startswith(prefix)] if prefix else [])
        stmt = (select(Host.name, Tally.name, Tally.value).join(Host, Host.id == Tally.host_id)
                .where(or_(*match)).order_by(Host.name, Tally.name))
        return [tuple(r) for r in s.execute(stmt)]

    @staticmethod
    def _host(s: Session, name: str, *, lock: bool = False) -> Host:
        stmt = select(Host).where(Host.name == name)
        host = s.scalar(stmt.with_for_update() if lock else stmt)
        if host is None:
            raise ValueError(f"no host named {name!r}")
        return host

    # -- hosts

    def add_host(self, name: str, url: str, model: str, token_env: str | None = None) -> dict:
        """Add a host, or revive a removed one (keeping its id, state and history)."""
        if not name or len(name) > 128:
            raise ValueError("a host name has 1 to 128 characters")
        with self.session() as s:
            host = s.scalar(select(Host).where(Host.name == name))
            if host is None:
                host = Host(name=name, url=url, model=model, token_env=token_env)
                s.add(host)
            elif host.removed_at is None:
                raise ValueError(f"host {name!r} already exists")
            else:
                host.url, host.model, host.token_env, host.removed_at = url, model, token_env, None
            s.flush()
            return row(host)

    def remove_host(self, name: str) -> None:
        """Soft delete: the host stops being listed and probed; its history stays."""
        with self.session() as s:
            host = self._host(s, name)
            host.removed_at = host.removed_at or _now()

    def get_host(self, name: str) -> dict | None:
        """The host, removed or not; None if the name was never added."""
        with self.session(readonly=True) as s:
            return row(s.scalar(select(Host).where(Host.name == name)))

    def list_hosts(self, include_removed: bool = False) -> list[dict]:
        stmt = select(Host).order_by(Host.name)
        if not include_removed:
            stmt = stmt.where(Host.removed_at.is_(None))
        with self.session(readonly=True) as s:
            return [row(h) for h in s.scalars(stmt)]

    def set_state(self, name: str, state: str, *, score: float | None = None,
                  components: dict | None = None, evidence: dict | None = None,
                  reason: str = "", expect: str | None = None) -> dict | None:
        """Set a host's state (and score, unless None) and append the reputation event
        that records why; returns the event. Entering `flagged` sets flagged_since,
        leaving it clears it. With `expect`, nothing changes (and None is returned)
        unless the host is in that state: two validators that both saw `new` and decided
        `flagged` record the change once."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        with self.session() as s:
            host = self._host(s, name, lock=True)
            if expect is not None and host.state != expect:
                return None
            now = _now()
            if state != "flagged":
                host.flagged_since = None
            elif host.state != "flagged":
                host.flagged_since = now
            previous, host.state = host.state, state
            if score is not None:
                host.score = score
            ev = ReputationEvent(host_id=host.id, at=now, state_from=previous, state_to=state,
                                 score=host.score, components=components or {},
                                 evidence=evidence or {}, reason=reason)
            s.add(ev)
            s.flush()
            return row(ev)

    def set_score(self, name: str, score: float | None) -> None:
        """Update a host's score without a state change (no event)."""
        with self.session() as s:
            self._host(s, name).score = score

    def host_stats(self) -> dict[str, dict[str, int]]:
        """Per host name (removed ones too) with anything recorded: probes, answered
        (dispatches), failed (not ok) and scored counts, over all rounds (from `tallies`)."""
        keys = {"probes": "probes", "calls": "answered", "failed": "failed", "scored": "scored"}
        out: dict[str, dict[str, int]] = {}
        with self.session(readonly=True) as s:
            for host, name, value in self._tallies(s, *keys):
                out.setdefault(host, dict.fromkeys(keys.values(), 0))[keys[name]] = int(value)
        return out

    def reputation_events(self, name: str, limit: int | None = None) -> list[dict]:
        """A host's reputation events, newest first."""
        with self.session(readonly=True) as s:
            host = self._host(s, name)
            stmt = (select(ReputationEvent).where(ReputationEvent.host_id == host.id)
                    .order_by(ReputationEvent.at.desc(), ReputationEvent.id.desc()).limit(limit))
            return [row(e) for e in s.scalars(stmt)]

    def touch(self, name: str, seen_at: datetime | None = None) -> None:
        with self.session() as s:
            self._host(s, name).last_seen = seen_at or _now()

    # -- rounds

    def claim_host_rounds(self, round: int, owner: str, limit: int, ttl_s: float) -> list[str]:
        """Claim up to `limit` hosts to probe in `round` for `ttl_s` seconds; returns
        their names. Eligible: not removed, not disabled, and no row for this round that
        is done or leased by another owner (an expired lease is taken over). Hosts this
        owner already holds are returned again (restart recovery): finish them before
        asking for more."""
        now = _now()
        until = now + timedelta(seconds=ttl_s)
        taken = exists().where(
            HostRound.host_id == Host.id, HostRound.round == round,
            or_(HostRound.done_at.is_not(None),
                and_(HostRound.lease_until > now, HostRound.owner != owner)))
        candidates = (select(Host.id, Host.name)
                      .where(Host.removed_at.is_(None), Host.state != "disabled", ~taken)
                      .order_by(Host.id).limit(limit)
                      .with_for_update(skip_locked=True, of=Host))
        claimed = []
        with self.session() as s:
            for host_id, name in s.execute(candidates).all():
                lease = {"host_id": host_id, "round": round, "owner": owner, "lease_until": until}
                won = self._insert_new(s, HostRound, lease) or s.execute(
                    update(HostRound.__table__)
                    .where(HostRound.host_id == host_id, HostRound.round == round,
                           HostRound.done_at.is_(None),
                           or_(HostRound.lease_until <= now, HostRound.owner == owner))
                    .values(owner=owner, lease_until=until)).rowcount == 1
                if won:
                    claimed.append(name)
        return claimed

    def _update_host_round(self, host: str, round: int, owner: str, **values) -> bool:
        with self.session() as s:
            host_id = self._host(s, host).id
            stmt = (update(HostRound.__table__)
                    .where(HostRound.host_id == host_id, HostRound.round == round,
                           HostRound.owner == owner, HostRound.done_at.is_(None))
                    .values(**values))
            return s.execute(stmt).rowcount == 1

    def finish_host_round(self, host: str, round: int, owner: str) -> bool:
        """Mark the host's round done; False if `owner` no longer holds it."""
        return self._update_host_round(host, round, owner, done_at=_now())

    def renew_lease(self, host: str, round: int, owner: str, ttl_s: float) -> bool:
        """Extend `owner`'s lease on (host, round); False if it no longer holds it."""
        return self._update_host_round(host, round, owner,
                                       lease_until=_now() + timedelta(seconds=ttl_s))

    def last_round(self) -> int | None:
        """The highest round claimed or probed, None on a fresh database."""
        with self.session(readonly=True) as s:
            rounds = [s.scalar(select(func.max(HostRound.round))),
                      s.scalar(select(func.max(Probe.round)))]
        rounds = [r for r in rounds if r is not None]
        return max(rounds) if rounds else None

    # -- probes and answers

    def ensure_probes(self, round: int, host: str, probes: list[dict]) -> None:
        """Insert the round's probes for `host` (dicts: id, index, prompt_id, messages,
        configs, stream). Ids already stored are left as they are."""
        with self.session() as s:
            host_id = self._host(s, host).id
            rows = [{"id": p["id"], "round": round, "host_id": host_id, "index": p["index"],
                     "prompt_id": p["prompt_id"], "messages": p["messages"],
                     "configs": p["configs"], "stream": bool(p["stream"]), "created_at": _now()}
                    for p in probes]
            if rows:
                added = s.execute(self._insert(Probe).on_conflict_do_nothing(index_elements=["id"])
                                  .returning(Probe.id), rows).all()
                if added:
                    self._count(s, host_id, {"probes": len(added)})

    def probe(self, probe_id: str) -> dict | None:
        """One probe's columns plus "host" (its name); None if unknown."""
        with self.session(readonly=True) as s:
            found = s.execute(select(Probe, Host.name).join(Host, Probe.host_id == Host.id)
                              .where(Probe.id == probe_id)).first()
            return None if found is None else {**row(found[0]), "host": found[1]}

    def pending_probes(self, round: int, host: str) -> list[dict]:
        """The round's probes for `host` that have no dispatch yet, by index."""
        with self.session(readonly=True) as s:
            host_id = self._host(s, host).id
            answered = exists().where(Dispatch.probe_id == Probe.id)
            stmt = (select(Probe).where(Probe.round == round, Probe.host_id == host_id, ~answered)
                    .order_by(Probe.index))
            return [row(p) for p in s.scalars(stmt)]

    def record_dispatch(self, probe_id: str, record: CallRecord | dict, validator: str,
                        finished_at: datetime | None = None, served_host: str | None = None) -> bool:
        """Store a probe's answer (a CallRecord, or a dict of its fields). Returns False,
        changing nothing, if the probe already has one. Committed on return.
        `served_host`: a gateway's answer is the host's it names, when that is a live host
        (its history, tallies and reputation); otherwise it stays the probed URL's."""
        get = record.get if isinstance(record, dict) else lambda k, d: getattr(record, k, d)
        values = {k: get(k, default) for k, default in _CALL_FIELDS.items()}
        if not isinstance(values["ok"], bool):
            raise ValueError("a dispatch record needs a boolean `ok`")
        values.update(probe_id=probe_id, detail=values["detail"] or "", validator=validator,
                      finished_at=finished_at or _now(), awaiting_score=values["ok"])
        values = bounded(Dispatch.__table__, values)  # served_by, detail: what the host sent
        with self.session() as s:
            values["host_id"] = s.scalar(select(Probe.host_id).where(Probe.id == probe_id))
            if values["host_id"] is None:
                raise ValueError(f"no probe {probe_id!r}: store the probe (ensure_probes) first")
            if served_host is not None:
                values["host_id"] = s.scalar(select(Host.id).where(
                    Host.name == served_host, Host.removed_at.is_(None))) or values["host_id"]
            if not self._insert_new(s, Dispatch, values, "probe_id"):
                return False
            amounts = {"calls": 1}
            if not values["ok"]:
                amounts["failed"] = 1
            if values["error"] is not None:
                amounts[f"error:{values['error']}"] = 1
            self._count(s, values["host_id"], amounts)
            return True

    # -- scoring

    def claim_unscored(self, owner: str, limit: int, ttl_s: float) -> list[dict]:
        """Lease up to `limit` ok, unscored dispatches (oldest first) on which no other owner
        holds a live lease. Each dict: probe_id, host, model, messages, configs, stream,
        text, finished_at. As with host rounds, this owner's own live leases come back to
        it (a restarted validator with the same instance id resumes them): score or give
        up a batch before claiming the next."""
        now = _now()
        free = or_(Dispatch.score_lease_until.is_(None), Dispatch.score_lease_until <= now,
                   Dispatch.score_owner == owner)
        served = aliased(Host)  # the answer's host (a gateway's names who served it); the
        #                        model is the one the probe asked for
        stmt = (select(Dispatch, Probe, served.name, Host.model)
                .join(Probe, Dispatch.probe_id == Probe.id).join(Host, Probe.host_id == Host.id)
                .join(served, Dispatch.host_id == served.id)
                .where(_AWAITING_SCORE, ~_SCORED, free)
                .order_by(Dispatch.finished_at, Dispatch.id).limit(limit)
                .with_for_update(skip_locked=True, of=Dispatch))
        out = []
        with self.session() as s:
            for d, p, host, model in s.execute(stmt).all():
                d.score_owner, d.score_lease_until = owner, now + timedelta(seconds=ttl_s)
                out.append({"probe_id": p.id, "host": host, "model": model,
                            "messages": p.messages, "configs": p.configs, "stream": p.stream,
                            "text": d.text, "finished_at": d.finished_at})
        return out

    def record_score(self, probe_id: str, verdict: str, p_value: float | None,
                     reasons: list[str], metrics: dict, validator: str,
                     provenance: dict | None = None, pooled: dict | None = None) -> bool:
        """Store a probe's score with what produced it; False, changing nothing, if it
        already has one."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; one of {', '.join(VERDICTS)}")
        values = {"probe_id": probe_id, "verdict": verdict, "p_value": p_value,
                  "reasons": list(reasons), "metrics": metrics, "scored_at": _now(),
                  "validator": validator, "pooled": pooled}
        digest = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest() if provenance else None
        with self.session() as s:
            if digest is not None:
                values["provenance_id"] = self._provenance_ids.get(digest) or self._provenance_id(s, digest, provenance)
            added = self._insert_new(s, Score, values, "probe_id")
            s.execute(update(Dispatch.__table__).where(Dispatch.probe_id == probe_id, _AWAITING_SCORE)
                      .values(awaiting_score=False))
            if added:
                host_id, finished_at = s.execute(
                    select(Probe.host_id, Dispatch.finished_at)
                    .outerjoin(Dispatch, Dispatch.probe_id == Probe.id).where(Probe.id == probe_id)).one()
                amounts = {"scored": 1}
                if finished_at is not None:  # a score's latency: from its answer stored to it stored
                    latency = (values["scored_at"] - finished_at).total_seconds()
                    amounts.update({"latency_count": 1, "latency_sum_s": latency,
                                    latency_bucket(latency): 1})
                self._count(s, host_id, amounts)
        if digest is not None:  # committed now
            self._provenance_ids[digest] = values["provenance_id"]
        return added

    def _provenance_id(self, s: Session, digest: str, body: dict) -> int:
        s.execute(self._insert(Provenance).on_conflict_do_nothing(index_elements=["digest"]),
                  {"digest": digest, "body": body, "created_at": _now()})
        return s.scalar(select(Provenance.id).where(Provenance.digest == digest))

    @staticmethod
    def _scored(s: Session, found) -> list[dict]:
        """(probe, dispatch, score) rows as dicts, each score with its "provenance" body."""
        ids = {sc.provenance_id for _, _, sc in found if sc is not None and sc.provenance_id is not None}
        bodies = dict(s.execute(select(Provenance.id, Provenance.body).where(Provenance.id.in_(ids))).all()) if ids else {}
        out = []
        for p, d, sc in found:
            score = row(sc)
            if score is not None:
                score["provenance"] = bodies.get(sc.provenance_id)
            out.append({"probe": row(p), "dispatch": row(d), "score": score})
        return out

    @staticmethod
    def _answers(host_id: int, *columns):
        """SELECT `columns` (default: Probe, Dispatch, Score or None) of a host's answers,
        newest first."""
        return (select(*(columns or (Probe, Dispatch, Score)))
                .join(Dispatch, Dispatch.probe_id == Probe.id)
                .outerjoin(Score, Score.probe_id == Probe.id)
                .where(Dispatch.host_id == host_id)  # not Probe's: this one is indexed in this order
                .order_by(Dispatch.finished_at.desc(), Dispatch.id.desc()))

    def host_scores(self, host: str, limit: int | None = None) -> list[dict]:
        """A host's answers, newest first: {"probe", "dispatch", "score"} dicts, "score"
        None where not scored (failed calls are never scored)."""
        with self.session(readonly=True) as s:
            stmt = self._answers(self._host(s, host).id).limit(limit)
            return self._scored(s, s.execute(stmt).all())

    def host_outcomes(self, host: str) -> list[tuple]:
        """What reputation reads of each of a host's answers, newest first, as
        (probe_id, finished_at, error, ttfb_s, total_s, bytes, verdict, p_value, pooled)
        with verdict, p_value and pooled None where unscored. Only these columns: the answers' texts,
        messages and metrics are most of a row, and the daemon reads a host's whole
        history after every scoring batch (a months-old host has tens of thousands)."""
        with self.session(readonly=True) as s:
            stmt = self._answers(self._host(s, host).id, Probe.id, Dispatch.finished_at,
                                 Dispatch.error, Dispatch.ttfb_s, Dispatch.total_s,
                                 Dispatch.bytes, Score.verdict, Score.p_value, Score.pooled)
            return [tuple(r) for r in s.execute(stmt)]

    def queue_depth(self) -> int:
        """Ok dispatches not scored yet (leased or not)."""
        with self.session(readonly=True) as s:
            return s.scalar(select(func.count()).select_from(Dispatch)
                            .where(_AWAITING_SCORE, ~_SCORED))

    def export_rows(self) -> list[dict]:
        """Every recorded answer, oldest first, flat: probe, host, timings, verdict,
        p-value, reasons (verdict etc. None where not scored)."""
        stmt = (select(Probe, Host.name, Host.model, Dispatch, Score, Provenance.body)
                .join(Host, Probe.host_id == Host.id)
                .join(Dispatch, Dispatch.probe_id == Probe.id)
                .outerjoin(Score, Score.probe_id == Probe.id)
                .outerjoin(Provenance, Provenance.id == Score.provenance_id)
                .order_by(Dispatch.finished_at, Dispatch.id))
        with self.session(readonly=True) as s:
            return [{"probe_id": p.id, "round": p.round, "host": host, "model": model,
                     "index": p.index, "prompt_id": p.prompt_id, "stream": p.stream,
                     "messages": p.messages, "configs": p.configs,
                     "ok": d.ok, "status": d.status, "error": d.error, "detail": d.detail,
                     "text": d.text, "ttfb_s": d.ttfb_s, "total_s": d.total_s,
                     "bytes": d.bytes, "attempts": d.attempts, "served_by": d.served_by,
                     "finished_at": d.finished_at, "validator": d.validator,
                     "verdict": sc and sc.verdict, "p_value": sc and sc.p_value,
                     "reasons": sc and sc.reasons, "metrics": sc and sc.metrics,
                     "scored_at": sc and sc.scored_at, "provenance": provenance}
                    for p, host, model, d, sc, provenance in s.execute(stmt)]

    def status(self) -> dict:
        """last_round, queue_depth, last_answer_at, last_score_at, hosts_by_state (live
        hosts) and validators: [{owner, leases, until}] holding live host-round or
        scoring leases now."""
        now = _now()
        leases = [
            select(HostRound.owner, HostRound.lease_until)
            .where(HostRound.done_at.is_(None), HostRound.lease_until > now),
            select(Dispatch.score_owner, Dispatch.score_lease_until)
            .where(_AWAITING_SCORE, ~_SCORED, Dispatch.score_lease_until > now),
        ]
        held: dict[str, dict] = {}
        with self.session(readonly=True) as s:
            for owner, until in (r for stmt in leases for r in s.execute(stmt)):
                v = held.setdefault(owner, {"owner": owner, "leases": 0, "until": until})
                v["leases"] += 1
                v["until"] = max(v["until"], until)
            by_state = dict(s.execute(select(Host.state, func.count())
                                      .where(Host.removed_at.is_(None))
                                      .group_by(Host.state)).all())
            last_answer = s.scalar(select(func.max(Dispatch.finished_at)))
            last_score = s.scalar(select(func.max(Score.scored_at)))
        return {"last_round": self.last_round(), "queue_depth": self.queue_depth(),
                "last_answer_at": last_answer, "last_score_at": last_score,
                "hosts_by_state": by_state,
                "validators": sorted(held.values(), key=lambda v: v["owner"])}

    # -- validator processes

    def heartbeat(self, name: str, hostname: str, pid: int, started_at: datetime,
                  stopped: bool = False) -> None:
        """Record that validator `name` is alive (or, with stopped=True, that it exited cleanly)."""
        now = _now()
        with self.session() as s:
            v = s.get(ValidatorInstance, name)
            if v is None:
                v = ValidatorInstance(name=name, hostname=hostname, pid=pid,
                                      started_at=started_at, heartbeat_at=now)
                s.add(v)
            v.hostname, v.pid, v.started_at, v.heartbeat_at = hostname, pid, started_at, now
            v.stopped_at = now if stopped else None

    def validators(self) -> list[dict]:
        """Every validator that has run against this database, newest heartbeat first."""
        with self.session(readonly=True) as s:
            return [row(v) for v in s.scalars(select(ValidatorInstance)
                                              .order_by(ValidatorInstance.heartbeat_at.desc()))]

    # -- feedback

    def add_feedback(self, probe_id: str, rating: float, note: str = "") -> int:
        """Store a rating of one probe's answer; returns the feedback id."""
        with self.session() as s:
            fb = Feedback(probe_id=probe_id, rating=rating, note=note)
            s.add(fb)
            s.flush()
            return fb.id

    def feedback_for(self, host: str) -> list[dict]:
        """Feedback on a host's answers, newest first."""
        with self.session(readonly=True) as s:
            host_id = self._host(s, host).id
            stmt = (select(Feedback).join(Probe, Feedback.probe_id == Probe.id)
                    .where(Probe.host_id == host_id)
                    .order_by(Feedback.at.desc(), Feedback.id.desc()))
            return [row(f) for f in s.scalars(stmt)]

    # -- API tokens (`validator serve`)

    def add_api_token(self, name: str, role: str, token_hash: str) -> dict:
        """Store a token by the hash of its secret (the secret itself is never stored)."""
        if role not in API_ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(API_ROLES)}")
        with self.session() as s:
            token = ApiToken(name=name, role=role, token_hash=token_hash, created_at=_now())
            s.add(token)
            s.flush()
            return row(token)

    def api_token(self, token_hash: str) -> dict | None:
        """The live (not revoked) token with this hash, None if there is none."""
        with self.session(readonly=True) as s:
            return row(s.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash,
                                                       ApiToken.revoked_at.is_(None))))

    def api_tokens(self) -> list[dict]:
        """Every token, revoked ones too, oldest first."""
        with self.session(readonly=True) as s:
            return [row(t) for t in s.scalars(select(ApiToken).order_by(ApiToken.id))]

    def revoke_api_token(self, token_id: int) -> bool:
        """Revoke a token; False if there is no live token with this id."""
        with self.session() as s:
            stmt = (update(ApiToken.__table__)
                    .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
                    .values(revoked_at=_now()))
            return s.execute(stmt).rowcount == 1

    # -- reads for the web server

    def host_history(self, host: str, *, limit: int, offset: int = 0, verdict: str | None = None,
                     failed: bool | None = None, before: datetime | None = None) -> tuple[int, list[dict]]:
        """A page of a host's answers as `host_scores` gives them (newest first) and how
        many answers match in all. `verdict`: one of VERDICTS, or "unscored" (answered,
        no score yet); `failed`: only failed calls (True) or only answered ones (False);
        `before`: only answers finished before then."""
        if verdict is not None and verdict not in (*VERDICTS, "unscored"):
            raise ValueError(f"unknown verdict {verdict!r}; one of {', '.join(VERDICTS)}, unscored")
        match = [] if before is None else [Dispatch.finished_at < before]
        if verdict == "unscored":
            match += [Dispatch.ok.is_(True), Score.id.is_(None)]
        elif verdict is not None:
            match.append(Score.verdict == verdict)
        if failed is not None:
            match.append(Dispatch.ok.is_(not failed))
        with self.session(readonly=True) as s:
            host_id = self._host(s, host).id
            # counted on dispatches alone (joined to scores only to match a verdict): the
            # count reads every matching answer, the page only its own
            count = select(func.count()).select_from(Dispatch).where(Dispatch.host_id == host_id, *match)
            if verdict is not None:
                count = count.outerjoin(Score, Score.probe_id == Dispatch.probe_id)
            total = s.scalar(count)
            page = s.execute(self._answers(host_id).where(*match).limit(limit).offset(offset)).all()
            return total, self._scored(s, page)

    def probe_detail(self, probe_id: str) -> dict | None:
        """One probe with everything recorded about it: {"probe" (with "host" and the
        host's "model"), "dispatch", "score" (each None if absent), "feedback" (list)};
        None if the probe is unknown."""
        with self.session(readonly=True) as s:
            found = s.execute(select(Probe, Host.name, Host.model, Dispatch, Score)
                              .join(Host, Probe.host_id == Host.id)
                              .outerjoin(Dispatch, Dispatch.probe_id == Probe.id)
                              .outerjoin(Score, Score.probe_id == Probe.id)
                              .where(Probe.id == probe_id)).first()
            if found is None:
                return None
            p, host, model, d, sc = found
            feedback = s.scalars(select(Feedback).where(Feedback.probe_id == probe_id)
                                 .order_by(Feedback.at.desc(), Feedback.id.desc()))
            (answer,) = self._scored(s, [(p, d, sc)])
            return {**answer, "probe": {**answer["probe"], "host": host, "model": model},
                    "feedback": [row(f) for f in feedback]}

    def last_errors(self, error: str, limit: int = 5) -> list[dict]:
        """The newest answers that failed with error class `error`: host, probe_id,
        finished_at, detail (for `validator status`; not indexed by error: not for hot paths)."""
        with self.session(readonly=True) as s:
            stmt = (select(Host.name.label("host"), Dispatch.probe_id, Dispatch.finished_at, Dispatch.detail)
                    .join(Host, Dispatch.host_id == Host.id).where(Dispatch.error == error)
                    .order_by(Dispatch.finished_at.desc(), Dispatch.id.desc()).limit(limit))
            return [dict(r._mapping) for r in s.execute(stmt)]

    def dispatch_counts(self) -> list[tuple[str, str | None, int]]:
        """(host, error class or None when answered, recorded calls), every host and round
        (from `tallies`)."""
        with self.session(readonly=True) as s:
            found = self._tallies(s, "calls", prefix="error:")
        errors: dict[str, int] = {}
        out = []
        for host, name, value in found:
            if name != "calls":
                errors[host] = errors.get(host, 0) + int(value)
                out.append((host, name.removeprefix("error:"), int(value)))
        out += [(host, None, int(value) - errors.get(host, 0)) for host, name, value in found
                if name == "calls" and int(value) > errors.get(host, 0)]
        return sorted(out, key=lambda r: (r[0], r[1] is None, r[1] or ""))

    def scoring_latency(self) -> tuple[list[int], float, int]:
        """Seconds from an answer being stored to its score being stored, over every score
        (from `tallies`): (cumulative count at or below each of SCORING_LATENCY_BUCKETS,
        sum, count)."""
        per_bucket = dict.fromkeys(map(latency_bucket, SCORING_LATENCY_BUCKETS), 0.0)
        total = count = 0.0
        with self.session(readonly=True) as s:
            for _, name, value in self._tallies(s, "latency_count", "latency_sum_s", prefix="latency_le:"):
                if name == "latency_count":
                    count += value
                elif name == "latency_sum_s":
                    total += value
                elif name in per_bucket:
                    per_bucket[name] += value
        cumulative = list(itertools.accumulate(per_bucket.values()))
        return [int(c) for c in cumulative], total, int(count)
