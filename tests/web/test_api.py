"""The REST API over a real socket: tokens and roles (SQLite and PostgreSQL), reads with
pagination and filters, writes, the probe's evidence, the CLI's token commands, and a
schemathesis run against the OpenAPI spec (no 5xx, responses match the spec)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from contextlib import contextmanager, nullcontext

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance
from typer.testing import CliRunner

from validator.cli import app as cli
from validator.store import Store, upgrade
from validator.web.app import create_app
from validator.web.auth import create_token, token_hash

from ..conftest import PG_URL, fresh_postgres_database
from .conftest import REPUTATION, SERVE, LiveServer, populate_small

WRITES = [("post", "/api/hosts", {"name": "x", "url": "http://127.0.0.1:9/v1", "model": "smollm2-135m"}),
          ("post", "/api/hosts/{host}/disable", {"note": "n"}),
          ("delete", "/api/hosts/{host}", None),
          ("post", "/api/probes/{probe}/feedback", {"rating": 3})]


def _write(client, method, path, body, host, probe):
    path = path.format(host=host, probe=probe)
    return client.request(method, path, json=body) if body is not None else client.request(method, path)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tokens_and_roles(backend, request):
    s = request.getfixturevalue("served" if backend == "sqlite" else "pg_served")
    host = next(iter(s.net.probes))
    probe = s.net.probes[host][0]
    with s.server.client() as anon, s.server.client(s.reader) as reader, \
            s.server.client("vt_not-a-token") as forged:
        for path in ("/api/hosts", f"/api/hosts/{host}", f"/api/hosts/{host}/history", "/metrics",
                     f"/api/probes/{probe}?rerun=false", "/api/status"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert forged.get(path).status_code == 401
            assert 'error="invalid_token"' in forged.get(path).headers["www-authenticate"]
            assert reader.get(path).status_code == 200, path
        for method, path, body in WRITES:
            assert _write(anon, method, path, body, host, probe).status_code == 401
            assert _write(reader, method, path, body, host, probe).status_code == 403
        # nothing was written by the refused calls
        assert reader.get("/api/hosts", params={"q": "x"}).json()["total"] == 0
        assert reader.get(f"/api/hosts/{host}").json()["state"] != "disabled"
    # the database holds hashes only, never the secrets
    tokens = s.store.api_tokens()
    assert {t["role"] for t in tokens} == {"admin", "reader"}
    assert not any(secret in str(t) for t in tokens for secret in (s.admin, s.reader))
    assert {token_hash(s.admin), token_hash(s.reader)} <= {t["token_hash"] for t in tokens}


def test_admin_writes_on_postgresql(pg_served):
    s = pg_served
    with s.server.client(s.admin) as admin:
        r = admin.post("/api/hosts", json={"name": "pg-new", "url": "http://127.0.0.1:9/v1", "model": "smollm2-135m"})
        assert r.status_code == 201 and r.json()["state"] == "new"
        assert admin.post("/api/hosts", json={"name": "pg-new", "url": "http://x/v1",
                                              "model": "smollm2-135m"}).status_code == 409
        assert admin.post("/api/hosts", json={"name": "pg-bad", "url": "http://x/v1",
                                              "model": "no-such-model"}).status_code == 422
        t = admin.post("/api/hosts/pg-one/disable", json={"note": "maintenance"}).json()
        assert (t["state_from"], t["state_to"]) == ("new", "disabled") and "pg-admin" in t["reason"]
        assert admin.post("/api/hosts/pg-one/release").status_code == 409  # not flagged
        assert admin.post("/api/hosts/pg-one/enable").json()["state_to"] == "new"
        events = admin.get("/api/hosts/pg-one").json()["events"]
        assert [e["state_to"] for e in events][:2] == ["new", "disabled"]
        assert "maintenance" in events[1]["reason"]
        fb = admin.post(f"/api/probes/{s.net.probes['pg-two'][0]}/feedback", json={"rating": 5, "note": "ok"})
        assert fb.status_code == 201 and fb.json()["host"] == "pg-two"
        assert admin.post("/api/probes/nope/feedback", json={"rating": 5}).status_code == 404
        assert admin.post(f"/api/probes/{s.net.probes['pg-two'][0]}/feedback",
                          json={"rating": 9}).status_code == 422
        assert admin.delete("/api/hosts/pg-new").json()["removed_at"] is not None
        assert "pg-new" not in {h["host"] for h in admin.get("/api/hosts").json()["items"]}
        # a revoked token is refused at once
        token_id = next(t["id"] for t in s.store.api_tokens() if t["token_hash"] == token_hash(s.reader))
        assert s.store.revoke_api_token(token_id)
    with s.server.client(s.reader) as reader:
        assert reader.get("/api/hosts").status_code == 401


def test_hosts_pagination_filters_and_sorting(served):
    with served.server.client(served.reader) as c:
        everything = c.get("/api/hosts", params={"limit": 500}).json()
        assert everything["total"] == 5 and len(everything["items"]) == 5
        by = {h["host"]: h for h in everything["items"]}
        assert by["honest-a"]["state"] == "trusted" and by["cheat-b"]["state"] == "flagged"
        assert by["down-d"]["state"] == "new" and by["retired-e"]["state"] == "disabled"
        assert by["flaky-c"]["errors"] == 2 and by["flaky-c"]["probes"] == 4
        assert by["honest-a"]["score"] > by["flaky-c"]["score"] > 0 == by["cheat-b"]["score"]

        first = c.get("/api/hosts", params={"limit": 2, "offset": 0, "sort": "host"}).json()
        second = c.get("/api/hosts", params={"limit": 2, "offset": 2, "sort": "host"}).json()
        assert first["total"] == 5 and [h["host"] for h in first["items"] + second["items"]] == \
            ["cheat-b", "down-d", "flaky-c", "honest-a"]
        ranked = c.get("/api/hosts", params={"sort": "score", "order": "desc"}).json()["items"]
        scores = [h["score"] for h in ranked if h["score"] is not None]
        assert ranked[0]["host"] == "honest-a" and scores == sorted(scores, reverse=True)
        assert [h["host"] for h in c.get("/api/hosts", params={"state": "flagged"}).json()["items"]] == ["cheat-b"]
        assert c.get("/api/hosts", params={"q": "FLAKY"}).json()["total"] == 1
        assert c.get("/api/hosts", params={"limit": 0}).status_code == 422
        assert c.get("/api/hosts", params={"state": "sleepy"}).status_code == 422
        assert c.get("/api/hosts", params={"sort": "password"}).status_code == 422


def test_host_detail_history_and_series(served):
    with served.server.client(served.reader) as c:
        h = c.get("/api/hosts/cheat-b").json()
        assert h["events"][0]["state_to"] == "flagged" and "1/alpha" in h["events"][0]["reason"]
        assert h["evidence"]["log_e_max"] >= h["evidence"]["log_threshold"]
        honest = c.get("/api/hosts/honest-a").json()
        assert honest["feedback"][0]["rating"] == 4.0 and "feedback" in honest["components"]
        assert 0 < honest["components"]["availability"] <= 1
        assert c.get("/api/hosts/nobody").status_code == 404

        page = c.get("/api/hosts/flaky-c/history", params={"limit": 3}).json()
        assert page["total"] == 4 and len(page["items"]) == 3
        assert [a["probe_id"] for a in page["items"]] == served.net.probes["flaky-c"][::-1][:3]  # newest first
        failed = c.get("/api/hosts/flaky-c/history", params={"failed": "true"}).json()["items"]
        assert {a["error"] for a in failed} == {"first_byte_timeout", "server_error"}
        assert all(a["verdict"] is None for a in failed)
        fails = c.get("/api/hosts/cheat-b/history", params={"verdict": "fail"}).json()
        assert fails["total"] >= 3 and all(a["p_value"] < 1e-4 and a["reasons"] for a in fails["items"])
        queued = c.get("/api/hosts/honest-a/history", params={"verdict": "unscored"}).json()["items"]
        assert [a["probe_id"] for a in queued] == [served.net.unscored]
        assert c.get("/api/hosts/nobody/history").status_code == 404

        series = c.get("/api/hosts/honest-a/series").json()
        assert len(series) == 5 and series[-1]["state"] == "trusted"
        assert series[-1]["score"] == pytest.approx(honest["score"])  # the last point is the stored score
        assert [p["at"] for p in series] == sorted(p["at"] for p in series)
        assert c.get("/api/hosts/cheat-b/series").json()[-1]["score"] == 0.0


def test_probe_detail_has_tokens_gaps_and_the_reruns(served):
    net = served.net
    scored = net.probes["cheat-b"][0]
    with served.server.client(served.reader) as c:
        p = c.get(f"/api/probes/{scored}").json()
        assert p["host"] == "cheat-b" and p["messages"][-1]["content"] == net.prompts[scored]
        assert p["answer"]["text"] == net.texts[scored] and p["answer"]["verdict"] == "fail"
        assert "".join(t["text"] for t in p["tokens"]) .strip() == net.texts[scored].strip()
        assert p["sources"] == {"tokens": "stored", "rerun": "computed"}
        assert max(t["gap"] for t in p["tokens"]) > p["metrics"]["gap"]["tolerance"]  # a replayed answer
        assert p["rerun"] and p["similarity"]["exact"] is False
        # the reference's greedy re-run is what the honest host answered (it is the reference)
        honest = c.get(f"/api/probes/{net.probes['honest-a'][0]}").json()
        assert honest["rerun"] == net.texts[net.probes["honest-a"][0]]
        assert honest["feedback"][0]["note"] == "clear and correct"
        # an answer not scored yet: gaps and a verdict computed now (and not stored)
        q = c.get(f"/api/probes/{net.unscored}", params={"rerun": "false"}).json()
        assert q["sources"]["tokens"] == "computed" and q["rerun"] is None
        assert q["computed_score"]["verdict"] == "pass" and q["answer"]["verdict"] is None
        assert c.get(f"/api/hosts/honest-a/history", params={"verdict": "unscored"}).json()["total"] == 1
        failed = c.get(f"/api/probes/{net.probes['down-d'][0]}").json()
        assert failed["tokens"] is None and failed["answer"]["error"] == "connect_error"
        assert c.get("/api/probes/nope").status_code == 404


def test_public_reads_config(served):
    server = LiveServer(create_app(served.store, SERVE.model_copy(update={"public_reads": True}),
                                   reputation=REPUTATION))
    try:
        with server.client() as anon, server.client("vt_forged") as forged:
            assert anon.get("/api/hosts").status_code == 200
            assert anon.get("/metrics").status_code == 200
            assert forged.get("/api/hosts").status_code == 401  # a token sent must be valid
            assert anon.post("/api/hosts/down-d/disable").status_code == 401  # writes still need admin
            assert anon.post("/validator/v1/llm", json={"prompts": ["a"], "responses": ["b"]}).status_code == 401
    finally:
        server.stop()


def test_token_commands(tmp_path):
    runner = CliRunner()
    db = str(tmp_path / "tokens.db")
    made = runner.invoke(cli, ["tokens", "create", "--role", "reader", "--name", "ci", "--db", db])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith("vt_") and len(secret) > 40
    store = Store(Store.default_url(db))
    assert store.api_token(token_hash(secret))["role"] == "reader"
    assert runner.invoke(cli, ["tokens", "create", "--role", "root", "--db", db]).exit_code != 0
    listed = runner.invoke(cli, ["tokens", "list", "--db", db, "--json"])
    assert secret not in listed.stdout and '"ci"' in listed.stdout
    assert runner.invoke(cli, ["tokens", "revoke", "1", "--db", db]).exit_code == 0
    assert store.api_token(token_hash(secret)) is None
    assert runner.invoke(cli, ["tokens", "revoke", "1", "--db", db]).exit_code != 0
    assert runner.invoke(cli, ["serve", "--help"]).exit_code == 0
    store.close()


@contextmanager
def fuzz_target(backend: str, served, ref, registry, tmp_path):
    """A server the fuzzer may write to: a copy of the SQLite database, or a fresh
    PostgreSQL one (the deployment backend: NUL characters and 64-bit limits bite there)."""
    if backend == "sqlite":
        copy = tmp_path / "fuzz.db"
        with sqlite3.connect(served.store.url[len("sqlite:///"):]) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        url, real = Store.default_url(copy), {"host": "honest-a", "probe_id": served.net.probes["honest-a"][1]}
        databases = nullcontext()
    else:
        databases = fresh_postgres_database()
    with databases as name:
        if backend == "postgresql":
            url = PG_URL.format(db=name)
            upgrade(url)
        store = Store(url)
        if backend == "postgresql":
            net = populate_small(store)
            real = {"host": "pg-two", "probe_id": net.probes["pg-two"][1]}
        admin, _ = create_token(store, "admin", "fuzzer")
        server = LiveServer(create_app(store, SERVE, registry=registry, reputation=REPUTATION,
                                       models={"smollm2-135m": ref}))
        try:
            yield server, admin, real
        finally:
            server.stop()
            store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_schemathesis_finds_no_server_errors(backend, served, registry, ref, tmp_path):
    """Every operation of the OpenAPI spec, fuzzed with an admin token: no 5xx, and every
    response matches the spec (status codes and bodies). Operations with path parameters
    are also fuzzed with a real host and probe, so they reach existing rows, not only 404s."""
    statuses: Counter = Counter()
    examples = {False: 20, True: 6} if backend == "sqlite" else {False: 10, True: 4}  # per operation
    with fuzz_target(backend, served, ref, registry, tmp_path) as (server, admin, real):
        headers = {"Authorization": f"Bearer {admin}"}
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) >= 10
        for op in operations:
            heavy = op.path == "/validator/v1/llm" or op.path.startswith("/api/probes/{probe_id}")
            fixed = {k: v for k, v in real.items() if "{" + k + "}" in op.path}
            for strategy in [op.as_strategy()] + ([op.as_strategy(path_parameters=fixed)] if fixed else []):

                @settings(max_examples=examples[heavy], deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck),
                          phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
                @given(case=strategy)
                def run(case):
                    response = case.call_and_validate(base_url=server.url, headers=headers,
                                                      checks=[not_a_server_error, status_code_conformance,
                                                              response_schema_conformance])
                    statuses[response.status_code // 100 * 100] += 1

                run()
    assert statuses[500] == 0 and statuses[200] >= 20 and statuses[400] >= 20, statuses
