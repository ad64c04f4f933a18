"""Probes a host cannot tell from its users' requests: private banks and their import,
settings within the API's documented ranges, the network's own client's wire shape,
Poisson departure times keyed by the secret, and the delay before readers see probes.
Requests go over real HTTP to a loopback server that records them as a host sees them
(benchmarks/probe_stealth.py's Capture); the daemon runs its real probing round."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from validator.cli import app as cli
from validator.daemon import Daemon
from validator.configs import shipped
from validator.models.sampling import Settings
from validator.probing.client import FlexstackClient, Timeouts
from validator.probing.probes import (DOCUMENTED, SETTINGS_FILE, arrival_offsets, catch_up, derive_probes,
                                      import_requests, load_bank, load_mix, load_probe_mix,
                                      outside_documented, schedule_phase, shipped_in_repository)
from validator.service.config import ServeConfig, ValidatorConfig
from validator.store import Store, upgrade

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from probe_stealth import Capture  # noqa: E402  (benchmarks/ is on sys.path)

MSGS = [{"role": "user", "content": "How long do I boil an egg?"}]
runner = CliRunner()


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ banks

def test_banks_yaml_jsonl_directory_and_several(tmp_path):
    bank_dir = tmp_path / "banks"
    bank_dir.mkdir()
    jsonl(bank_dir / "a.jsonl", [{"messages": MSGS}, {"id": "mine-1", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a red fruit."}]}])
    (bank_dir / "b.yaml").write_text(yaml.safe_dump({"prompts": [
        {"id": "y-1", "kind": "question", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
        {"id": "y-2", "messages": MSGS}]}))  # the same conversation as a.jsonl's first: kept once
    (bank_dir / "notes.txt").write_text("not a bank")
    bank = load_bank(bank_dir)
    assert [p.id for p in bank][1:] == ["mine-1", "y-1"] and bank[0].id.startswith("p-")
    assert bank[0].messages == MSGS and bank[2].kind == "question"
    both = load_bank([str(bank_dir / "b.yaml"), "configs/prompts/general.yaml"])
    assert len(both) == 2 + 80  # several banks: one list
    # a config names one bank or several
    assert ValidatorConfig.model_validate({"prompts": [str(bank_dir), "configs/prompts/general.yaml"]}).prompts


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "robot", "content": "x"}]}], "bad role"),
    (["{not json"], "not JSON"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "last message not from the user"),
    ([{"id": "same", "messages": MSGS}, {"id": "same", "messages": [{"role": "user", "content": "other"}]}],
     "used twice"),
])
def test_a_bad_bank_is_an_error_that_says_where(tmp_path, rows, message):
    path = jsonl(tmp_path / "bank.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_bank(path)
    with pytest.raises(ValueError, match="no prompt bank"):
        load_bank(tmp_path / "missing.jsonl")


def test_import_dedups_checks_roles_and_lengths_and_reports(tmp_path):
    long = "x" * 9000
    rows = [{"messages": MSGS, "configs": {"temperature": 0.7}},
            {"messages": MSGS, "configs": {"top_k": 0}},  # duplicate; settings outside the ranges
            {"messages": [{"role": "user", "content": "Plan a picnic for six."}]},
            {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
            {"messages": [{"role": "user", "content": "  "}]},
            {"messages": [{"role": "user", "content": long}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}]},
            {"prompt": "no messages"}, "][", ""]
    src = jsonl(tmp_path / "requests.jsonl", rows)
    prompts, report = import_requests(src.read_text().splitlines())
    assert [p.messages for p in prompts] == [MSGS, rows[2]["messages"]]
    assert report.read == 10 and report.kept == 2
    assert report.dropped == {"duplicate": 1, "bad role": 1, "bad message": 1, "empty content": 1,
                              "longer than 8000 characters": 1, "system message not first": 1,
                              "no messages list": 1, "not JSON": 1}
    assert report.first_line["duplicate"] == 2
    assert report.settings == {Settings(0.7, 50, 0.5, 512): 1}  # the settings users sent, counted

    out = tmp_path / "private" / "bank.jsonl"
    result = runner.invoke(cli, ["probes", "import", str(src), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kept"] == 2
    assert [p.messages for p in load_bank(out)] == [p.messages for p in prompts]  # a bank the daemon reads
    as_yaml, mix = tmp_path / "bank.yaml", tmp_path / "mix.yaml"
    assert runner.invoke(cli, ["probes", "import", str(src), "--out", str(as_yaml),
                               "--mix-out", str(mix)]).exit_code == 0
    assert [p.id for p in load_bank(as_yaml)] == [p.id for p in prompts]
    assert load_probe_mix("imported", mix) == [(1.0, Settings(0.7, 50, 0.5, 512))]
    cfg = ValidatorConfig.model_validate({"settings_file": str(mix), "settings_mix": "imported"})
    assert cfg.probe_mix() == load_probe_mix("imported", mix)  # what the daemon draws from
    nothing = jsonl(tmp_path / "bad.jsonl", ["[", {"messages": []}])
    failed = runner.invoke(cli, ["probes", "import", str(nothing), "--out", str(tmp_path / "none.jsonl")])
    assert failed.exit_code == 1 and not (tmp_path / "none.jsonl").exists()


def test_run_warns_when_bank_or_secret_ship_in_the_repository(tmp_path):
    public = load_bank("configs/prompts/general.yaml")
    demo_secret = yaml.safe_load(shipped("demo.yaml").read_text())["validator"]["secret"]
    warnings = shipped_in_repository(public, demo_secret)
    assert len(warnings) == 2
    assert "80 of the 80 probe prompts ship in this repository" in warnings[0]
    assert "validator probes import" in warnings[0]  # names the fix
    assert "configs/demo.yaml" in warnings[1] and "VALIDATOR_SECRET" in warnings[1]
    private = [p for p in load_bank(jsonl(tmp_path / "b.jsonl", [{"messages": MSGS}]))]
    assert shipped_in_repository(private, secrets.token_urlsafe(32)) == []  # written nowhere


# ------------------------------------------------------------------------------ settings

def test_no_probe_leaves_with_a_setting_outside_the_documented_ranges():
    """Every mix the daemon may send is inside the ranges; the mix with top_k 0 is
    refused; and what goes over the wire, through the real client, is inside them too."""
    mixes = yaml.safe_load(SETTINGS_FILE.read_text())["mixes"]
    for name in ("default", "short"):
        assert all(not outside_documented(s) for _, s in load_probe_mix(name)), name
    assert outside_documented(Settings(1.0, 0, 0.95, 64)) == ["top_k=0 (documented 1-1000)"]
    with pytest.raises(ValueError, match="top_k=0"):
        load_probe_mix("calibration")
    assert set(mixes) >= {"default", "short", "calibration"}

    # the default mix looks like users: mostly the API's max_tokens default, 0.7 most often
    mix = load_probe_mix("default")
    share = lambda pred: sum(w for w, s in mix if pred(s)) / sum(w for w, _ in mix)  # noqa: E731
    assert share(lambda s: s.max_tokens == 512) > 0.5 and share(lambda s: s.max_tokens == 1024) > 0
    assert share(lambda s: s.max_tokens < 512) > 0 and share(lambda s: s.temperature == 0.7) > 0.5

    bank = load_bank("configs/prompts/general.yaml")
    probes = [p for r in range(300) for p in derive_probes("s3cret", r, "h", bank, mix, 4)]
    with Capture() as host:
        async def send():
            async with FlexstackClient(host.url, timeouts=Timeouts(retries=0)) as client:
                await asyncio.gather(*(client.complete(p.messages, p.wire_settings, stream=p.stream)
                                       for p in probes[:40]))
        asyncio.run(send())
        sent = [json.loads(r["body"])["configs"] for r in host.requests]
    assert len(sent) == 40
    for configs in [p.configs for p in probes] + sent:
        assert "seed" not in configs
        s = Settings.from_configs(configs)
        for key, (lo, hi) in DOCUMENTED.items():
            assert lo <= getattr(s, key) <= hi, (key, configs)
    assert {s["max_new_tokens"] for s in sent} >= {512}


def test_a_mix_entry_of_lists_is_every_combination_sharing_its_weight(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("mixes:\n  spread:\n"
                    "    - {weight: 4, temperature: 0.7, top_k: 50, top_p: 0.5, max_tokens: 512}\n"
                    "    - {weight: 6, temperature: [0.3, 1.0, 1.0], top_k: [5, 50], top_p: 0.9, max_tokens: 256}\n"
                    "  empty:\n    - {temperature: [], top_k: 5}\n")
    mix = load_probe_mix("spread", path)
    assert mix[0] == (4.0, Settings(0.7, 50, 0.5, 512))
    assert len(mix) == 1 + 6 and sum(w for w, _ in mix) == pytest.approx(10)
    hot = sum(w for w, s in mix if s.temperature == 1.0)
    assert hot == pytest.approx(4.0)  # listed twice: two thirds of the entry's 6
    assert {(s.temperature, s.top_k) for _, s in mix[1:]} == {(t, k) for t in (0.3, 1.0) for k in (5, 50)}
    with pytest.raises(ValueError, match="empty list"):
        load_mix("empty", path)
    # The shipped default spreads its tail: no handful of combinations a host could learn.
    assert len({s for _, s in load_probe_mix("default")}) >= 100


def test_the_daemon_refuses_a_mix_outside_the_ranges(tmp_path):
    cfg = ValidatorConfig.model_validate({"database": str(tmp_path / "v.db"), "secret": "x" * 32,
                                          "settings_mix": "calibration"})
    with pytest.raises(ValueError, match="settings a user can send"):
        Daemon(cfg)


def test_requests_look_like_the_network_clients():
    """Header names, order and values, body keys and their order, query: what the real
    `requests` sends for the network's client, except the Authorization value."""
    import requests

    configs = {"model": "gemma-7b", "temperature": 0.7, "top_k": 50, "top_p": 0.5, "max_new_tokens": 512}
    with Capture() as host:
        for stream in (False, True):
            url = f"{host.url}/ai/text_completion" + ("?stream=true" if stream else "")
            requests.post(url, json={"messages": MSGS, "configs": configs},
                          headers={"Authorization": "Bearer user-token"}, stream=stream).close()

        async def send():
            async with FlexstackClient(host.url, token="user-token", timeouts=Timeouts(retries=0)) as c:
                for stream in (False, True):
                    assert (await c.complete(MSGS, Settings(0.7, 50, 0.5, 512), stream=stream)).ok
            async with FlexstackClient(host.url, timeouts=Timeouts(retries=0)) as c:  # no token
                assert (await c.complete(MSGS, Settings(0.7, 50, 0.5, 512))).ok
        asyncio.run(send())
        users, probes, tokenless = host.requests[:2], host.requests[2:4], host.requests[4]
    for user, probe in zip(users, probes):
        assert (probe["method"], probe["target"]) == (user["method"], user["target"])
        assert probe["headers"] == user["headers"]  # names, case, order and values
        assert probe["body"] == user["body"]  # byte for byte
    assert probes[0]["target"] == "/v1/ai/text_completion"  # no ?stream=false
    assert not any(k.lower() == "authorization" for k, _ in tokenless["headers"])  # never a placeholder
    assert [k for k, _ in tokenless["headers"]] == [k for k, _ in users[0]["headers"] if k != "Authorization"]


