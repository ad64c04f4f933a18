"""Daemon overhead: scheduling and bookkeeping time per probe (model time excluded) and
database rows per second, on SQLite and on PostgreSQL.

Starts `validator simulate` in a subprocess with N hosts of the `static` strategy (fixed
text, no model), then, in this process:

- baseline: the probes of one round (derived from the secret exactly as the daemon
            derives them: same prompts, settings and stream flags) sent with bare
            validator.probing.client.FlexstackClient at the same concurrency, on a pool with the
            daemon's limits, no database;
- per backend (a fresh SQLite file; a fresh database on the local PostgreSQL,
  postgresql+psycopg://postgres@127.0.0.1:5432, skipped with a note if unreachable):
  - setup:   `Daemon(config)`: migrations, then one row per host;
  - round:   `Daemon.probe_round(1)`: claim hosts in batches, derive and store probes,
             send them, commit every answer, then per host `update_reputation` (reads
             the host's rows, a pure function, a score update) and finish the host round;
  - scoring bookkeeping: what `Daemon.score_batch` does minus the reference model:
             lease batches with `claim_unscored`, `record_score` each answer ("pass"),
             then `update_reputation` for each host in the batch, until none is left.

Overhead per probe = (round wall time - baseline wall time) / probes. CPU time is this
process's (`time.process_time`, all its threads): the hosts run in the subprocess, so it
is the client's plus the daemon's; SQLite runs inside this process, so on SQLite it
includes the database engine's own work, while PostgreSQL's server CPU is not counted.
Rows are those inserted (probes, dispatches, host_rounds, reputation_events; scores,
reputation_events), counted in the database afterwards; updates (leases, last_seen,
scores on hosts) are not rows but are in the statement counts. The daemon's engine is
cold (SQLAlchemy compiles each statement once on first use), as after a restart.

The baseline's pool has the daemon's limits (`concurrency` connections) on purpose, so
the difference is the daemon's own work. (A pool twice that size, as the daemon first
had, made the client itself about 4x slower: httpcore 1.0.9 scans its connections for
every idle one on each request.)

    python benchmarks/daemon_overhead.py            # 500 hosts x 4 probes, concurrency 100
    python benchmarks/daemon_overhead.py --hosts 20 --probes-per-host 2 --backends sqlite

Writes benchmarks/results/daemon_overhead.json; prints the ratios, then the JSON as the
last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import create_engine, event, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client_throughput import measure, start_hosts  # noqa: E402  (this folder is on sys.path)
from validator.probing.client import FlexstackClient  # noqa: E402
from validator.service.config import ValidatorConfig  # noqa: E402
from validator.daemon import Daemon  # noqa: E402
from validator.probing.probes import derive_probes, load_bank, load_mix  # noqa: E402

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MODEL = "smollm2-135m"
ROUND = 1
OWNER = "bench"
ROUND_TABLES = ("probes", "dispatches", "host_rounds", "reputation_events")
SCORING_TABLES = ("scores", "reputation_events")


@contextmanager
def running_hosts(n: int):
    """`validator simulate` with n static hosts; yields their URLs, stops it on exit."""
    proc, urls = start_hosts(n)
    try:
        yield urls
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def make_config(database: str, urls: list[str], args) -> ValidatorConfig:
    return ValidatorConfig.model_validate({
        "database": database, "secret": "benchmark-secret", "instance": OWNER,
        "rounds": {"interval_s": 1e9, "jitter_s": 0, "spread_s": 0,
                   "probes_per_host": args.probes_per_host, "concurrency": args.concurrency,
                   "claim_batch": 50},
        "hosts": [{"name": f"host-{i:03d}", "url": u, "model": MODEL} for i, u in enumerate(urls)]})


def timed(fn, *args):
    """fn(*args), its wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def pool_limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, keepalive_expiry=4.0)  # as probe_round's


