"""The client against the simulated network, over real sockets.

Fault hosts run in a `validator simulate` subprocess (the real CLI); hosts with models run
in-process (SimulatedNetwork in a thread) so they share the session's loaded engines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from validator.service.audit import run_audit
from validator.service.scorer import Scorer
from validator.probing.client import Err, FlexstackClient, Timeouts
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix
from validator.models.sampling import Settings
from validator.network.simulator import STATIC_TEXT, STRATEGIES, NetworkConfig, SimulatedNetwork

from .conftest import MODEL

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
GREEDY = Settings(temperature=0.0, top_k=50, top_p=0.5, max_tokens=64)
# first_byte 1.5 s: the slow host (3 s) and the hung one both run past it.
FAST = Timeouts(connect=1.0, first_byte=1.5, total=8.0, max_bytes=1 << 20,
                backoff_base=0.05, backoff_cap=0.2)

FAULTS = {  # host -> (strategy options, error class the client must record)
    "fault-slow": ({"strategy": "slow-first-byte", "delay_s": 3}, Err.FIRST_BYTE_TIMEOUT),
    "fault-hang": ({"strategy": "hang"}, Err.FIRST_BYTE_TIMEOUT),
    "fault-500": ({"strategy": "server-error"}, Err.SERVER_ERROR),
    "fault-429": ({"strategy": "rate-limited", "retry_after_s": 1}, Err.RATE_LIMITED),
    "fault-malformed-json": ({"strategy": "malformed-json"}, Err.MALFORMED_JSON),
    "fault-stream-cut": ({"strategy": "stream-cut"}, Err.STREAM_CUT),
    "fault-oversized": ({"strategy": "oversized", "size_bytes": 4 << 20}, Err.OVERSIZED),
    "fault-invalid-utf8": ({"strategy": "invalid-utf8"}, Err.INVALID_UTF8),
}


def start_simulator(network: dict, tmp: Path) -> tuple[subprocess.Popen, dict[str, tuple[str, str]]]:
    """`validator simulate` in a subprocess; returns it and {name: (url, strategy)}."""
    path = tmp / "network.yaml"
    path.write_text(yaml.safe_dump(network))
    proc = subprocess.Popen([sys.executable, "-m", "validator.cli", "simulate", "--network", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = len(network["hosts"]) + (1 if network.get("gateway") else 0)
    rows = {}
    while len(rows) < expected:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulate exited: {proc.stderr.read()}")
        name, url, strategy = line.split()
        rows[name] = (url, strategy)
    return proc, rows


def stop_simulator(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def fault_network(tmp_path_factory):
    network = {"hosts": [{"name": "ok", "strategy": "static"}]
               + [{"name": name, **options} for name, (options, _) in FAULTS.items()],
               "gateway": {"hosts": ["ok", "fault-500"]}}
    proc, rows = start_simulator(network, tmp_path_factory.mktemp("faults"))
    yield rows
    assert stop_simulator(proc) == 0, "simulate did not exit cleanly on SIGINT"


def test_simulate_prints_one_line_per_host(fault_network):
    assert fault_network["ok"][1] == "static"
    for name, (options, _) in FAULTS.items():
        url, strategy = fault_network[name]
        assert strategy == options["strategy"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert fault_network["gateway"][1] == "gateway(ok,fault-500)"
    assert len({url for url, _ in fault_network.values()}) == len(fault_network)


@pytest.mark.parametrize("stream", [False, True])
def test_each_fault_yields_its_error_class(fault_network, stream):
    async def one(name):
        async with FlexstackClient(fault_network[name][0], token="any", timeouts=FAST) as c:
            return await c.complete(MSGS, GREEDY, stream=stream)

    async def main():
        return {name: await one(name) for name in ["ok", *FAULTS]}

    records = asyncio.run(main())
    assert records["ok"].ok and records["ok"].text == STATIC_TEXT
    for name, (_, error) in FAULTS.items():
        if stream and name == "fault-malformed-json":  # streams are plain text: no JSON to break
            assert records[name].ok
            continue
        assert records[name].error == error, (name, records[name])
        assert not records[name].ok and records[name].text is None
    # transient failures are retried (2 retries), and the 429's Retry-After is honoured
    assert records["fault-500"].attempts == 3 and records["fault-429"].attempts == 3
    assert records["fault-429"].total_s >= 2.0
    assert records["fault-oversized"].bytes <= 2 * FAST.max_bytes + 200_000
    assert records["fault-hang"].total_s < FAST.connect + FAST.first_byte + 1


def test_a_round_over_every_host_raises_nothing(fault_network):
    """One round, every host and both modes at once on one pool: each call ends as a
    record within the per-call deadline; no exception escapes the round."""
    async def main():
        async with httpx.AsyncClient(trust_env=False) as http:
            clients = [FlexstackClient(url, token="t", timeouts=FAST, http=http)
                       for url, _ in fault_network.values()]
            t0 = time.monotonic()
            records = await asyncio.gather(*(c.complete(MSGS, GREEDY, stream=s)
                                             for c in clients for s in (False, True)))
            return records, time.monotonic() - t0

    records, elapsed = asyncio.run(main())
    assert len(records) == 2 * len(fault_network)
    assert all(r.ok == (r.error is None) for r in records)
    assert sum(r.ok for r in records) >= 3  # ok (x2), malformed stream, gateway's ok turn
    assert elapsed < FAST.total + 2


def test_slow_host_within_the_window_is_answered(fault_network):
    patient = Timeouts(connect=1.0, first_byte=6.0, total=10.0)

    async def main():
        async with FlexstackClient(fault_network["fault-slow"][0], token="t", timeouts=patient) as c:
            return await c.complete(MSGS, GREEDY)

    rec = asyncio.run(main())
    assert rec.ok and rec.text == STATIC_TEXT and rec.ttfb_s >= 3.0


def test_gateway_routes_round_robin_and_names_the_host(fault_network):
    async def main():
        async with FlexstackClient(fault_network["gateway"][0], token="t",
                                   timeouts=Timeouts(retries=0)) as c:
            return [await c.complete(MSGS, GREEDY) for _ in range(4)]

    records = asyncio.run(main())
    served = [r.served_by for r in records]
    assert set(served) == {"ok", "fault-500"}
    assert served[0] != served[1] and served[:2] == served[2:]  # round robin
    for r in records:
        assert r.ok == (r.served_by == "ok")
        assert r.ok or r.error == Err.SERVER_ERROR


# ------------------------------------------------------------------ auth, in-process

def static_network(**extra) -> SimulatedNetwork:
    cfg = NetworkConfig.model_validate({"hosts": [{"name": "a", "strategy": "static"}], **extra})
    return SimulatedNetwork(cfg)


def test_credentials_login_refresh_and_rejection():
    creds = {"username": "alice", "password": "s3cret", "token_ttl_s": 1.0}
    with static_network(credentials=creds) as net:
        url = net.urls["a"]

        async def main():
            async with FlexstackClient(url, username="alice", password="s3cret", timeouts=FAST) as c:
                first = await c.complete(MSGS, GREEDY)  # logs in first
                token = c.token
                await asyncio.sleep(1.1)  # the 1 s token expires; the client renews first
                second = await c.complete(MSGS, GREEDY, stream=True)
                renewed = c.token != token
            async with FlexstackClient(url, username="alice", password="wrong", timeouts=FAST) as c:
                wrong = await c.complete(MSGS, GREEDY)
            async with FlexstackClient(url, token="forged", timeouts=FAST) as c:
                forged = await c.complete(MSGS, GREEDY)
            async with FlexstackClient(url, token="stale", username="alice", password="s3cret",
                                       timeouts=FAST) as c:
                stale = await c.complete(MSGS, GREEDY)  # 401, log in, retry
            return first, second, renewed, wrong, forged, stale

        first, second, renewed, wrong, forged, stale = asyncio.run(main())
    assert first.ok and second.ok and renewed
    assert second.text == first.text == STATIC_TEXT
    assert wrong.error == Err.AUTH_FAILED and forged.error == Err.AUTH_FAILED
    assert forged.status == 401
    assert stale.ok and stale.attempts == 2


def test_without_credentials_any_bearer_or_none_is_accepted():
    with static_network() as net:
        url = net.urls["a"] + "/ai/text_completion"
        body = {"messages": MSGS, "configs": {"temperature": 0}}
        with httpx.Client(trust_env=False) as http:
            anyone = http.post(url, json=body, headers={"Authorization": "Bearer whatever"})
            nobody = http.post(url, json=body)
            bad_role = http.post(url, json={"messages": [{"role": "bot", "content": "x"}]},
                                 headers={"Authorization": "Bearer x"})
            bad_configs = http.post(url, json={"messages": MSGS, "configs": {"top_p": 3}},
                                    headers={"Authorization": "Bearer x"})
    assert anyone.status_code == 200
    assert anyone.json()["data"]["data"]["response"] == STATIC_TEXT
    assert anyone.json()["data"]["configs"]["temperature"] == 0
    assert nobody.status_code == 200  # a validator without a token sends no Authorization
    assert bad_role.status_code == 422
    assert bad_role.json()["detail"][0]["loc"] == ["body", "messages", 0, "role"]
    assert bad_configs.status_code == 422 and "top_p" in bad_configs.json()["detail"][0]["msg"]


def test_network_file_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown strategies"):
        SimulatedNetwork(NetworkConfig.model_validate({"hosts": [{"name": "a", "strategy": "nope"}]}))
    with pytest.raises(ValueError, match="delay_s"):
        SimulatedNetwork(NetworkConfig.model_validate(
            {"hosts": [{"name": "a", "strategy": "slow-first-byte", "delay_s": "soon"}]}))
    with pytest.raises(ValueError, match="unknown hosts"):
        SimulatedNetwork(NetworkConfig.model_validate(
            {"hosts": [{"name": "a", "strategy": "static"}], "gateway": {"hosts": ["b"]}}))
    demo = NetworkConfig.load("configs/network.demo.yaml")
    assert {h.strategy for h in demo.hosts} <= set(STRATEGIES)


# ------------------------------------------------------------------ leaks

def _open_sockets() -> int:
    fds = os.listdir("/proc/self/fd")
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_no_sockets_or_tasks_leak(tmp_path):
    """300 probes at concurrency 30 to 10 hosts, a third of them failing in different
    ways: afterwards the client holds no socket and no task."""
    hosts = [{"name": f"fast-{i}", "strategy": "static"} for i in range(7)] + [
        {"name": "cut", "strategy": "stream-cut"},
        {"name": "big", "strategy": "oversized", "size_bytes": 2 << 20},
        {"name": "hang", "strategy": "hang"}]
    proc, rows = start_simulator({"hosts": hosts}, tmp_path)
    try:
        before = _open_sockets()
        quick = Timeouts(connect=1.0, first_byte=0.5, total=2.0, max_bytes=256 << 10, retries=0)

        async def main():
            sem = asyncio.Semaphore(30)
            async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
                    max_connections=60, keepalive_expiry=4.0)) as http:
                clients = [FlexstackClient(url, token="t", timeouts=quick, http=http)
                           for url, _ in rows.values()]

                async def probe(i):
                    async with sem:
                        return await clients[i % len(clients)].complete(MSGS, GREEDY, stream=i % 2 == 1)

                records = await asyncio.gather(*(probe(i) for i in range(300)))
                during = _open_sockets()
            await asyncio.sleep(0)
            return records, during, {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

        records, during, tasks = asyncio.run(main())
        after = _open_sockets()
    finally:
        stop_simulator(proc)
    assert len(records) == 300
    assert sum(r.ok for r in records) == 210  # the 7 static hosts' share
    assert {r.error for r in records if not r.ok} == {Err.STREAM_CUT, Err.OVERSIZED, Err.FIRST_BYTE_TIMEOUT}
    assert during > before  # the count does see the pool's connections
    assert after == before, f"{after - before} sockets left open"
    assert not tasks, f"tasks left behind: {tasks}"


# ------------------------------------------------------------------ hosts with models

# Audited through the daemon in tests/test_demo.py: the honest transformers and llama.cpp
# hosts, the other-model and replayed cheats. tests/test_detection.py scores every host of
# the catalogue (validator.network.catalogue: these strategies, run offline), and
# benchmarks/detection.py runs every strategy through the daemon. Two cheats are audited
# here over HTTP as well, beside an honest control.
MODEL_HOSTS = {  # name -> strategy, options
    "cheat-requantised": ("requantised", {}),
    "cheat-settings-ignored": ("settings-ignored", {}),
}
# Models generate on a shared 2-core CPU here, one request at a time per engine.
PATIENT = Timeouts(first_byte=600, total=900)
AUDITED = [*MODEL_HOSTS, "honest-llama-cpp"]  # an honest control beside the cheats
PROBES_PER_HOST = 10


@pytest.fixture(scope="module")
def model_network(registry, hosts):  # `hosts` loads the engines the simulator will share
    cfg = NetworkConfig.model_validate({"model": MODEL, "hosts": [
        {"name": name, "strategy": strategy, **options}
        for name, (strategy, options) in MODEL_HOSTS.items()]
        + [{"name": "honest-llama-cpp", "strategy": "honest-llama.cpp"}]})
    with SimulatedNetwork(cfg, registry) as net:
        yield net


def test_stream_and_plain_answers_are_the_same_text(model_network):
    """One honest greedy host (llama.cpp), both stream modes, prompts whose answers hold
    blank lines."""
    prompts = ["Write two short paragraphs about the sea, separated by a blank line.",
               "List three fruits as a bulleted list, then add one sentence after a blank line.",
               "Give a short poem of two stanzas."]
    settings = Settings(temperature=0.0, top_k=50, top_p=0.5, max_tokens=96)

    async def main():
        async with FlexstackClient(model_network.urls["honest-llama-cpp"], token="t", timeouts=PATIENT) as c:
            out = []
            for p in prompts:
                msgs = [{"role": "user", "content": p}]
                out.append((await c.complete(msgs, settings, model=MODEL),
                            await c.complete(msgs, settings, model=MODEL, stream=True)))
            return out

    pairs = asyncio.run(main())
    assert all(plain.ok and streamed.ok for plain, streamed in pairs), [
        (r.error, r.detail) for pair in pairs for r in pair if not r.ok]
    assert [plain.text for plain, _ in pairs] == [streamed.text for _, streamed in pairs]
    assert any("\n\n" in plain.text for plain, _ in pairs), "no answer held a blank line"


# Slow (about 70 s): the same strategies are refereed through the daemon by
# tests/test_demo.py (a subset) and benchmarks/detection.py (all of them); `make test-slow`.
@pytest.mark.slow
def test_simulated_hosts_pass_or_fail_audit(model_network, registry, ref):
    """Every model-backed strategy answers probes through the client; `validator audit`'s
    scorer finds the honest hosts honest and every cheat dishonest."""
    prompts = load_bank("configs/prompts/general.yaml")[40:40 + PROBES_PER_HOST // 2]
    probes = greedy_and_sampled(prompts, load_mix("calibration"), seed=23)

    async def main():
        async with httpx.AsyncClient(trust_env=False) as http:
            async def host_records(name):
                client = FlexstackClient(model_network.urls[name], token="t", http=http, timeouts=PATIENT)
                out = []
                for i, (prompt, settings) in enumerate(probes):
                    rec = await client.complete(prompt.messages, settings, model=MODEL, stream=i % 2 == 1)
                    assert rec.ok, (name, rec)
                    out.append({"id": f"{name}/{prompt.id}/{i}", "host": name, "model": MODEL,
                                "messages": prompt.messages, "configs": settings.as_configs(),
                                "response": rec.text})
                return out

            per_host = await asyncio.gather(*(host_records(n) for n in AUDITED))
            return [r for rs in per_host for r in rs]

    import json
    records = asyncio.run(main())
    lines, verdicts = run_audit((json.dumps(r) for r in records), Scorer(registry, models={MODEL: ref}),
                                rerun=False)
    for name in AUDITED:
        got = verdicts[name]
        assert got["records"] == PROBES_PER_HOST
        if name.startswith("honest"):
            assert got["failed"] == 0 and got["verdict"] != "dishonest", (name, got)
        else:
            assert got["verdict"] == "dishonest", (name, got, [
                (l["verdict"], l["reasons"][:1]) for l in lines if l["host"] == name])
