"""validator.store against a real SQLite file and the local PostgreSQL (127.0.0.1:5432,
user postgres; a fresh database per test session, an empty schema per test). The
concurrency tests race real processes (multiprocessing, spawn)."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text, update

from validator.store import (
    Base, Dispatch, HostRound, Score, Store, alembic_config, engine_for, upgrade,
)

TABLES = {"hosts", "probes", "dispatches", "scores", "host_rounds", "reputation_events",
          "feedback", "validators", "api_tokens", "tallies", "provenances", "alembic_version"}


def call(**fields):
    """A CallRecord (imported here: validator.probing.client pulls in torch, which would slow
    down every spawned worker that imports this module)."""
    from validator.probing.client import CallRecord

    return CallRecord(**fields)


def expire_leases(store: Store) -> None:
    """Make every host-round and scoring lease run out now (instead of sleeping)."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    with store.session() as s:
        s.execute(update(HostRound.__table__).values(lease_until=past))
        s.execute(update(Dispatch.__table__).where(Dispatch.score_lease_until.is_not(None))
                  .values(score_lease_until=past))


def probe(i: int, round_: int = 1, host: str = "h", stream: bool = False) -> dict:
    return {"id": f"{host}-{round_}-{i}", "index": i, "prompt_id": f"p{i}",
            "messages": [{"role": "user", "content": f"question {i}?"}],
            "configs": {"temperature": 0.7, "top_k": 50, "top_p": 0.5, "max_tokens": 64},
            "stream": stream}


def answered(store: Store, host: str, n: int, round_: int = 1, ok: bool = True) -> list[str]:
    """n probes for `host`, each with a recorded answer; returns their ids."""
    probes = [probe(i, round_, host) for i in range(n)]
    store.ensure_probes(round_, host, probes)
    for p in probes:
        rec = call(ok=ok, text=None if not ok else f"answer to {p['id']}",
                         error=None if ok else "timeout", total_s=0.5, attempts=1)
        assert store.record_dispatch(p["id"], rec, "v1")
    return [p["id"] for p in probes]


# -- migrations -------------------------------------------------------------------------

def test_upgrade_creates_schema_and_is_idempotent(url):
    engine = engine_for(url)
    try:
        assert set(inspect(engine).get_table_names()) == set()
        upgrade(url)
        assert set(inspect(engine).get_table_names()) == TABLES
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert ctx.get_current_revision() == head
            assert compare_metadata(ctx, Base.metadata) == []  # models == migrated schema

        store = Store(url)
        store.add_host("h", "http://127.0.0.1:1", "smollm2-135m")
        upgrade(url)  # already current: no-op, data kept
        assert [h["name"] for h in store.list_hosts()] == ["h"]
        assert set(inspect(engine).get_table_names()) == TABLES
        store.close()
    finally:
        engine.dispose()


