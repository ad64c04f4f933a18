"""Hostile hosts (issue 20): whatever a host sends, the round goes on for every other
host, the hostile host's calls are stored with their error class, and its availability
falls.

- The store bounds what a host controls to its columns (both backends).
- The real Daemon referees one round over the `hostile` family of simulated hosts
  (validator.network.hostile, real loopback HTTP and raw sockets) beside honest ones, on
  SQLite and on PostgreSQL.
"""

from __future__ import annotations

from dataclasses import replace

import asyncio
import socket
import time

import pytest
import yaml
from sqlalchemy import select

from validator.daemon import Daemon
from validator.models.sampling import Settings
from validator.network.simulator import NetworkConfig, SimulatedNetwork
from validator.probing.client import Err
from validator.reputation import ReputationConfig, components
from validator.service.config import ValidatorConfig
from validator.service.credentials import env_name
from validator.service.operations import outcomes
from validator.store import Dispatch, Host, HostRound, Probe, Score, Store

from .conftest import MODEL, PG_URL, fresh_postgres_database


# ------------------------------------------------------------------ the store


def _one_probe(store, host: str = "h") -> str:
    store.add_host(host, "http://127.0.0.1:9/v1", "smollm2-135m")
    pid = f"{host}-1-0"
    store.ensure_probes(1, host, [{"id": pid, "index": 0, "prompt_id": "p", "stream": False,
                                   "messages": [{"role": "user", "content": "hi"}],
                                   "configs": {"temperature": 0.0, "max_tokens": 8}}])
    return pid


def _stored(store, pid: str):
    with store.session(readonly=True) as s:
        return s.scalars(select(Dispatch).where(Dispatch.probe_id == pid)).one()


def test_a_served_by_longer_than_its_column_is_stored_cut_with_a_marker(store):  # both backends
    """300 characters into String(256) failed the insert on PostgreSQL (and so the round)."""
    pid = _one_probe(store)
    served_by = "gpu-" + "h" * 296
    assert store.record_dispatch(pid, {"ok": True, "text": "hi", "served_by": served_by}, "v")
    d = _stored(store, pid)
    assert len(d.served_by) == 256 and d.served_by.startswith("gpu-hhh")
    assert d.served_by.endswith("[300 chars]")


def test_strings_a_host_controls_are_bounded_and_storable(store):
    pid = _one_probe(store)
    record = {"ok": False, "error": "e" * 200, "detail": "the host said \ud800\x00",
              "served_by": "a\x00b\ud800c"}
    assert store.record_dispatch(pid, record, "v")
    d = _stored(store, pid)
    assert len(d.error) == 64 and d.error.endswith("[200 chars]")
    assert d.served_by == "a\ufffdb\ufffdc"  # NUL and a lone surrogate: neither fits a column
    assert d.detail.startswith("the host said \ufffd")  # a 4xx's message is the host's words
    with store.session(readonly=True) as s:
        assert store._tallies(s, f"error:{d.error}") == [("h", f"error:{d.error}", 1.0)]


# ------------------------------------------------------------------ a round with hostile hosts

PROBES = 2
# Short answers keep the model-backed host quick on a busy machine (the test is about
# the round, not the answers' length).
SHORT_MIX = [(1.0, Settings(temperature=0.0, top_k=50, top_p=0.5, max_tokens=16)),
             (1.0, Settings(temperature=0.7, top_k=50, top_p=0.9, max_tokens=16))]
