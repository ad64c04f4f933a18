"""The daemon as operators run it: `validator run` in subprocesses against simulated
hosts (`validator simulate`, also a subprocess), on a SQLite file and on the local
PostgreSQL. The hosts answer with fixed text (no model), so these tests spend their time
on the daemon's bookkeeping and on scoring with the real SmolLM2 reference."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from validator.store import Store

from .conftest import PG_URL, fresh_postgres_database
from .test_simulator import start_simulator, stop_simulator

PROBES = 5
TIMEOUT = 240


def write_config(tmp: Path, database: str, urls: dict[str, str], **rounds) -> Path:
    cfg = {"database": database, "secret": "test-secret", "prompts": "configs/prompts/general.yaml",
           "settings_mix": "short",
           "rounds": {"interval_s": 1e9,  # one round number for decades: restarts resume it
                      "jitter_s": 0, "spread_s": 0, "probes_per_host": PROBES, "concurrency": 4,
                      "claim_batch": 2, "lease_s": 600, **rounds},
           "scoring": {"interval_s": 1, "batch": 16, "lease_s": 600},
           "client": {"connect_s": 2, "first_byte_s": 10, "total_s": 20, "retries": 0},
           "hosts": [{"name": n, "url": u, "model": "smollm2-135m"} for n, u in urls.items()]}
    path = tmp / f"validator-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_daemon(config: Path, instance: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "validator.cli", "run", "--config", str(config),
                             "--instance", instance, "--rounds", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def counts(store: Store) -> dict:
    with store.engine.connect() as c:
        q = lambda sql: c.execute(text(sql)).scalar()  # noqa: E731
        return {"probes": q("select count(*) from probes"),
                "dispatches": q("select count(*) from dispatches"),
                "distinct_dispatched": q("select count(distinct probe_id) from dispatches"),
                "scores": q("select count(*) from scores"),
                "distinct_scored": q("select count(distinct probe_id) from scores"),
                "host_rounds": q("select count(*) from host_rounds"),
                "done": q("select count(*) from host_rounds where done_at is not null")}


@pytest.fixture(scope="module")
def slow_hosts(tmp_path_factory):
    """Six hosts that answer fixed text after 0.4 s: a round takes several seconds."""
    hosts = [{"name": f"h{i}", "strategy": "slow-first-byte", "delay_s": 0.4} for i in range(6)]
    proc, rows = start_simulator({"hosts": hosts}, tmp_path_factory.mktemp("hosts"))
    yield {name: url for name, (url, _) in rows.items()}
    stop_simulator(proc)


def test_sigkill_mid_round_then_restart_loses_and_doubles_nothing(slow_hosts, tmp_path):
    db = tmp_path / "v.db"
    config = write_config(tmp_path, str(db), slow_hosts)
    store_url = f"sqlite:///{db}"
    first = run_daemon(config, "v1")
    deadline = time.monotonic() + TIMEOUT
    before = None
    while time.monotonic() < deadline:  # kill once some, not all, answers are committed
        time.sleep(0.2)
        if db.exists():
            try:
                c = counts(Store(store_url))
            except Exception:  # tables not created yet
                continue
            if 4 <= c["dispatches"] < 6 * PROBES - 6:
                first.send_signal(signal.SIGKILL)
                first.wait()
                before = c
                break
    assert before is not None, f"never caught the daemon mid-round: {first.communicate()[0][-2000:]}"
    store = Store(store_url)
    with store.engine.connect() as c:
        kept = dict(c.execute(text("select probe_id, text from dispatches")).all())
    assert len(kept) >= before["dispatches"]

    second = run_daemon(config, "v1")
    out, _ = second.communicate(timeout=TIMEOUT)
    assert second.returncode == 0, out[-3000:]
    after = counts(store)
    assert after["probes"] == 6 * PROBES
    assert after["dispatches"] == after["distinct_dispatched"] == 6 * PROBES  # none lost, none twice
    assert after["scores"] == after["distinct_scored"] == 6 * PROBES  # every answer scored once
    assert after["host_rounds"] == after["done"] == 6
    with store.engine.connect() as c:
        again = dict(c.execute(text("select probe_id, text from dispatches")).all())
    assert all(again[k] == v for k, v in kept.items())  # what was committed stayed as it was
    for h in store.list_hosts():  # static text is not what SmolLM2 says: all flagged
        assert h["state"] == "flagged", h


@pytest.fixture
def pg_url():
    with fresh_postgres_database() as name:
        yield PG_URL.format(db=name)


def test_two_daemons_on_postgres_share_one_round(slow_hosts, tmp_path, pg_url):
    config = write_config(tmp_path, pg_url, slow_hosts, claim_batch=1)
    daemons = [run_daemon(config, "alpha"), run_daemon(config, "beta")]
    outs = [d.communicate(timeout=TIMEOUT)[0] for d in daemons]
    assert [d.returncode for d in daemons] == [0, 0], [o[-2000:] for o in outs]
    store = Store(pg_url)
    c = counts(store)
    assert c["host_rounds"] == c["done"] == 6  # each host probed in one round, by one validator
    assert c["probes"] == c["dispatches"] == c["distinct_dispatched"] == 6 * PROBES
    assert c["scores"] == c["distinct_scored"] == 6 * PROBES
    with store.engine.connect() as conn:
        by_validator = dict(conn.execute(text(
            "select validator, count(*) from dispatches group by validator")).all())
        owners = dict(conn.execute(text("select owner, count(*) from host_rounds group by owner")).all())
    assert set(by_validator) == {"alpha", "beta"}, by_validator  # the work was shared
    assert {o: n * PROBES for o, n in owners.items()} == by_validator  # who held a host sent its probes
    for h in store.list_hosts():
        assert h["state"] == "flagged"


def test_sigterm_drains_in_flight_probes_and_exits_cleanly(slow_hosts, tmp_path):
    db = tmp_path / "t.db"
    config = write_config(tmp_path, str(db), slow_hosts)
    proc = subprocess.Popen([sys.executable, "-m", "validator.cli", "run", "--config", str(config),
                             "--instance", "t1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store_url = f"sqlite:///{db}"
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            if counts(Store(store_url))["dispatches"] >= 3:
                break
        except Exception:  # not created yet
            continue
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    sent = int(out.rsplit("stopped:", 1)[1].split("rounds,")[1].split("probes sent")[0])
    c = counts(Store(store_url))
    assert c["dispatches"] == sent  # every probe that went out has its answer recorded
    assert c["scores"] <= c["dispatches"]
    status = subprocess.run([sys.executable, "-m", "validator.cli", "status", "--db", str(db), "--json"],
                            capture_output=True, text=True, check=True)
    import json
    assert [(v["name"], v["state"]) for v in json.loads(status.stdout)["validators"]] == [("t1", "stopped")]
