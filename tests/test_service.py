"""validator.service: the operations every front door calls, against a real SQLite file
and the local PostgreSQL (the `store` fixture runs each test on both)."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from validator.models.registry import Registry
from validator.probing.client import CallRecord
from validator.reputation import ReputationConfig, combined_score
from validator.scoring.batch import AnswerRecord, ScoredAnswer
from validator.service.config import ServeConfig
from validator.service.operations import Service, StateChanged
from validator.service.scorer import ModelUnavailable, Scorer
from validator.store import Store

MODEL = "smollm2-135m"


def _answered(store: Store, host: str, n: int) -> list[str]:
    """n probes of `host`, each answered (nothing scored)."""
    probes = [{"id": f"{host}-{i}", "index": i, "prompt_id": f"p{i}",
               "messages": [{"role": "user", "content": f"Question {i}?"}],
               "configs": {"temperature": 0.0, "top_k": 50, "top_p": 0.9, "max_tokens": 16},
               "stream": False} for i in range(n)]
    store.ensure_probes(1, host, probes)
    for p in probes:
        assert store.record_dispatch(p["id"], CallRecord(ok=True, status=200, text=f"Answer {p['index']}.",
                                                         ttfb_s=0.2, total_s=0.5, bytes=10, attempts=1), "t")
    return [p["id"] for p in probes]


def test_stored_score_is_the_apis_and_the_newer_rating_weighs_more(store):
    """The daemon's stored score (what `hosts list`, /api/hosts and /metrics show) and the
    components /api/hosts/{host} recomputes agree, and the newer of two ratings counts
    more. Before the service layer the stored score read the ratings newest first."""
    config = ReputationConfig(feedback_half_life=1.0)  # the newer rating weighs twice the older
    service = Service(store, Registry.load(), config)
    results = {}
    for host, (first, second) in {"pleasing": (1.0, 5.0), "souring": (5.0, 1.0)}.items():
        store.add_host(host, f"http://{host}", MODEL)
        ids = _answered(store, host, 3)
        for pid in ids:
            store.record_score(pid, "pass", 0.5, [], {}, "t")
        store.add_feedback(ids[0], first, "older")
        store.add_feedback(ids[1], second, "newer")
        service.refresh_reputation(host)
        stored = store.get_host(host)["score"]
        app = _app(store, config)
        with TestClient(app) as client:
            shown = client.get(f"/api/hosts/{host}").json()
        recomputed = combined_score(shown["state"], {k: v for k, v in shown["components"].items()
                                                     if k != "honesty"}, config)
        assert shown["score"] == pytest.approx(stored)
        assert recomputed == pytest.approx(stored)
        results[host] = shown["components"]["feedback"]
    assert results["pleasing"] == pytest.approx(2 / 3)  # (1 x 1.0 + 0.5 x 0.0) / 1.5
    assert results["souring"] == pytest.approx(1 / 3)


def _app(store: Store, config: ReputationConfig):
    from validator.web.app import create_app

    return create_app(store, ServeConfig(public_reads=True), registry=Registry.load(), reputation=config)


class PausingStore(Store):
    """A real store whose get_host, in one chosen thread, waits until told to go on: the
    interleaving of two admins that both read the state before either writes."""

    def __init__(self, url: str):
        super().__init__(url)
        self.paused_thread: str | None = None
        self.read = threading.Event()
        self.go_on = threading.Event()

    def get_host(self, name: str):
        found = super().get_host(name)
        if threading.current_thread().name == self.paused_thread:
            self.read.set()
            self.go_on.wait(10)
        return found


def test_two_concurrent_admin_transitions_record_one_change(url):
    from validator.store import upgrade

    upgrade(url)
    store = PausingStore(url)
    try:
        store.add_host("h", "http://h", MODEL)
        service = Service(store, Registry.load())
        store.paused_thread = "admin-a"
        outcome = {}

        def admin_a():
            try:
                outcome["a"] = service.transition("h", "disable", by="alice", note="slow")
            except StateChanged as exc:
                outcome["a"] = exc

        a = threading.Thread(target=admin_a, name="admin-a")
        a.start()
        assert store.read.wait(10)  # alice has read `new` and decided; bob now does the same
        outcome["b"] = service.transition("h", "disable", by="bob", note="fast")
        store.go_on.set()
        a.join(10)
        assert outcome["b"].state_to == "disabled"
        assert isinstance(outcome["a"], StateChanged)
        events = store.reputation_events("h")
        assert [(e["state_from"], e["state_to"]) for e in events] == [("new", "disabled")]
        assert events[0]["evidence"]["by"] == "bob"
    finally:
        store.close()


class Failing(Scorer):
    """A real Scorer that fails on chosen answers (as an alignment bug or a reference that
    cannot load would): everything else is scored as usual, without a model."""

    def __init__(self, registry, *, poisoned=(), unloadable=()):
        super().__init__(registry)
        self.poisoned, self.unloadable, self.calls = set(poisoned), set(unloadable), 0

    def score(self, records, *, rerun=True, progress=None):
        self.calls += 1
        if any(r.model in self.unloadable for r in records):
            raise ModelUnavailable("the reference model cannot be loaded here: OSError: no weights")
        if any(r.id in self.poisoned for r in records):
            raise IndexError("alignment walked off the end")
        return [ScoredAnswer(r.id, r.host, r.model, "pass", 0.5, ["fine"], {}, {"model": r.model})
                for r in records]


def test_a_batch_whose_scoring_raises_is_isolated_and_never_leased_again(store):
    registry = Registry.load()
    for host in ("a", "b"):
        store.add_host(host, f"http://{host}", MODEL)
    store.add_host("c", "http://c", "gemma-3-270m")
    ids = _answered(store, "a", 6) + _answered(store, "b", 5) + _answered(store, "c", 3)
    scorer = Failing(registry, poisoned={"a-2", "b-4"}, unloadable={"gemma-3-270m"})
    service = Service(store, registry, scorer=scorer)
    batch = service.score_stored("v1", limit=50, lease_s=60, rerun=False)
    assert batch.scored == len(ids)
    assert store.queue_depth() == 0
    assert service.score_stored("v1", limit=50, lease_s=60, rerun=False).scored == 0
    verdicts = {r["probe"]["id"]: r["score"] for h in ("a", "b", "c") for r in store.host_scores(h)}
    assert {pid for pid, s in verdicts.items() if s["verdict"] == "error"} == {"a-2", "b-4", "c-0", "c-1", "c-2"}
    assert verdicts["a-2"]["reasons"] == ["scoring failed: IndexError: alignment walked off the end"]
    assert "cannot be loaded here" in verdicts["c-0"]["reasons"][0]
    assert verdicts["a-0"]["provenance"] == {"model": MODEL} and verdicts["a-2"]["provenance"] is None
    # errors are the validator's: they neither count against the hosts nor for them
    assert store.get_host("a")["state"] == "new"


def test_stored_probe_that_cannot_be_read_is_scored_error(store):
    """A probe row with settings outside the API's ranges (an old or foreign row) becomes an
    `error` score with the reason instead of breaking the batch."""
    store.add_host("h", "http://h", MODEL)
    _answered(store, "h", 2)
    bad = {"id": "h-bad", "index": 9, "prompt_id": "p9", "messages": [{"role": "user", "content": "?"}],
           "configs": {"temperature": 500.0, "max_tokens": 16}, "stream": False}
    store.ensure_probes(1, "h", [bad])
    store.record_dispatch("h-bad", CallRecord(ok=True, status=200, text="x", total_s=0.1, bytes=1, attempts=1), "t")
    service = Service(store, Registry.load(), scorer=Failing(Registry.load()))
    assert service.score_stored("v1", limit=10, lease_s=60, rerun=False).scored == 3
    scores = {r["probe"]["id"]: r["score"] for r in store.host_scores("h")}
    assert scores["h-bad"]["verdict"] == "error"
    assert scores["h-bad"]["reasons"][0].startswith("unscorable probe: configs.temperature")


def test_provenance_is_stored_once_per_producer_and_read_back(store):
    store.add_host("h", "http://h", MODEL)
    ids = _answered(store, "h", 3)
    body = {"model": MODEL, "checkpoint": {"kind": "package", "sha256": "ab" * 32}, "validator": "0.1.0"}
    store.record_score(ids[0], "pass", 0.5, [], {}, "t", provenance=body)
    store.record_score(ids[1], "fail", 1e-9, [], {}, "t", provenance=dict(body))
    store.record_score(ids[2], "error", None, ["why"], {}, "t")
    by_id = {r["probe"]["id"]: r["score"]["provenance"] for r in store.host_scores("h")}
    assert by_id == {ids[0]: body, ids[1]: body, ids[2]: None}
    assert store.probe_detail(ids[1])["score"]["provenance"] == body
    with store.session(readonly=True) as s:
        from sqlalchemy import func, select

        from validator.store import Provenance
        assert s.scalar(select(func.count()).select_from(Provenance)) == 1


def test_real_scorer_records_what_produced_each_verdict(tmp_path, ref):
    """The real scorer's provenance: the checkpoint file's hash, the calibration file's
    hash, the rule and the version (what `hosts show` and the probe page print)."""
    import hashlib

    from validator import __version__
    from validator.service.provenance import describe

    registry = Registry.load()
    spec = registry.get(MODEL)
    scorer = Scorer(registry, models={MODEL: ref})
    record = AnswerRecord.build("x", "h", MODEL, [{"role": "user", "content": "Say hi."}],
                                {"temperature": 0.0, "max_tokens": 8}, "Hi")
    (out,) = scorer.score([record], rerun=False)
    prov = out.provenance
    assert prov["checkpoint"]["sha256"] == hashlib.sha256(spec.gguf_path().read_bytes()).hexdigest()
    assert prov["calibration"] == {"file": spec.calibration.name,
                                   "sha256": hashlib.sha256(spec.calibration.read_bytes()).hexdigest()}
    assert prov["verdict_rule"]["fail_below"] == scorer.rule.fail_below
    assert prov["validator"] == __version__
    assert spec.calibration.name in describe(prov)


def test_lease_of_a_slow_round_is_renewed(tmp_path):
    """A round slower than `rounds.lease_s` keeps its host-round lease: another validator
    cannot claim the host and send its probes again meanwhile."""
    import asyncio

    from validator.daemon import Daemon
    from validator.network.simulator import NetworkConfig, SimulatedNetwork
    from validator.service.config import ValidatorConfig

    net = SimulatedNetwork(NetworkConfig.model_validate({"model": MODEL, "hosts": [
        {"name": "slow", "strategy": "slow-first-byte", "delay_s": 3.0}]}))
    net.start()
    db = tmp_path / "v.db"
    try:
        cfg = ValidatorConfig.model_validate({
            "database": str(db), "instance": "one", "secret": "test",
            "rounds": {"interval_s": 60, "lease_s": 1.2, "spread_s": 0, "probes_per_host": 2},
            "client": {"first_byte_s": 10, "total_s": 20},
            "hosts": [{"name": "slow", "url": net.urls["slow"], "model": MODEL}]})
        daemon = Daemon(cfg)
        other = Store(Store.default_url(db))
        stolen = []

        async def main():
            round_task = asyncio.ensure_future(daemon.probe_round(7))
            for _ in range(8):  # over 2.5 s: twice the lease
                await asyncio.sleep(0.35)
                stolen.extend(await asyncio.to_thread(other.claim_host_rounds, 7, "two", 10, 1.2))
            await round_task

        asyncio.run(main())
        assert stolen == []
        assert len(other.host_scores("slow")) == 2
        other.close()
    finally:
        net.stop()