# ------------------------------------------------------------------------------ timing

def test_departure_times_are_poisson_keyed_and_not_on_a_public_clock():
    offsets = [o for r in range(400) for o in arrival_offsets("s3cret", r, "h", 4, 900.0)]
    assert all(0 <= o < 900 for o in offsets)
    assert stats.kstest([o / 900 for o in offsets], "uniform").pvalue > 1e-3  # given their count, Poisson
    one = arrival_offsets("s3cret", 7, "h", 4, 900.0)
    assert one == sorted(one) == arrival_offsets("s3cret", 7, "h", 4, 900.0)  # reproducible
    assert len({round(b - a, 6) for a, b in zip(one, one[1:])}) == 3 and min(b - a for a, b in zip(one, one[1:])) > 0
    assert one != arrival_offsets("s3cret", 7, "h2", 4, 900.0) != arrival_offsets("other", 7, "h", 4, 900.0)
    phases = [schedule_phase(f"secret-{i}", 900.0) for i in range(400)]
    assert all(0 <= p < 900 for p in phases) and stats.kstest([p / 900 for p in phases], "uniform").pvalue > 1e-3
    assert schedule_phase("s3cret", 900.0) == schedule_phase("s3cret", 900.0)
    # late probes (a restart) leave one by one at the configured rate, never together
    late = catch_up([0.0, 1.0, 2.0, 500.0], 100.0, 225.0, random.Random(1))
    assert late[3] == 500.0 and 100.0 < late[0] < late[1] < late[2]
    assert catch_up([0.0, 1.0], 100.0, 0.0, random.Random(1)) == [100.0, 100.0]  # spread 0: at once