async def send_bare(config: ValidatorConfig, concurrency: int, limit: int) -> list[bool]:
    """The round's first `limit` probes, host by host, through FlexstackClient alone."""
    bank, mix = load_bank(config.prompts), load_mix(config.settings_mix)
    secret = config.probe_secret()
    work = [(h.url, p) for h in config.hosts
            for p in derive_probes(secret, ROUND, h.name, bank, mix, config.rounds.probes_per_host)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=pool_limits(concurrency)) as http:
        clients = {url: FlexstackClient(url, token="validator", http=http,
                                        timeouts=config.client.timeouts())
                   for url in dict.fromkeys(url for url, _ in work)}

        async def one(url, probe) -> bool:
            async with sem:
                rec = await clients[url].complete(probe.messages, probe.wire_settings,
                                                  model=MODEL, stream=probe.stream)
                return rec.ok

        return await asyncio.gather(*(one(u, p) for u, p in work[:limit]))


def counts(engine, tables) -> dict[str, int]:
    with engine.connect() as c:
        return {t: c.execute(text(f"select count(*) from {t}")).scalar() for t in tables}


def inserted(engine, tables, before: dict[str, int]) -> dict:
    after = counts(engine, tables)
    rows = {t: after[t] - before.get(t, 0) for t in tables}
    return {**rows, "total": sum(rows.values())}


def count_statements(engine) -> dict[str, int]:
    seen = {"statements": 0, "commits": 0}
    event.listen(engine, "before_cursor_execute", lambda *a: seen.__setitem__("statements", seen["statements"] + 1))
    event.listen(engine, "commit", lambda *a: seen.__setitem__("commits", seen["commits"] + 1))
    return seen


def score_without_model(daemon: Daemon) -> int:
    """Daemon.score_batch with a constant verdict in place of the reference model, until
    the queue is empty."""
    cfg, store, answers = daemon.config.scoring, daemon.store, 0
    while rows := store.claim_unscored(daemon.owner, cfg.batch, cfg.lease_s):
        for r in rows:
            store.record_score(r["probe_id"], "pass", 0.5, ["benchmark"], {}, daemon.owner)
        for host in sorted({r["host"] for r in rows}):
            daemon.update_reputation(host)
        answers += len(rows)
    return answers


def bench_backend(url: str, urls: list[str], args, baseline: dict) -> dict:
    config = make_config(url, urls, args)
    daemon, setup_wall, _ = timed(Daemon, config)
    engine = daemon.store.engine
    seen = count_statements(engine)
    try:
        before = counts(engine, ROUND_TABLES)
        seen.update(statements=0, commits=0)
        hosts, wall, cpu = timed(asyncio.run, daemon.probe_round(ROUND))
        rows = inserted(engine, ROUND_TABLES, before)
        with engine.connect() as c:
            ok = c.execute(text("select count(*) from dispatches where ok")).scalar()
        probes = rows["dispatches"]
        round_ = {"hosts": hosts, "probes": probes, "ok": ok, "wall_s": round(wall, 3),
                  "probes_per_s": round(probes / wall, 1),
                  "cpu_ms_per_probe": round(1000 * cpu / probes, 3),
                  "rows": rows["total"], "rows_by_table": rows,
                  "rows_per_s": round(rows["total"] / wall, 1),
                  "statements_per_probe": round(seen["statements"] / probes, 2),
                  "transactions_per_probe": round(seen["commits"] / probes, 2)}

        before = counts(engine, SCORING_TABLES)
        seen.update(statements=0, commits=0)
        answers, s_wall, s_cpu = timed(score_without_model, daemon)
        s_rows = inserted(engine, SCORING_TABLES, before)
        scoring = {"answers": answers, "wall_s": round(s_wall, 3),
                   "ms_per_answer": round(1000 * s_wall / max(answers, 1), 3),
                   "cpu_ms_per_answer": round(1000 * s_cpu / max(answers, 1), 3),
                   "rows": s_rows["total"], "rows_by_table": s_rows,
                   "rows_per_s": round(s_rows["total"] / s_wall, 1),
                   "statements_per_answer": round(seen["statements"] / max(answers, 1), 2),
                   "transactions_per_answer": round(seen["commits"] / max(answers, 1), 2)}
        with engine.connect() as c:
            states = dict(c.execute(text("select state, count(*) from hosts group by state")).all())
    finally:
        daemon.store.close()
    return {"setup_s": round(setup_wall, 3), "round": round_, "scoring_bookkeeping": scoring,
            "host_states_after": states,
            "overhead_ms_per_probe_vs_client": round(1000 * (wall - baseline["wall_s"]) / probes, 3),
            "cpu_vs_client": round(round_["cpu_ms_per_probe"] / baseline["cpu_ms_per_probe"], 3)}


