"""Host credentials: they come only from VALIDATOR_CRED_<KEY>_* variables or the
operator's secrets file, and when the network refuses the validator's own credentials the
failure is the validator's (error class auth_failed, shown by `validator status`), never
a host's lost availability. The daemon runs in-process against simulated hosts on
loopback (fixed text, no model) and a real SQLite file; `validator status` runs as the
operator runs it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from validator.daemon import Daemon
from validator.service.operations import outcomes
from validator.network.simulator import SimulatedNetwork, NetworkConfig, Static, strategy
from validator.reputation import ReputationConfig, components
from validator.service.config import ValidatorConfig
from validator.probing.probes import account_index, derive_probes
from validator.service.credentials import (CredentialsError, HostCredentials, accounts_for, credentials_for,
                                           env_name, read_secrets_file)
from validator.store import Store

PROBE_SECRET = "probe-secret-that-must-stay-home"


def test_env_name_is_prefixed_and_normalised():
    assert env_name("network", "token") == "VALIDATOR_CRED_NETWORK_TOKEN"
    assert env_name("host-7.eu", "refresh_token") == "VALIDATOR_CRED_HOST_7_EU_REFRESH_TOKEN"
    # A key that looks like another variable still only reads under the prefix.
    assert env_name("VALIDATOR_SECRET", "token") == "VALIDATOR_CRED_VALIDATOR_SECRET_TOKEN"


def test_environment_over_secrets_file_field_by_field(tmp_path):
    path = tmp_path / "credentials.yaml"
    path.write_text("net: {username: v7, password: from-file, refresh_token: r0}\nother: {token: t}\n")
    path.chmod(0o600)
    secrets = read_secrets_file(path)
    env = {"VALIDATOR_CRED_NET_PASSWORD": "from-env", "VALIDATOR_SECRET": PROBE_SECRET}
    assert credentials_for("net", secrets, env) == HostCredentials(None, "r0", "v7", "from-env")
    assert credentials_for("other", secrets, env) == HostCredentials(token="t")
    assert not credentials_for("unknown", secrets, env)  # none: no Authorization header at all
    assert not credentials_for("VALIDATOR_SECRET", secrets, env)  # never the variable itself
    with pytest.raises(CredentialsError, match="both username and password"):
        credentials_for("x", {}, {"VALIDATOR_CRED_X_USERNAME": "u"})


def test_secrets_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "credentials.yaml"
    path.write_text("net: {token: t}\n")
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        read_secrets_file(path)
    path.chmod(0o600)
    path.write_text("net: {token: t, api_key: k}\n")
    with pytest.raises(CredentialsError, match="must map to some of"):
        read_secrets_file(path)


def test_a_pool_of_accounts_comes_from_the_file_alone(tmp_path):
    path = tmp_path / "credentials.yaml"
    path.write_text("net:\n  - {token: a}\n  - {username: u, password: p}\nsolo: {token: s}\n")
    path.chmod(0o600)
    secrets = read_secrets_file(path)
    assert accounts_for("net", secrets, {}) == [HostCredentials(token="a"), HostCredentials(None, None, "u", "p")]
    assert accounts_for("solo", secrets, {"VALIDATOR_CRED_SOLO_TOKEN": "env"}) == [HostCredentials(token="env")]
    assert accounts_for("unknown", secrets, {}) == [HostCredentials()]
    with pytest.raises(CredentialsError, match="pool of 2 accounts in the secrets file.*VALIDATOR_CRED_NET_TOKEN"):
        accounts_for("net", secrets, {"VALIDATOR_CRED_NET_TOKEN": "x"})
    with pytest.raises(CredentialsError, match="pool of 2"):
        credentials_for("net", secrets, {})  # a pool is never read as one account
    for bad in ("net: []\n", "net: [{token: a}, {api_key: k}]\n", "net: [{token: 1}]\n"):
        path.write_text(bad)
        with pytest.raises(CredentialsError, match="net"):
            read_secrets_file(path)
    with pytest.raises(CredentialsError, match="'net' account 2: give both username and password"):
        accounts_for("net", {"net": [{"token": "a"}, {"username": "u"}]}, {})


def test_account_choice_is_keyed_fixed_per_probe_and_spread():
    ids = [f"{i:016x}" for i in range(2000)]
    chosen = [account_index(PROBE_SECRET, i, 5) for i in ids]
    assert chosen == [account_index(PROBE_SECRET, i, 5) for i in ids]  # a resent probe keeps its account
    assert all(300 <= chosen.count(a) <= 500 for a in range(5)), [chosen.count(a) for a in range(5)]
    assert chosen != [account_index("another-secret-entirely", i, 5) for i in ids]
    assert {account_index(PROBE_SECRET, i, 1) for i in ids} == {0}


class Capture(BaseHTTPRequestHandler):
    """Records every request (headers and body) and answers 401, as a host that wants a token."""
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        Capture.seen.append(str(self.headers) + body.decode("utf-8", "replace"))
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"detail": "Could not validate credentials"}')

    def log_message(self, *args):
        pass


def config(tmp_path, hosts: list[dict], **extra) -> ValidatorConfig:
    return ValidatorConfig.model_validate({
        "database": str(tmp_path / "v.db"), "secret": PROBE_SECRET, "instance": "v1",
        "rounds": {"interval_s": 1e9, "jitter_s": 0, "spread_s": 0, "probes_per_host": 3,
                   "concurrency": 1},
        "client": {"connect_s": 2, "first_byte_s": 10, "total_s": 20, "retries": 0},
        "hosts": hosts, **extra})


def test_a_credentials_key_cannot_send_another_variable(tmp_path, monkeypatch):
    """The attack the API's token_env allowed: a host whose credentials name
    VALIDATOR_SECRET, at a URL the attacker reads. Nothing of the secret leaves."""
    monkeypatch.setenv("VALIDATOR_SECRET", PROBE_SECRET)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Capture.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        daemon = Daemon(config(tmp_path, [{"name": "evil", "url": url, "model": "smollm2-135m",
                                           "credentials": "VALIDATOR_SECRET"}]))
        asyncio.run(daemon.probe_round(1))
    finally:
        server.shutdown()
    assert len(Capture.seen) == 3
    assert not any(PROBE_SECRET in r for r in Capture.seen)
    assert not any(r.lower().startswith("authorization") or "\nauthorization:" in r.lower() for r in Capture.seen)
    rows = Store(daemon.config.database_url).host_scores("evil")
    assert [r["dispatch"]["error"] for r in rows] == ["auth_failed"] * 3


def test_each_probe_goes_out_under_its_account_of_the_pool(tmp_path):
    """A pool of four accounts in the secrets file: every probe carries the token of the
    account its id selects, and the host sees several accounts, not one."""
    secrets = tmp_path / "credentials.yaml"
    tokens = [f"eyJaccount-{i}" for i in range(4)]
    secrets.write_text("network:\n" + "".join(f"  - {{token: {t}}}\n" for t in tokens))
    secrets.chmod(0o600)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Capture.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = config(tmp_path, [{"name": "h", "url": url, "model": "smollm2-135m", "credentials": "network"}],
                     credentials_file=str(secrets))
        cfg.rounds.probes_per_host = 12
        daemon = Daemon(cfg)
        asyncio.run(daemon.probe_round(1))
    finally:
        server.shutdown()
    sent = [next(line.split("Bearer ", 1)[1].strip() for line in r.splitlines()
                 if line.lower().startswith("authorization:")) for r in Capture.seen]
    probes = derive_probes(PROBE_SECRET, 1, "h", daemon.bank_for("smollm2-135m"), daemon.mix, 12)
    expected = [tokens[account_index(PROBE_SECRET, p.id, 4)] for p in probes]
    assert sorted(sent) == sorted(expected) and len(set(sent)) >= 2, sent


@strategy
class RevokesCredentials(Static):
    """Fixed text; on its `after`-th call the network revokes every token and changes the
    validator's password (the call itself is still answered)."""
    name = "test-revokes-credentials"

    class Options(Static.Options):
        after: int = 5

    def __init__(self, network, host):
        super().__init__(network, host)
        self.calls = 0

    async def respond(self, call, request):
        self.calls += 1
        if self.calls == self.options.after:
            self.network.revoke(password="changed")
        return await super().respond(call, request)