# host -> (simulator host entry, error class of a non-streamed call, of a streamed one);
# None: answered (then scored). A stream is plain text: a body that is no JSON envelope
# is the answer there, and the scorer judges it.
NETWORK = {
    "honest-llama": ({"strategy": "honest-llama.cpp"}, None, None),
    "static-ok": ({"strategy": "static"}, None, None),
    "nested-json": ({"strategy": "hostile-nested-json"}, Err.MALFORMED_JSON, None),
    "nested-in-envelope": ({"strategy": "hostile-nested-json", "in_envelope": True}, Err.MALFORMED_JSON, None),
    "huge-number": ({"strategy": "hostile-huge-number"}, Err.MALFORMED_JSON, None),
    "wrong-type": ({"strategy": "hostile-wrong-type"}, Err.BAD_ENVELOPE, None),
    "html": ({"strategy": "hostile-html"}, Err.MALFORMED_JSON, None),
    "long-header": ({"strategy": "hostile-long-header", "length": 300}, None, None),
    "header-past-the-parser": ({"strategy": "hostile-long-header", "length": 200_000},
                               Err.PROTOCOL_ERROR, Err.PROTOCOL_ERROR),
    "binary-header": ({"strategy": "hostile-binary-header"}, None, None),
    "nul-header": ({"strategy": "hostile-binary-header", "nul": True}, Err.PROTOCOL_ERROR, Err.PROTOCOL_ERROR),
    "redirect-loop": ({"strategy": "hostile-redirect"}, Err.REDIRECT, Err.REDIRECT),
    "redirect-away": ({"strategy": "hostile-redirect"}, Err.REDIRECT, Err.REDIRECT),  # location: the canary
    "gzip-bomb": ({"strategy": "hostile-gzip-bomb"}, Err.OVERSIZED, Err.OVERSIZED),
    "lying-length": ({"strategy": "hostile-lying-length"}, Err.STREAM_CUT, Err.STREAM_CUT),
    "trickled-header": ({"strategy": "hostile-trickled-header"}, Err.FIRST_BYTE_TIMEOUT, Err.FIRST_BYTE_TIMEOUT),
}
# Not in the simulator: a host whose URL our client refuses (a ValueError in the daemon's
# own code, which escaped the round's gather and abandoned the round).
BAD_URL = "bad-url"
ALWAYS_BROKEN = {name for name, (_, plain, streamed) in NETWORK.items() if plain and streamed} | {BAD_URL}


@pytest.fixture(scope="module")
def canary():
    """A port on loopback that nobody should ever connect to (a redirect's target)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture(scope="module")
def hostile_network(canary):
    hosts = [{"name": name, **entry} for name, (entry, _, _) in NETWORK.items()]
    for h in hosts:
        if h["name"] == "redirect-away":
            h["location"] = f"http://127.0.0.1:{canary.getsockname()[1]}/v1/ai/text_completion"
    net = SimulatedNetwork(NetworkConfig.model_validate({"model": MODEL, "hosts": hosts}))
    net.load()
    with net:
        yield net


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        yield Store.default_url(tmp_path / "hostile.db")
        return
    with fresh_postgres_database() as name:
        yield PG_URL.format(db=name)


def with_tokens(monkeypatch, names) -> None:
    """The simulated hosts want a bearer token, any one: the validator's own credentials."""
    for name in names:
        monkeypatch.setenv(env_name(name, "token"), f"token-{name}")


def test_a_round_with_hostile_hosts_probes_records_and_scores_everyone(
        hostile_network, canary, database, ref, registry, monkeypatch):
    with_tokens(monkeypatch, [*NETWORK, BAD_URL])
    config = ValidatorConfig.model_validate({
        "database": database, "secret": "hostile-round", "prompts": "configs/prompts/general.yaml",
        "rounds": {"interval_s": 1e9, "jitter_s": 0, "spread_s": 0, "probes_per_host": PROBES,
                   "concurrency": 16, "claim_batch": 50, "lease_s": 600},
        "scoring": {"interval_s": 0.5, "batch": 32, "lease_s": 600},
        # first_byte_s bounds the trickled header's hold on the round.
        "client": {"connect_s": 2, "first_byte_s": 10, "total_s": 30, "retries": 1},
        "hosts": [{"name": name, "url": url, "model": MODEL} for name, url in hostile_network.urls.items()]
                 + [{"name": BAD_URL, "url": "ftp://127.0.0.1/v1", "model": MODEL}]})
    events: list[str] = []
    daemon = Daemon(config, registry=registry, models={MODEL: ref}, on_event=events.append)
    daemon.mix = SHORT_MIX

    async def one_round():  # an abandoned round never finishes: bound the wait
        return await asyncio.wait_for(daemon.run(max_rounds=1, first_round=1), timeout=150)

    t0 = time.monotonic()
    progress = asyncio.run(one_round())
    took = time.monotonic() - t0
    assert progress.rounds == 1, events
    store = Store(database)
    try:
        with store.session(readonly=True) as s:
            rows = s.execute(
                select(Host.name, Probe.stream, Dispatch.ok, Dispatch.error, Dispatch.detail,
                       Dispatch.served_by, Score.verdict)
                .join(Probe, Probe.host_id == Host.id)
                .outerjoin(Dispatch, Dispatch.probe_id == Probe.id)
                .outerjoin(Score, Score.probe_id == Probe.id)).all()
            rounds_done = dict(s.execute(
                select(Host.name, HostRound.done_at).join(HostRound, HostRound.host_id == Host.id)).all())
        by_host: dict[str, list] = {}
        for r in rows:
            by_host.setdefault(r.name, []).append(r)
        assert set(by_host) == set(NETWORK) | {BAD_URL}
        assert set(rounds_done) == set(by_host) and all(rounds_done.values())  # no host left open
        for name, calls in by_host.items():
            assert len(calls) == PROBES, name
            expected = NETWORK.get(name, (None, Err.CLIENT_BUG, Err.CLIENT_BUG))
            for c in calls:
                want = expected[2] if c.stream else expected[1]
                assert c.ok is not None, f"{name}: a probe without a stored call"
                assert (c.ok, c.error) == (want is None, want), (name, c.stream, c.error, c.detail)
                if c.ok:  # every answer scored (a hostile text fails; the scorer never stalls)
                    assert c.verdict in ("pass", "fail", "inconclusive"), (name, c.verdict)
                else:
                    assert c.verdict is None and c.detail
        assert all(c.verdict != "fail" for c in by_host["honest-llama"])
        assert all("ValueError" in c.detail for c in by_host[BAD_URL])
        marker = "...[300 chars]"  # 300 characters into String(256) failed the insert on PostgreSQL
        assert {c.served_by for c in by_host["long-header"]} == {"gpu-" + "x" * (256 - 4 - len(marker)) + marker}
        assert {c.served_by for c in by_host["binary-header"]} == {"gpu-\xff\xfe\x80\xc3(-host"}
        with pytest.raises(BlockingIOError):  # nothing ever connected to the redirect's target
            canary.accept()

        config_rep = ReputationConfig.from_dict(config.reputation)
        for name in by_host:
            parts = components(outcomes(store, name), [], config_rep)
            if name in ALWAYS_BROKEN:  # recorded, and its availability fell to nothing
                assert parts["availability"] == 0.0 and store.get_host(name)["score"] == 0.0, name
        assert components(outcomes(store, "honest-llama"), [], config_rep)["availability"] == 1.0
        assert store.get_host("honest-llama")["state"] != "flagged"
    finally:
        store.close()
    print(f"{database.split(':')[0]}: one hostile round, scored, in {took:.1f} s")


