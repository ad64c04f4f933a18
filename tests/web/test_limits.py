"""`validator serve`'s limits over a real socket (uvicorn on loopback): request bodies
capped before they are read or parsed (413), and the calls that spend model time
rate-limited per caller (429 with Retry-After), scored by the real SmolLM2 reference."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from validator.service.audit import run_audit
from validator.service.config import LlmEndpointConfig, ServeConfig
from validator.service.scorer import Scorer
from validator.store import Store, upgrade
from validator.web.app import create_app
from validator.web.auth import create_token

from .conftest import GREEDY, MODEL, LiveServer

PER_MINUTE = 2
# probe_delay_s 0: the reader tokens here read probes sent a moment ago (the delay has
# its own test in tests/test_probes.py).
LIMITED = ServeConfig(max_body_bytes=4096, max_login_bytes=512, model_calls_per_minute=PER_MINUTE,
                      probe_delay_s=0,
                      llm=LlmEndpointConfig(rerun=False, max_pairs=2, max_chars=200, max_tokens=24))
SHORT = {**GREEDY.as_configs(), "max_tokens": 8}
PAIR = {"prompts": ["Say hello."], "responses": ["Hello!"], "configs": {"temperature": 0, "max_tokens": 8}}


@pytest.fixture(scope="module")
def limited(tmp_path_factory, ref, registry):
    """One host with two answers: `fresh` is unscored (reading it recomputes with the
    scorer), `scored` has its per-token gaps stored (reading it without the re-run does not)."""
    url = Store.default_url(tmp_path_factory.mktemp("limits") / "v.db")
    upgrade(url)
    store = Store(url)
    store.add_host("h", "http://127.0.0.1:9/v1", MODEL)
    probes = [{"id": pid, "index": i, "prompt_id": "p", "stream": False, "configs": SHORT,
               "messages": [{"role": "user", "content": "Say hello."}]} for i, pid in enumerate(["fresh", "scored"])]
    store.ensure_probes(1, "h", probes)
    for p in probes:
        store.record_dispatch(p["id"], {"ok": True, "text": "Hello!", "ttfb_s": 0.1, "total_s": 0.2}, "test")
    line = json.dumps({"id": "scored", "host": "h", "model": MODEL, "messages": probes[1]["messages"],
                       "configs": SHORT, "response": "Hello!"})
    (out,), _ = run_audit([line], Scorer(registry, models={MODEL: ref}), rerun=False, on_error=print)
    assert "per_token" in out["metrics"]
    store.record_score("scored", out["verdict"], out["p_value"], out["reasons"], out["metrics"], "test",
                       provenance=out["provenance"])
    tokens = {name: create_token(store, "reader", name)[0] for name in ("a", "b", "c", "d", "e")}
    server = LiveServer(create_app(store, LIMITED, registry=registry, models={MODEL: ref}))
    try:
        yield server, tokens
    finally:
        server.stop()
        store.close()


def _retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    seconds = int(r.headers["retry-after"])
    assert 1 <= seconds <= 60
    return seconds


# ------------------------------------------------------------------ bodies


def test_a_declared_body_over_the_cap_is_refused_without_reading_it(limited):
    """A Content-Length of a terabyte and no body at all: 413 at once (the server would
    otherwise wait for the body), before authentication looks at the missing token."""
    server, _ = limited
    port = int(server.url.rsplit(":", 1)[1])
    for path in ("/api/hosts", "/validator/v1/llm", "/login"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {10**12}\r\n\r\n".encode())
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 413 "), (path, head[:200])


def test_bodies_over_the_cap_get_413_counted_or_declared(limited):
    server, tokens = limited
    big = {"prompts": ["x" * 5000], "responses": ["y"]}
    with server.client(tokens["a"]) as c:
        assert c.post("/validator/v1/llm", json=big).status_code == 413

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(3):
                yield b" " * 2000

        r = c.post("/validator/v1/llm", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "content-length" not in r.request.headers
        under = c.post("/validator/v1/llm", json={**PAIR, "prompts": ["x" * 3000]})
        assert under.status_code == 422  # under the cap: parsed, and refused on its own merits


def test_the_login_form_has_its_own_smaller_cap(limited):
    server, _ = limited
    with server.client() as c:
        wrong = c.post("/login", data={"token": "vt_wrong", "next": "/hosts"})
        assert wrong.status_code == 401 and "Unknown or revoked token" in wrong.text
        assert c.post("/login", data={"token": "vt_" + "x" * 600, "next": "/hosts"}).status_code == 413


# ------------------------------------------------------------------ model time


def test_the_llm_endpoint_is_rate_limited_per_token(limited):
    server, tokens = limited
    with server.client(tokens["b"]) as b, server.client(tokens["c"]) as c:
        for _ in range(3):  # refused before the model: not counted
            assert b.post("/validator/v1/llm", json={**PAIR, "model": "no-such-model"}).status_code == 422
        for _ in range(PER_MINUTE):
            r = b.post("/validator/v1/llm", json=PAIR)
            assert r.status_code == 200, r.text
        _retry_after(b.post("/validator/v1/llm", json=PAIR))
        assert c.post("/validator/v1/llm", json=PAIR).status_code == 200  # another caller, its own count


def test_a_probe_read_is_limited_only_when_it_recomputes(limited):
    server, tokens = limited
    with server.client(tokens["d"]) as c:
        for _ in range(PER_MINUTE + 3):  # stored gaps, no re-run asked: no model time
            r = c.get("/api/probes/scored", params={"rerun": "false"})
            assert r.status_code == 200 and r.json()["sources"]["tokens"] == "stored"
        for _ in range(PER_MINUTE):
            r = c.get("/api/probes/fresh")
            assert r.status_code == 200 and r.json()["sources"]["tokens"] == "computed"
        _retry_after(c.get("/api/probes/fresh"))


def test_the_probe_page_says_429_in_html(limited):
    server, tokens = limited
    with server.client(tokens["e"]) as c:
        for _ in range(PER_MINUTE):
            assert c.get("/probes/fresh").status_code == 200
        page = c.get("/probes/fresh")
        _retry_after(page)
        assert page.headers["content-type"].startswith("text/html") and "model_calls_per_minute" in page.text


def test_without_a_token_the_client_address_is_the_caller(tmp_path, ref, registry):
    url = Store.default_url(tmp_path / "v.db")
    upgrade(url)
    store = Store(url)
    config = LIMITED.model_copy(update={"llm": LIMITED.llm.model_copy(update={"public": True})})
    server = LiveServer(create_app(store, config, registry=registry, models={MODEL: ref}))
    try:
        def client(address: str) -> httpx.Client:
            return httpx.Client(base_url=server.url, timeout=120, trust_env=False,
                                transport=httpx.HTTPTransport(local_address=address))

        with client("127.0.0.1") as one, client("127.0.0.2") as two:
            for _ in range(PER_MINUTE):
                assert one.post("/validator/v1/llm", json=PAIR).status_code == 200
            _retry_after(one.post("/validator/v1/llm", json=PAIR))
            assert two.post("/validator/v1/llm", json=PAIR).status_code == 200
    finally:
        server.stop()
        store.close()