def test_sqlite_pragmas(tmp_path):
    url = Store.default_url(tmp_path / "v.db")
    upgrade(url)
    store = Store(url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30_000
    store.close()


def test_upgrade_from_0003_fills_the_scoring_queue_and_the_tallies(url):
    """A database from before the scoring-queue index and the tallies (revision 0003) with
    a scored, an unscored and a failed answer: after the upgrade only the unscored one
    awaits a score, and the tallies count what was stored."""
    from alembic import command

    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            now = datetime.now(UTC)
            conn.execute(text("INSERT INTO hosts (name, url, model, state, added_at) "
                              "VALUES ('h', 'http://h', 'smollm2-135m', 'new', :now)"), {"now": now})
            for i, ok in enumerate((True, True, False)):
                conn.execute(text(
                    "INSERT INTO probes (id, round, host_id, index, prompt_id, messages, configs, "
                    "stream, created_at) VALUES (:id, 1, 1, :i, 'p', '[]', '{}', :no, :now)"
                    .replace("index,", '"index",')), {"id": f"p{i}", "i": i, "no": False, "now": now})
                conn.execute(text(
                    "INSERT INTO dispatches (probe_id, ok, error, detail, total_s, bytes, attempts, "
                    "finished_at, validator) VALUES (:id, :ok, :error, '', 1.0, 3, 1, :at, 'v1')"),
                    {"id": f"p{i}", "ok": ok, "error": None if ok else "connect_error",
                     "at": now + timedelta(seconds=i)})
            conn.execute(text("INSERT INTO scores (probe_id, verdict, p_value, reasons, metrics, "
                              "scored_at, validator) VALUES ('p0', 'pass', 0.5, '[]', '{}', :at, 'v1')"),
                         {"at": now + timedelta(seconds=90)})
        upgrade(url)
        store = Store(url)
        with store.session(readonly=True) as s:
            flags = dict(s.execute(select(Dispatch.probe_id, Dispatch.awaiting_score)).all())
        assert flags == {"p0": False, "p1": True, "p2": False}
        assert store.queue_depth() == 1
        assert [d["probe_id"] for d in store.claim_unscored("A", 10, ttl_s=60)] == ["p1"]
        assert store.host_stats() == {"h": {"probes": 3, "answered": 3, "failed": 1, "scored": 1}}
        assert store.dispatch_counts() == [("h", "connect_error", 1), ("h", None, 2)]
        cumulative, total, count = store.scoring_latency()
        assert (count, total) == (1, pytest.approx(90.0, abs=1e-3))
        assert cumulative == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # 90 s: in the 120 s bucket
        with store.session(readonly=True) as s:  # each answer's host, copied from its probe
            assert set(s.scalars(select(Dispatch.host_id))) == {store.get_host("h")["id"]}
        total, page = store.host_history("h", limit=2)
        assert total == 3 and [a["probe"]["id"] for a in page] == ["p2", "p1"]
        store.close()
        with engine.connect() as conn:  # 0006 copies dispatches on SQLite: the queue index keeps its predicate
            if url.startswith("sqlite"):
                ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'ix_dispatches_awaiting_score'")
            else:
                ddl = conn.exec_driver_sql("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_dispatches_awaiting_score'")
            assert "WHERE awaiting_score" in ddl.scalar_one()

        with engine.begin() as conn:  # and back, and up again
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0003")
            assert "awaiting_score" not in {c["name"] for c in inspect(conn).get_columns("dispatches")}
        upgrade(url)
        store = Store(url)
        assert store.queue_depth() == 1
        store.close()
    finally:
        engine.dispose()


def _aggregated(store: Store) -> tuple:
    """host_stats, dispatch_counts and scoring_latency counted from the rows themselves
    (what the tallies must equal)."""
    from validator.store import SCORING_LATENCY_BUCKETS, Host, Probe

    with store.session(readonly=True) as s:
        stats = {}
        for host, in s.execute(select(Host.name)):
            probes = s.scalars(select(Probe.id).join(Host).where(Host.name == host)).all()
            ds = s.scalars(select(Dispatch).where(Dispatch.probe_id.in_(probes))).all()
            scores = s.scalars(select(Score).where(Score.probe_id.in_(probes))).all()
            if probes:
                stats[host] = {"probes": len(probes), "answered": len(ds),
                               "failed": sum(not d.ok for d in ds), "scored": len(scores)}
        counts = sorted(((host, error, n) for host, error, n in s.execute(
            select(Host.name, Dispatch.error, func.count()).join(Probe, Probe.host_id == Host.id)
            .join(Dispatch, Dispatch.probe_id == Probe.id).group_by(Host.name, Dispatch.error))),
            key=lambda r: (r[0], r[1] is None, r[1] or ""))
        seconds = [(sc.scored_at - d.finished_at).total_seconds() for sc, d in s.execute(
            select(Score, Dispatch).join(Dispatch, Dispatch.probe_id == Score.probe_id))]
    cumulative = [sum(x <= b for x in seconds) for b in SCORING_LATENCY_BUCKETS]
    return stats, counts, (cumulative, pytest.approx(sum(seconds), abs=1e-3), len(seconds))


def test_tallies_equal_the_stored_rows(store):
    """The running totals the host list and /metrics read equal what the rows hold, after
    repeated probes, answers and scores (which store nothing the second time), failed
    calls of several classes, and answers scored seconds to hours after they arrived."""
    for name in ("a", "b", "idle"):
        store.add_host(name, f"http://{name}", "smollm2-135m")
    start = datetime.now(UTC) - timedelta(hours=3)
    for round_, host in ((1, "a"), (1, "b"), (2, "a")):
        probes = [probe(i, round_, host) for i in range(5)]
        store.ensure_probes(round_, host, probes)
        store.ensure_probes(round_, host, probes[:3])  # again: nothing new
        for i, p in enumerate(probes[:4]):  # the fifth is never answered
            ok = i != 3 or host == "b"
            rec = call(ok=ok, text="an answer" if ok else None,
                       error=None if ok else ("connect_error" if round_ == 1 else "first_byte_timeout"),
                       total_s=0.5, attempts=1)
            at = start + timedelta(minutes=40 * round_ + i)
            assert store.record_dispatch(p["id"], rec, "v1", finished_at=at)
            assert not store.record_dispatch(p["id"], rec, "v2", finished_at=at)
        for p in probes[:2]:
            assert store.record_score(p["id"], "pass", 0.5, [], {}, "v1")
            assert not store.record_score(p["id"], "fail", 1e-9, [], {}, "v2")
    fresh = answered(store, "b", 1, round_=3)[0]
    store.record_score(fresh, "inconclusive", 0.01, [], {}, "v1")  # seconds after its answer

    stats, counts, latency = _aggregated(store)
    assert store.host_stats() == stats
    assert stats["a"] == {"probes": 10, "answered": 8, "failed": 2, "scored": 4}
    assert store.dispatch_counts() == counts
    assert ("a", "first_byte_timeout", 1) in counts and ("b", None, 5) in counts
    assert store.scoring_latency() == latency
    assert latency[0][0] == 1 and latency[2] == 7  # the fresh one under a second; 7 scored


def _plans(store: Store, url: str, read) -> list[tuple[str, str]]:
    """(SQL, its query plan) of each statement `read()` sends that reads dispatches."""
    from sqlalchemy import event

    statements = []
    listen = lambda conn, cursor, sql, params, context, many: statements.append((sql, params))  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", listen)
    try:
        read()
    finally:
        event.remove(store.engine, "before_cursor_execute", listen)
    plans = []
    with store.engine.connect() as conn:
        dbapi = conn.connection.driver_connection
        cursor = dbapi.cursor()
        if url.startswith("sqlite"):
            explain = "EXPLAIN QUERY PLAN "
        else:  # on a few rows PostgreSQL would rather scan: ask whether it can use an index
            cursor.execute("SET enable_seqscan = off")
            explain = "EXPLAIN "
        for sql, params in statements:
            if "FROM dispatches" in sql or "JOIN dispatches" in sql:
                cursor.execute(explain + sql, params)
                plans.append((sql, " ".join(str(r) for r in cursor.fetchall())))
        dbapi.rollback()
    return plans


def test_scoring_queue_reads_its_index(store, url):
    """Claiming answers to score and counting the queue go through the partial index of
    answers awaiting a score, not through every answer ever stored (the planner must be
    able to prove the index's predicate from the query's: checked on the real plans)."""
    store.add_host("h", "http://h", "smollm2-135m")
    answered(store, "h", 3)
    plans = _plans(store, url, lambda: (store.claim_unscored("A", 10, ttl_s=60), store.queue_depth()))
    assert len(plans) == 2
    for sql, plan in plans:
        assert "ix_dispatches_awaiting_score" in plan, (sql, plan)


def test_a_hosts_answers_are_read_in_index_order(store, url):
    """The answers page (newest 50 and the count) and the reputation refresh's read of a
    host's whole history take the host's answers from the (host, time) index in the order
    they are shown, with no sort of everything the host ever answered."""
    for name in ("h", "other"):
        store.add_host(name, f"http://{name}", "smollm2-135m")
        answered(store, name, 3)
    plans = _plans(store, url, lambda: (store.host_history("h", limit=50), store.host_outcomes("h")))
    assert len(plans) == 3
    for sql, plan in plans:
        assert "ix_dispatches_host_id_finished_at_id" in plan, (sql, plan)
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, (sql, plan)


# -- hosts and reputation ---------------------------------------------------------------

def test_hosts_add_remove_revive(store):
    a = store.add_host("a", "http://a", "smollm2-135m", token_env="A_TOKEN")
    store.add_host("b", "http://b", "gemma-7b")
    assert a["state"] == "new" and a["token_env"] == "A_TOKEN" and a["removed_at"] is None
    assert a["added_at"].tzinfo is not None
    with pytest.raises(ValueError, match="already exists"):
        store.add_host("a", "http://a2", "smollm2-135m")

    store.remove_host("a")
    assert [h["name"] for h in store.list_hosts()] == ["b"]
    assert [h["name"] for h in store.list_hosts(include_removed=True)] == ["a", "b"]
    assert store.get_host("a")["removed_at"] is not None
    assert store.get_host("nope") is None
    with pytest.raises(ValueError, match="no host"):
        store.remove_host("nope")

    revived = store.add_host("a", "http://a2", "gemma-7b")
    assert revived["id"] == a["id"] and revived["removed_at"] is None
    assert revived["url"] == "http://a2" and revived["model"] == "gemma-7b"

    seen = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    store.touch("b", seen)
    assert store.get_host("b")["last_seen"] == seen


def test_set_state_appends_events_with_evidence(store):
    store.add_host("h", "http://h", "smollm2-135m")
    ev = store.set_state("h", "flagged", score=0.01, components={"fidelity": 0.01},
                         evidence={"probes": ["p1", "p2"], "p_value": 1e-6},
                         reason="sequential test crossed the flag boundary")
    host = store.get_host("h")
    assert host["state"] == "flagged" and host["score"] == 0.01
    assert host["flagged_since"] == ev["at"]
    assert (ev["state_from"], ev["state_to"]) == ("new", "flagged")

    store.set_state("h", "flagged", reason="still bad")  # score None keeps the score
    assert store.get_host("h")["flagged_since"] == ev["at"]  # unchanged while flagged
    store.set_state("h", "trusted", score=0.9, evidence={"probes": ["p3"]}, reason="cleared")
    host = store.get_host("h")
    assert host["state"] == "trusted" and host["flagged_since"] is None and host["score"] == 0.9

    events = store.reputation_events("h")
    assert [(e["state_from"], e["state_to"]) for e in events] == [
        ("flagged", "trusted"), ("flagged", "flagged"), ("new", "flagged")]
    assert events[-1]["evidence"] == {"probes": ["p1", "p2"], "p_value": 1e-6}
    assert events[-1]["components"] == {"fidelity": 0.01}
    assert events[1]["score"] == 0.01
    with pytest.raises(ValueError, match="unknown state"):
        store.set_state("h", "evil")
    assert len(store.reputation_events("h")) == 3


def test_removed_and_disabled_hosts_are_not_claimed(store):
    for name in ("live", "gone", "off", "bad"):
        store.add_host(name, f"http://{name}", "smollm2-135m")
    store.remove_host("gone")
    store.set_state("off", "disabled", reason="admin")
    store.set_state("bad", "flagged", reason="evidence")
    assert sorted(store.claim_host_rounds(1, "v1", 10, 60)) == ["bad", "live"]


# -- rounds -----------------------------------------------------------------------------

def test_host_round_leases(store):
    for name in ("a", "b", "c"):
        store.add_host(name, f"http://{name}", "smollm2-135m")
    assert store.last_round() is None
    assert store.claim_host_rounds(7, "v1", 2, ttl_s=60) == ["a", "b"]
    assert store.claim_host_rounds(7, "v2", 10, ttl_s=60) == ["c"]  # a, b leased by v1
    assert store.claim_host_rounds(7, "v1", 10, ttl_s=60) == ["a", "b"]  # own leases again
    assert store.finish_host_round("a", 7, "v1")
    assert not store.finish_host_round("b", 7, "v2")  # not v2's
    assert store.claim_host_rounds(7, "v2", 10, ttl_s=60) == ["c"]  # still its own
    assert store.finish_host_round("c", 7, "v2")
    assert store.claim_host_rounds(7, "v2", 10, ttl_s=60) == []  # a, c done; b v1's
    assert store.claim_host_rounds(8, "v2", 1, ttl_s=60) == ["a"]  # a new round
    assert store.last_round() == 8

    # an expired lease is taken over; the old owner can then neither renew nor finish
    assert store.claim_host_rounds(9, "dead", 10, ttl_s=60) == ["a", "b", "c"]
    assert store.claim_host_rounds(9, "v2", 10, ttl_s=60) == []
    expire_leases(store)
    assert store.claim_host_rounds(9, "v2", 10, ttl_s=60) == ["a", "b", "c"]
    assert not store.renew_lease("a", 9, "dead", 60)
    assert not store.finish_host_round("a", 9, "dead")
    assert store.renew_lease("a", 9, "v2", 60)
    assert store.finish_host_round("a", 9, "v2")
    assert store.claim_host_rounds(9, "v3", 10, ttl_s=60) == []  # done / live elsewhere


# -- probes, answers, scores ------------------------------------------------------------

def test_ensure_probes_and_record_dispatch_once(store):
    store.add_host("h", "http://h", "smollm2-135m")
    probes = [probe(i) for i in range(3)]
    store.ensure_probes(1, "h", probes)
    store.ensure_probes(1, "h", probes)  # idempotent
    pending = store.pending_probes(1, "h")
    assert [p["id"] for p in pending] == ["h-1-0", "h-1-1", "h-1-2"]
    assert pending[0]["messages"] == probes[0]["messages"]
    assert pending[0]["configs"] == probes[0]["configs"]

    text = "  Paris.\n\n\tÉtoile — 巴黎 🙂 \r\n"  # whitespace and unicode, kept exactly
    first = call(ok=True, text=text, status=200, ttfb_s=0.1, total_s=0.4, bytes=120,
                       attempts=1, stream=True, served_by="node-3")
    assert store.record_dispatch("h-1-0", first, "v1") is True
    assert store.record_dispatch("h-1-0", call(ok=True, text="other"), "v2") is False
    assert store.record_dispatch("h-1-1", {"ok": False, "error": "timeout", "detail": "no byte",
                                           "total_s": 30.0, "attempts": 3}, "v1") is True
    with pytest.raises(ValueError, match="ok"):
        store.record_dispatch("h-1-2", {"text": "no ok field"}, "v1")
    with pytest.raises(ValueError, match="no probe 'h-9-9'"):
        store.record_dispatch("h-9-9", call(ok=True, text="an answer to nothing"), "v1")

    with store.session(readonly=True) as s:
        rows = s.scalars(select(Dispatch).order_by(Dispatch.id)).all()
        assert [(d.probe_id, d.validator) for d in rows] == [("h-1-0", "v1"), ("h-1-1", "v1")]
        assert rows[0].text == text and rows[0].served_by == "node-3" and rows[0].bytes == 120
        assert (rows[1].ok, rows[1].error, rows[1].attempts, rows[1].text) == (
            False, "timeout", 3, None)
    assert [p["id"] for p in store.pending_probes(1, "h")] == ["h-1-2"]
    assert store.last_round() == 1


def test_nul_in_answer_is_stored(store, url):
    store.add_host("h", "http://h", "smollm2-135m")
    store.ensure_probes(1, "h", [probe(0)])
    assert store.record_dispatch("h-1-0", call(ok=True, text="a\x00b"), "v1")
    text = store.host_scores("h")[0]["dispatch"]["text"]
    assert text == ("a\ufffdb" if url.startswith("postgresql") else "a\x00b")


def test_record_score_once(store):
    store.add_host("h", "http://h", "smollm2-135m")
    ids = answered(store, "h", 2)
    assert store.queue_depth() == 2
    assert store.record_score(ids[0], "fail", 1e-5, ["token 3: 9.1 nats below"], {"n": 3}, "v1")
    assert not store.record_score(ids[0], "pass", 1.0, [], {}, "v2")
    with pytest.raises(ValueError, match="verdict"):
        store.record_score(ids[1], "maybe", None, [], {}, "v1")
    with store.session(readonly=True) as s:
        scores = s.scalars(select(Score)).all()
    assert [(sc.probe_id, sc.verdict, sc.p_value, sc.reasons, sc.metrics, sc.validator)
            for sc in scores] == [(ids[0], "fail", 1e-5, ["token 3: 9.1 nats below"],
                                   {"n": 3}, "v1")]
    assert store.queue_depth() == 1
    with store.session(readonly=True) as s:  # the queue flag is cleared with the score
        flags = dict(s.execute(select(Dispatch.probe_id, Dispatch.awaiting_score)).all())
    assert flags == {ids[0]: False, ids[1]: True}


def test_claim_unscored_leases(store):
    store.add_host("h", "http://h", "smollm2-135m")
    ids = answered(store, "h", 4)
    store.ensure_probes(2, "h", [probe(0, round_=2)])
    store.record_dispatch("h-2-0", call(ok=False, error="http_status", status=500), "v1")

    a = store.claim_unscored("A", 2, ttl_s=60)
    assert [d["probe_id"] for d in a] == ids[:2]  # oldest first
    assert a[0]["host"] == "h" and a[0]["model"] == "smollm2-135m"
    assert a[0]["text"] == f"answer to {ids[0]}"
    assert a[0]["messages"] == probe(0)["messages"] and a[0]["configs"] == probe(0)["configs"]
    b = store.claim_unscored("B", 10, ttl_s=60)
    assert [d["probe_id"] for d in b] == ids[2:]  # never the failed call, never A's
    assert store.claim_unscored("C", 10, ttl_s=60) == []
    # A restarted with the same instance id: its own live leases come back to it
    assert [d["probe_id"] for d in store.claim_unscored("A", 10, ttl_s=60)] == ids[:2]
    store.record_score(ids[2], "pass", 0.8, [], {}, "B")
    assert [d["probe_id"] for d in store.claim_unscored("B", 10, ttl_s=60)] == [ids[3]]
    expire_leases(store)  # every unscored one is free again, to anyone
    assert [d["probe_id"] for d in store.claim_unscored("C", 10, ttl_s=60)] == [
        ids[0], ids[1], ids[3]]
    assert store.queue_depth() == 3


def test_host_scores_and_feedback(store):
    store.add_host("h", "http://h", "smollm2-135m")
    store.add_host("other", "http://o", "smollm2-135m")
    ids = answered(store, "h", 3)
    answered(store, "other", 1)
    store.record_score(ids[1], "pass", 0.7, ["ok"], {"tokens": 5}, "v1")
    rows = store.host_scores("h")
    assert [r["probe"]["id"] for r in rows] == ids[::-1]  # newest first
    assert [r["score"] and r["score"]["verdict"] for r in rows] == [None, "pass", None]
    assert rows[1]["dispatch"]["ok"] is True
    assert len(store.host_scores("h", limit=2)) == 2

    first = store.add_feedback(ids[0], 1.0, "good")
    second = store.add_feedback(ids[2], -1.0, "made up a city")
    assert [f["id"] for f in store.feedback_for("h")] == [second, first]
    assert store.feedback_for("h")[0]["note"] == "made up a city"
    assert store.feedback_for("other") == []


def test_host_outcomes_are_the_reputation_columns_of_host_scores(store):
    """The narrow read the daemon's reputation refresh uses gives, row for row and in the
    same order, what the full rows hold: scored, unscorable, unscored and failed calls."""
    from validator.service.operations import outcomes

    store.add_host("h", "http://h", "smollm2-135m")
    store.add_host("other", "http://o", "smollm2-135m")
    ids = answered(store, "h", 4)
    failed = answered(store, "h", 2, round_=2, ok=False)
    answered(store, "other", 2)
    pooled = {"mode": "greedy", "tokens": 5, "off_argmax": 1, "gap_sum": 0.4, "rate": 0.05}
    store.record_score(ids[0], "pass", 0.7, ["ok"], {"tokens": 5}, "v1", pooled=pooled)
    store.record_score(ids[1], "fail", 1e-9, ["made up"], {"tokens": 9}, "v1")
    # an unscorable answer carries no evidence, even with a p-value stored beside it
    store.record_score(ids[2], "error", 0.5, ["reference failed"], {}, "v1")

    full = store.host_scores("h")
    narrow = store.host_outcomes("h")
    assert len(narrow) == len(full) == 6
    expected = [(r["probe"]["id"], r["dispatch"]["finished_at"], r["dispatch"]["error"],
                 r["dispatch"]["ttfb_s"], r["dispatch"]["total_s"], r["dispatch"]["bytes"],
                 r["score"] and r["score"]["verdict"], r["score"] and r["score"]["p_value"],
                 r["score"] and r["score"]["pooled"])
                for r in full]
    assert narrow == expected
    assert [o[0] for o in narrow[:2]] == failed[::-1]  # newest first
    by_id = {o.probe_id: o for o in outcomes(store, "h")}
    assert (by_id[ids[0]].verdict, by_id[ids[0]].p_value) == ("pass", 0.7)
    assert by_id[ids[0]].pooled == pooled and by_id[ids[1]].pooled is None
    assert (by_id[ids[1]].verdict, by_id[ids[1]].p_value) == ("fail", 1e-9)
    assert (by_id[ids[2]].verdict, by_id[ids[2]].p_value, by_id[ids[2]].answered) == ("error", None, True)
    assert (by_id[ids[3]].verdict, by_id[ids[3]].scored) == (None, False)
    assert [by_id[f].answered for f in failed] == [False, False]
    assert [by_id[f].error for f in failed] == ["timeout", "timeout"]
    with pytest.raises(ValueError, match="no host named"):
        store.host_outcomes("nobody")


# -- several processes ------------------------------------------------------------------

def _worker(kind: str, url: str, owner: str, barrier, results) -> None:
    """Claim until nothing is left; report (owner, what it got, error or None)."""
    store = Store(url)
    got: list[str] = []
    try:
        barrier.wait(timeout=30)
        for _ in range(100):  # a bound, so that a broken claim cannot loop forever
            if kind == "hosts":
                batch = store.claim_host_rounds(1, owner, limit=2, ttl_s=60)
                for name in batch:
                    store.finish_host_round(name, 1, owner)
            else:  # claim, then score: no dispatch may go to both while leased
                batch = [d["probe_id"] for d in store.claim_unscored(owner, limit=2, ttl_s=60)]
                for probe_id in batch:
                    store.record_score(probe_id, "pass", 1.0, [], {}, owner)
            if not batch:
                break
            got += batch
        results.put((owner, got, None))
    except Exception as exc:  # reported to the test instead of hanging it
        results.put((owner, got, repr(exc)))
    finally:
        store.close()


def _race(kind: str, url: str, workers: int = 2) -> dict[str, list[str]]:
    """Run `workers` spawned processes claiming at the same moment; what each got."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(kind, url, f"w{i}", barrier, results))
             for i in range(workers)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [error for _, _, error in reports] == [None] * workers
    return {owner: got for owner, got, _ in reports}


def test_processes_claim_each_host_once_per_round(store, url):
    names = [f"h{i:02d}" for i in range(40)]
    for name in names:
        store.add_host(name, f"http://{name}", "smollm2-135m")
    assert store.claim_host_rounds(1, "dead", 5, ttl_s=600) == names[:5]
    expire_leases(store)  # "dead" crashed: its leases run out
    assert store.claim_host_rounds(1, "alive", 3, ttl_s=600) == names[:3]  # taken over, live

    got = _race("hosts", url)
    claimed = [n for names_ in got.values() for n in names_]
    assert sorted(claimed) == names[3:]  # each once; expired ones taken over, live ones not
    with store.session(readonly=True) as s:
        rounds = s.execute(select(HostRound.owner, func.count())
                           .where(HostRound.done_at.is_not(None))
                           .group_by(HostRound.owner)).all()
    assert dict(rounds) == {owner: len(n) for owner, n in got.items() if n}


def test_processes_never_share_a_scoring_lease(store, url):
    store.add_host("h", "http://h", "smollm2-135m")
    ids = answered(store, "h", 30)
    got = _race("unscored", url)
    claimed = [i for batch in got.values() for i in batch]
    assert sorted(claimed) == sorted(ids)  # all handed out, none twice
    with store.session(readonly=True) as s:
        owners = dict(s.execute(select(Dispatch.probe_id, Dispatch.score_owner)).all())
        scorers = dict(s.execute(select(Score.probe_id, Score.validator)).all())
    assert all(owners[i] == scorers[i] == owner for owner, batch in got.items() for i in batch)
    assert store.queue_depth() == 0


def test_stats_export_and_status(store):
    store.add_host("h", "http://h", "smollm2-135m")
    store.add_host("idle", "http://i", "smollm2-135m")
    empty = store.status()
    assert (empty["last_round"], empty["queue_depth"], empty["last_answer_at"]) == (None, 0, None)
    assert empty["hosts_by_state"] == {"new": 2} and empty["validators"] == []

    ids = answered(store, "h", 2)
    store.ensure_probes(1, "h", [probe(5)])
    store.record_dispatch("h-1-5", call(ok=False, error="timeout"), "v1")
    store.ensure_probes(1, "h", [probe(6)])  # sent, not answered yet
    store.record_score(ids[0], "fail", 0.001, ["too unlikely"], {"z": -4.2}, "v2")
    store.set_score("h", 0.25)
    store.set_state("idle", "disabled", reason="admin")
    assert store.get_host("h")["score"] == 0.25 and store.reputation_events("h") == []

    assert store.host_stats() == {"h": {"probes": 4, "answered": 3, "failed": 1, "scored": 1}}
    assert store.probe(ids[1])["host"] == "h" and store.probe(ids[1])["index"] == 1
    assert store.probe("nope") is None

    rows = store.export_rows()
    assert [r["probe_id"] for r in rows] == ids + ["h-1-5"]
    assert (rows[0]["verdict"], rows[0]["p_value"], rows[0]["reasons"]) == (
        "fail", 0.001, ["too unlikely"])
    assert rows[1]["verdict"] is None and rows[2]["error"] == "timeout"
    assert rows[0]["host"] == "h" and rows[0]["text"] == f"answer to {ids[0]}"

    store.claim_host_rounds(2, "v1", 10, ttl_s=60)
    store.claim_unscored("v2", 10, ttl_s=60)
    st = store.status()
    assert (st["last_round"], st["queue_depth"]) == (2, 1)
    assert st["hosts_by_state"] == {"new": 1, "disabled": 1}
    assert st["last_answer_at"].tzinfo is not None and st["last_score_at"] is not None
    assert [(v["owner"], v["leases"]) for v in st["validators"]] == [("v1", 1), ("v2", 1)]
    assert st["validators"][0]["until"] > datetime.now(UTC)