def run_sqlite(urls, args, baseline) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_backend(str(Path(tmp) / "validator.db"), urls, args, baseline)
    return {"server": f"SQLite {sqlite3.sqlite_version} (file, WAL)", **result}


@contextmanager
def scratch_postgresql():
    """A new database on the local PostgreSQL, dropped afterwards: yields (its URL, a
    description of the server), or (None, why) when the server is not reachable."""
    name = f"validator_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as c:
            version = c.execute(text("show server_version")).scalar()
            c.execute(text(f'create database "{name}"'))
    except Exception as exc:  # depends on the machine
        admin.dispose()
        why = str(exc).splitlines()[0]
        print(f"postgresql: skipped, {PG_SERVER} is not reachable: {why}")
        yield None, why
        return
    try:
        yield f"{PG_SERVER}/{name}", f"PostgreSQL {version} (local, TCP)"
    finally:
        with admin.connect() as c:
            c.execute(text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def run_postgresql(urls, args, baseline) -> dict:
    with scratch_postgresql() as (url, server):
        if url is None:
            return {"skipped": server}
        return {"server": server, **bench_backend(url, urls, args, baseline)}


BACKENDS = {"sqlite": run_sqlite, "postgresql": run_postgresql}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=500)
    ap.add_argument("--probes-per-host", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--backends", default="sqlite,postgresql",
                    help="comma-separated, from: " + ", ".join(BACKENDS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/daemon_overhead.json")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        ap.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")

    with running_hosts(args.hosts) as urls:
        config = make_config("unused.db", urls, args)
        bare = lambda _urls, n, concurrency: send_bare(config, concurrency, n)  # noqa: E731
        probes = args.hosts * args.probes_per_host
        measure(bare, urls, min(200, probes), args.concurrency)  # warm up both sides
        baseline = measure(bare, urls, probes, args.concurrency)
        results = {b: BACKENDS[b](urls, args, baseline) for b in backends}

    result = {
        "benchmark": "daemon_overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]},
        "hosts": args.hosts, "probes_per_host": args.probes_per_host,
        "concurrency": args.concurrency, "claim_batch": 50,
        "baseline_client": baseline, "backends": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"baseline client: {baseline['wall_s']} s for {baseline['probes']} probes "
          f"({baseline['ok']} ok), {baseline['cpu_ms_per_probe']} ms CPU/probe")
    for name, r in results.items():
        if "skipped" in r:
            continue
        rd, sc = r["round"], r["scoring_bookkeeping"]
        print(f"{name}: round {rd['wall_s']} s ({rd['ok']}/{rd['probes']} ok), "
              f"wall x{rd['wall_s'] / baseline['wall_s']:.2f} of the client's, "
              f"+{r['overhead_ms_per_probe_vs_client']} ms/probe; "
              f"CPU {rd['cpu_ms_per_probe']} ms/probe (x{r['cpu_vs_client']}); "
              f"{rd['rows']} rows, {rd['rows_per_s']} rows/s")
        print(f"{' ' * len(name)}  scoring bookkeeping: {sc['ms_per_answer']} ms/answer, "
              f"{sc['rows']} rows, {sc['rows_per_s']} rows/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