def test_a_round_sends_each_probe_once_at_its_own_time_without_a_placeholder_token(tmp_path):
    """The daemon's real round against a recording host: each probe arrives once, at
    the time derived for it (from the round's keyed start), not in a burst; the host
    round is finished; nothing carries `Authorization`."""
    spread = 4.0
    with Capture() as host:
        cfg = ValidatorConfig.model_validate({
            "database": str(tmp_path / "v.db"), "secret": "test-secret-for-timing", "settings_mix": "short",
            "rounds": {"interval_s": 3600, "spread_s": spread, "probes_per_host": 4, "concurrency": 8},
            "client": {"retries": 0},
            # One recording server, a path per host: two hosts may draw the same prompt
            # and settings, and then only the path tells whose request it was.
            "hosts": [{"name": n, "url": f"{host.url}/{n}", "model": "smollm2-135m"} for n in ("a", "b")]})
        daemon = Daemon(cfg, models={})
        round_no = daemon.round_number()

        async def go():
            started = time.time() + 3.0  # after the round's database work, however busy the machine
            await daemon.probe_round(round_no, started=started)
            return started
        started = asyncio.run(go())
        arrived = list(host.requests)
    store = Store(cfg.database_url)
    assert len(arrived) == 8
    sent = {}
    for name in ("a", "b"):
        expected = [started + o for o in arrival_offsets(cfg.secret, round_no, name, 4, spread)]
        probes = derive_probes(cfg.secret, round_no, name, daemon.bank, daemon.mix, 4)
        for p, at in zip(probes, expected):
            body = json.dumps({"messages": p.messages, "configs": daemon.wire.configs("smollm2-135m",
                                                                                      p.wire_settings)}).encode()
            hits = [r for r in arrived if r["body"] == body and r["target"].startswith(f"/v1/{name}/")]
            assert len(hits) == 1, p.id  # once
            assert at - 0.05 <= hits[0]["at"] <= at + 1.0, (p.id, hits[0]["at"] - at)  # at its time
            sent[p.id] = hits[0]["at"]
        assert store.pending_probes(round_no, name) == []
    times = sorted(sent.values())
    assert times[-1] - times[0] > 1.0  # spread over the window, not a burst
    assert not any(k.lower() == "authorization" for r in arrived for k, _ in r["headers"])