def test_a_probe_the_client_refuses_is_recorded_and_the_hosts_others_answered(tmp_path, monkeypatch):
    """A bank prompt our own client refuses (a role the API does not have) raises in the
    daemon: the host's other probes are still answered and stored, the refused one is
    recorded as client_bug, and the round is closed for the host."""
    bank = tmp_path / "bank.yaml"
    bank.write_text(yaml.safe_dump({"prompts": [
        {"id": "good-1", "messages": [{"role": "user", "content": "Say hello."}]},
        {"id": "bad-role", "messages": [{"role": "user", "content": "A role goes wrong after loading."}]},
        {"id": "good-2", "messages": [{"role": "user", "content": "Name a colour."}]}]}))
    url = Store.default_url(tmp_path / "v.db")
    with_tokens(monkeypatch, ["s"])
    net = SimulatedNetwork(NetworkConfig.model_validate({"hosts": [{"name": "s", "strategy": "static"}]}))
    with net:
        config = ValidatorConfig.model_validate({
            "database": url, "secret": "s", "prompts": str(bank),
            "rounds": {"interval_s": 1e9, "jitter_s": 0, "spread_s": 0, "probes_per_host": 3},
            "client": {"connect_s": 2, "first_byte_s": 5, "total_s": 10, "retries": 0},
            "hosts": [{"name": "s", "url": net.urls["s"], "model": MODEL}]})
        daemon = Daemon(config, on_event=lambda m: None)
        # load_bank refuses a bad role, so the bad prompt is put in after loading (as a
        # bug between the bank and the client would): the client refuses it when sending.
        daemon.bank = [replace(p, messages=[{"role": "tool", "content": "{}"}]) if p.id == "bad-role" else p
                       for p in daemon.bank]
        assert asyncio.run(daemon.probe_round(1)) == 1
    store = Store(url)
    try:
        with store.session(readonly=True) as s:
            calls = {r.prompt_id: r for r in s.execute(
                select(Probe.prompt_id, Dispatch.ok, Dispatch.error, Dispatch.detail, HostRound.done_at)
                .join(Dispatch, Dispatch.probe_id == Probe.id)
                .join(HostRound, HostRound.host_id == Probe.host_id))}
    finally:
        store.close()
    assert set(calls) == {"good-1", "bad-role", "good-2"}
    assert calls["good-1"].ok and calls["good-2"].ok
    assert (calls["bad-role"].ok, calls["bad-role"].error) == (False, Err.CLIENT_BUG)
    assert "ValueError" in calls["bad-role"].detail
    assert all(c.done_at is not None for c in calls.values())