def test_credentials_revoked_mid_round_charge_no_host(tmp_path, monkeypatch):
    net_cfg = NetworkConfig.model_validate({
        "credentials": {"username": "validator-7", "password": "right"},
        "hosts": [{"name": "h1", "strategy": "static"}, {"name": "h2", "strategy": "static"},
                  {"name": "h3", "strategy": "test-revokes-credentials", "after": 5}]})
    monkeypatch.setenv("VALIDATOR_CRED_NETWORK_USERNAME", "validator-7")
    monkeypatch.setenv("VALIDATOR_CRED_NETWORK_PASSWORD", "right")
    reputation = ReputationConfig()
    with SimulatedNetwork(net_cfg) as net:
        cfg = config(tmp_path, [{"name": n, "url": u, "model": "smollm2-135m", "credentials": "network"}
                                for n, u in net.urls.items()])
        daemon = Daemon(cfg)
        store = daemon.store

        async def rounds() -> dict:  # one event loop, as `validator run` has
            await daemon.probe_round(1)  # logs in once, every probe answered
            before = {h["name"]: h["score"] for h in store.list_hosts()}
            first = store.export_rows()
            assert len(first) == 9 and all(r["ok"] for r in first)
            await daemon.probe_round(2)  # h3's 2nd call of this round revokes
            return before

        before = asyncio.run(rounds())
    rows = [r for r in store.export_rows() if r["round"] == 2]
    refused = [r for r in rows if r["error"] == "auth_failed"]
    assert len(rows) == 9 and 0 < len(refused) < 9, [r["error"] for r in rows]  # mid-round
    assert all(r["ok"] or r["error"] == "auth_failed" for r in rows)
    assert all("re-auth failed" in r["detail"] or "auth:" in r["detail"] for r in refused)
    for host in ("h1", "h2", "h3"):
        parts = components(outcomes(store, host), [], reputation)
        assert parts["availability"] == 1.0, (host, parts)
        assert store.get_host(host)["score"] == pytest.approx(before[host], abs=1e-9)

    status = subprocess.run([sys.executable, "-m", "validator.cli", "status", "--db", str(tmp_path / "v.db"),
                             "--json"], capture_output=True, text=True, timeout=120)
    errors = json.loads(status.stdout)["validator_errors"]
    assert errors["auth_failed"]["count"] == len(refused)
    assert errors["auth_failed"]["last"][0]["probe_id"] in {r["probe_id"] for r in refused}
    shown = subprocess.run([sys.executable, "-m", "validator.cli", "status", "--db", str(tmp_path / "v.db")],
                           capture_output=True, text=True, timeout=120).stdout
    assert f"validator error auth_failed: {len(refused)} calls (not charged to the hosts)" in shown
    assert "HTTP 401" in shown or "401" in shown