def test_a_retry_never_follows_within_seconds(tmp_path):
    """A transient failure is retried only after the backoff: the same prompt never
    reaches a host twice within backoff_s (the network's client never retries)."""
    from validator.service.config import ClientConfig

    t = ClientConfig(retries=1, backoff_s=1.5, total_s=30).timeouts()
    assert (t.backoff_base, t.retries) == (1.5, 1)

    class Flaky(Capture):
        async def _serve(self, reader, writer):
            if not self.requests:  # the first request: a 503 with Retry-After 0
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0])
                body = await reader.readexactly(length)
                self.requests.append({"at": time.time(), "body": body})
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            await super()._serve(reader, writer)

    with Flaky() as host:
        async def go():
            async with FlexstackClient(host.url, timeouts=t) as c:
                return await c.complete(MSGS, Settings(0.7, 50, 0.5, 512))
        rec = asyncio.run(go())
        times = [r["at"] for r in host.requests]
    assert rec.ok and rec.attempts == 2 and len(times) == 2
    assert times[1] - times[0] >= 1.5  # Retry-After 0 does not shorten the backoff


# ------------------------------------------------------------------------------ who sees probes

def test_readers_see_probes_only_after_the_delay_admins_at_once(tmp_path):
    from validator.models.registry import Registry
    from validator.web.app import create_app
    from validator.web.auth import create_token

    from .web.conftest import LiveServer

    url = Store.default_url(tmp_path / "w.db")
    upgrade(url)
    store = Store(url)
    store.add_host("h", "http://127.0.0.1:9/v1", "smollm2-135m")
    store.ensure_probes(1, "h", [{"id": f"probe-{i}", "index": i, "prompt_id": "q", "stream": False, "messages": MSGS,
                                  "configs": Settings().as_configs()} for i in range(3)])
    now = datetime.now(UTC)
    store.record_dispatch("probe-0", {"ok": False, "error": "connect_error", "total_s": 0.1}, "t",
                          finished_at=now - timedelta(days=2))
    store.record_dispatch("probe-1", {"ok": False, "error": "connect_error", "total_s": 0.1}, "t",
                          finished_at=now - timedelta(minutes=5))  # p2: not sent yet
    admin, _ = create_token(store, "admin", "a")
    reader, _ = create_token(store, "reader", "r")
    server = LiveServer(create_app(store, ServeConfig(), registry=Registry.load()))
    public = LiveServer(create_app(store, ServeConfig(public_reads=True), registry=Registry.load()))
    try:
        with server.client(admin) as a, server.client(reader) as r, public.client() as anyone:
            assert [x["probe_id"] for x in a.get("/api/hosts/h/history").json()["items"]] == ["probe-1", "probe-0"]
            for c in (r, anyone):
                page = c.get("/api/hosts/h/history").json()
                assert [x["probe_id"] for x in page["items"]] == ["probe-0"] and page["total"] == 1
                assert c.get("/api/probes/probe-0?rerun=false").status_code == 200
                for young in ("probe-1", "probe-2"):
                    hidden = c.get(f"/api/probes/{young}?rerun=false")
                    assert hidden.status_code == 404 and "24 h after" in hidden.json()["detail"]
                assert c.get("/probes/probe-1").status_code == 404
                assert "probe-1" not in c.get("/hosts/h").text and "probe-0" in c.get("/hosts/h").text
            assert a.get("/api/probes/probe-1?rerun=false").status_code == 200
            assert a.get("/probes/probe-1").status_code == 200 and "probe-1" in a.get("/hosts/h").text
    finally:
        server.stop()
        public.stop()
        store.close()
