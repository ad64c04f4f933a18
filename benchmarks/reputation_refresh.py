"""Reputation refresh against a host's history length, on SQLite and on PostgreSQL.

After every scoring batch the daemon recomputes the standing of each host in it from
everything stored about that host (`validator.daemon.refresh_reputation`: a pure function
of the rows, so a restarted validator gets the same answer). The history only grows: at
the default 4 probes per 15 minutes a host gains 384 answers a day, about 35,000 in three
months. This measures, in one process, per backend and history length:

- full rows (the baseline): the host's answers read as `Store.host_scores` gives them
  (probe messages and settings, the answer's text, the score's reasons and metrics) and
  turned into reputation outcomes, which is how the refresh read them before;
- narrow: `validator.daemon.outcomes`, which reads only the columns reputation uses
  (`Store.host_outcomes`);
- refresh: the whole `refresh_reputation` (narrow read, evidence, components, the
  stored score update).

The history is one host's answers with real prompts and answer texts (cycled from
benchmarks/results/audit_records.jsonl), each scored "pass" with a p-value; a score's
metrics are a JSON object of about 1.7 KB, the size real scores have (1.5-2.0 KB measured
on those records). Times are the best of `--repeat` runs (the baseline: of at most two).

    python benchmarks/reputation_refresh.py            # 1,000, 10,000 and 40,000 answers
    python benchmarks/reputation_refresh.py --quick    # 1,000 and 5,000, SQLite only

Writes benchmarks/results/reputation_refresh.json (--quick: reputation_refresh.quick.json);
prints the ratios, then the JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon_overhead import scratch_postgresql  # noqa: E402  (this folder is on sys.path)
from validator.daemon import outcomes, refresh_reputation  # noqa: E402
from validator.reputation import Outcome, ReputationConfig  # noqa: E402
from validator.store import Dispatch, Probe, Score, Store, upgrade  # noqa: E402

RECORDS = ROOT / "benchmarks/results/audit_records.jsonl"
HOST = "h"
ANSWERS_PER_DAY = 4 * 24 * 4  # configs/validator.yaml: 4 probes per host every 15 minutes
METRICS = {"tokens": 60, "mean_logp": -1.234567, "termination": {"stop": "eos", "eos_gap": 0.5},
           "per_token_logp": [round(-1.0 - i / 97, 6) for i in range(150)]}


def full_row_outcomes(store: Store, host: str) -> list[Outcome]:
    """The baseline: outcomes built from the host's full rows, as the refresh read them
    before it read only the columns it uses."""
    out = []
    for r in store.host_scores(host):
        d, sc = r["dispatch"], r["score"]
        verdict = sc["verdict"] if sc else None
        out.append(Outcome(probe_id=r["probe"]["id"], at=d["finished_at"], verdict=verdict,
                           p_value=sc["p_value"] if sc and verdict != "error" else None,
                           error=d["error"], ttfb_s=d["ttfb_s"], total_s=d["total_s"],
                           bytes=d["bytes"] or 0))
    return out


def fill(store: Store, start: int, stop: int, records: list[dict], rng: random.Random) -> None:
    """Answers start..stop-1 of the host, 225 s apart (4 per 15 minutes)."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    host_id = store.get_host(HOST)["id"]
    with store.session() as s:
        for a in range(start, stop, 2000):
            probes, dispatches, scores = [], [], []
            for i in range(a, min(stop, a + 2000)):
                rec, at, pid = records[i % len(records)], t0 + timedelta(seconds=225 * i), f"r{i // 4}-{HOST}-{i % 4}"
                probes.append(dict(id=pid, round=i // 4, host_id=host_id, index=i % 4, prompt_id=rec["id"],
                                   messages=rec["messages"], configs=rec["configs"], stream=False, created_at=at))
                dispatches.append(dict(probe_id=pid, ok=True, text=rec["response"], status=200, error=None,
                                       detail="", ttfb_s=rng.uniform(0.2, 2.0), total_s=rng.uniform(2, 8),
                                       bytes=len(rec["response"]), attempts=1, served_by=None,
                                       finished_at=at, validator="bench"))
                scores.append(dict(probe_id=pid, verdict="pass", p_value=rng.random(), reasons=["consistent"],
                                   metrics=METRICS, scored_at=at + timedelta(seconds=30), validator="bench"))
            for model, rows in ((Probe, probes), (Dispatch, dispatches), (Score, scores)):
                s.execute(insert(model), rows)


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def bench_backend(url: str, sizes: list[int], repeat: int, records: list[dict]) -> dict:
    upgrade(url)
    store = Store(url)
    store.add_host(HOST, "http://bench", "smollm2-135m")
    config, rng, done, out = ReputationConfig(), random.Random(0), 0, {}
    try:
        for n in sizes:
            fill(store, done, n, records, rng)
            done = n
            full_s, full = best(lambda: full_row_outcomes(store, HOST), min(2, repeat))
            narrow_s, narrow = best(lambda: outcomes(store, HOST), repeat)
            if narrow != full:
                raise SystemExit(f"{n} answers: the narrow read differs from the full rows")
            refresh_s, _ = best(lambda: refresh_reputation(store, HOST, config), repeat)
            out[str(n)] = {"answers": n, "days_at_default_rate": round(n / ANSWERS_PER_DAY, 1),
                           "full_rows_s": round(full_s, 4), "narrow_s": round(narrow_s, 4),
                           "refresh_s": round(refresh_s, 4),
                           "narrow_vs_full_rows": round(full_s / narrow_s, 2)}
            print(f"  {n:>7} answers ({n / ANSWERS_PER_DAY:.0f} days): full rows {full_s:.3f} s, "
                  f"narrow {narrow_s:.3f} s (x{full_s / narrow_s:.1f} faster), refresh {refresh_s:.3f} s",
                  flush=True)
    finally:
        store.close()
    return out


def run_sqlite(sizes, repeat, records) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_backend(Store.default_url(Path(tmp) / "validator.db"), sizes, repeat, records)
    return {"server": f"SQLite {sqlite3.sqlite_version} (file, WAL)", "sizes": result}


def run_postgresql(sizes, repeat, records) -> dict:
    with scratch_postgresql() as (url, server):
        if url is None:
            return {"skipped": server}
        return {"server": server, "sizes": bench_backend(url, sizes, repeat, records)}


BACKENDS = {"sqlite": run_sqlite, "postgresql": run_postgresql}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 and 5,000 answers, SQLite only")
    ap.add_argument("--sizes", default=None, help="comma-separated history lengths (default 1000,10000,40000)")
    ap.add_argument("--backends", default=None, help="comma-separated, from: " + ", ".join(BACKENDS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = sorted(int(x) for x in (args.sizes or ("1000,5000" if args.quick else "1000,10000,40000")).split(","))
    backends = [b.strip() for b in (args.backends or ("sqlite" if args.quick else "sqlite,postgresql")).split(",")]
    if unknown := set(backends) - set(BACKENDS):
        ap.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    out = args.out or ROOT / f"benchmarks/results/reputation_refresh{'.quick' if args.quick else ''}.json"
    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]

    results = {}
    for b in backends:
        print(f"{b}:", flush=True)
        results[b] = BACKENDS[b](sizes, args.repeat, records)
    result = {
        "benchmark": "reputation_refresh",
        "command": "python benchmarks/reputation_refresh.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "answers_per_day_at_default_rate": ANSWERS_PER_DAY, "repeat": args.repeat,
        "backends": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
