"""What the stored history costs the daemon and the admin's reads as it grows, on SQLite
and on PostgreSQL.

The database only grows: at the default 4 probes per host every 15 minutes a host gains
384 answers a day, about 35,000 in three months, and a network of hundreds of hosts
millions. Per backend and history length, in one process, best of `--repeat` runs:

- reputation refresh, after every scoring batch for each host in it:
  - full rows (baseline): the host's answers read as `Store.host_scores` gives them
    (messages, settings, the answer's text, the score's reasons and metrics) and turned
    into reputation outcomes, as the refresh read them before 2026-11-28;
  - narrow: `validator.service.operations.outcomes` (`Store.host_outcomes`: only the columns
    reputation uses);
  - refresh: the whole `Service.refresh_reputation` (narrow read, evidence, components, the
    stored score);
- scoring queue, every `scoring.interval_s` (10 s) while there is work:
  - scan (baseline): the claim's SELECT as it was before 2026-11-28: every answer in
    time order, each checked for a score (read only: no lease written);
  - claim: `Store.claim_unscored` of the 64 answers awaiting a score (leases written),
    through the index of answers awaiting a score;
  - queue depth: `Store.queue_depth` (`validator status`, `/metrics`);
- status: `Store.status()` (`validator status`, `/metrics`: leases, last answer and
  score, hosts by state);
- counts: the per-host counts (answers, failed calls by class, scores) and the
  scoring-latency histogram that the host list (`validator hosts list`, the dashboard,
  /api/hosts) and /metrics show:
  - aggregated (baseline): counted over every stored answer, as they were before
    2026-11-28 (read only);
  - tallies: `Store.host_stats`, `dispatch_counts` and `scoring_latency`, which read the
    running totals kept as answers and scores are stored;
- metrics scrape: `GET /metrics`'s collector (`validator.web.metrics`), whole;
- answers page, the dashboard's and the API's newest 50 and how many there are in all:
  - sorted (baseline): the host's answers found through their probes and all sorted by
    time, counted over the whole join, as before 2026-11-28 (evening);
  - indexed: `Store.host_history(limit=50)`, one range of the (host, time) index of
    answers, counted on that index.

The history is one host's answers (the costs above depend on the total, not on how many
hosts share it) with real prompts and answer texts cycled from
benchmarks/results/audit_records.jsonl, 1 in 50 a failed call, the rest scored "pass"
with a random p-value and metrics of about 1.7 KB (real scores have 1.5-2.0 KB), plus
the 64 newest answers awaiting a score. Ratios compare each operation with its baseline,
or with itself at the smallest history.

    python benchmarks/history_growth.py            # 1,000, 10,000 and 40,000 answers
    python benchmarks/history_growth.py --quick    # 1,000 and 5,000, SQLite only

Writes benchmarks/results/history_growth.json (--quick: history_growth.quick.json);
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

from prometheus_client import generate_latest
from sqlalchemy import exists, func, insert, or_, select, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon_overhead import scratch_postgresql  # noqa: E402  (this folder is on sys.path)
from validator.models.registry import Registry  # noqa: E402
from validator.service.operations import Service, outcomes  # noqa: E402
from validator.reputation import Outcome, ReputationConfig  # noqa: E402
from validator.store import (  # noqa: E402
    SCORING_LATENCY_BUCKETS, Dispatch, Host, Probe, Score, Store, latency_bucket, upgrade,
)
from validator.web.metrics import registry_for  # noqa: E402

RECORDS = ROOT / "benchmarks/results/audit_records.jsonl"
HOST = "h"
QUEUE = 64  # answers awaiting a score: one claim's worth (configs/validator.yaml scoring.batch)
ANSWERS_PER_DAY = 4 * 24 * 4  # configs/validator.yaml: 4 probes per host every 15 minutes
METRICS = {"tokens": 60, "mean_logp": -1.234567, "termination": {"stop": "eos", "eos_gap": 0.5},
           "per_token_logp": [round(-1.0 - i / 97, 6) for i in range(150)]}


def full_row_outcomes(store: Store, host: str) -> list[Outcome]:
    """Baseline: outcomes built from the host's full rows, as the refresh read them before."""
    out = []
    for r in store.host_scores(host):
        d, sc = r["dispatch"], r["score"]
        verdict = sc["verdict"] if sc else None
        out.append(Outcome(probe_id=r["probe"]["id"], at=d["finished_at"], verdict=verdict,
                           p_value=sc["p_value"] if sc and verdict != "error" else None,
                           error=d["error"], ttfb_s=d["ttfb_s"], total_s=d["total_s"],
                           bytes=d["bytes"] or 0))
    return out


def scan_for_unscored(store: Store, owner: str) -> list:
    """Baseline: the claim's SELECT before the index of answers awaiting a score."""
    now = datetime.now(UTC)
    scored = exists().where(Score.probe_id == Dispatch.probe_id)
    free = or_(Dispatch.score_lease_until.is_(None), Dispatch.score_lease_until <= now,
               Dispatch.score_owner == owner)
    stmt = (select(Dispatch, Probe, Host.name, Host.model)
            .join(Probe, Dispatch.probe_id == Probe.id).join(Host, Probe.host_id == Host.id)
            .where(Dispatch.ok.is_(True), ~scored, free)
            .order_by(Dispatch.finished_at, Dispatch.id).limit(QUEUE))
    with store.session(readonly=True) as s:
        return s.execute(stmt).all()


def aggregated_counts(store: Store) -> tuple:
    """Baseline: host_stats, dispatch_counts and scoring_latency as they were counted
    before the tallies, over every stored answer."""
    if store.engine.dialect.name == "sqlite":
        seconds = (func.julianday(Score.scored_at) - func.julianday(Dispatch.finished_at)) * 86400.0
    else:
        seconds = func.extract("epoch", Score.scored_at - Dispatch.finished_at)
    with store.session(readonly=True) as s:
        stats = s.execute(select(Host.name, func.count(Probe.id), func.count(Dispatch.id),
                                 func.count(Dispatch.id).filter(Dispatch.ok.is_(False)), func.count(Score.id))
                          .join(Probe, Probe.host_id == Host.id)
                          .outerjoin(Dispatch, Dispatch.probe_id == Probe.id)
                          .outerjoin(Score, Score.probe_id == Probe.id).group_by(Host.name)).all()
        counts = s.execute(select(Host.name, Dispatch.error, func.count())
                           .join(Probe, Probe.host_id == Host.id).join(Dispatch, Dispatch.probe_id == Probe.id)
                           .group_by(Host.name, Dispatch.error)).all()
        latency = s.execute(select(func.count(), func.coalesce(func.sum(seconds), 0.0),
                                   *(func.count().filter(seconds <= b) for b in SCORING_LATENCY_BUCKETS))
                            .select_from(Score).join(Dispatch, Dispatch.probe_id == Score.probe_id)).one()
    return stats, counts, latency


def sorted_answers_page(store: Store, host: str, limit: int = 50) -> tuple[int, list[str]]:
    """Baseline: the answers page before answers carried their host (found through their
    probes, every one of them sorted by time; counted over the whole join)."""
    with store.session(readonly=True) as s:
        host_id = s.scalar(select(Host.id).where(Host.name == host))
        stmt = (select(Probe, Dispatch, Score).join(Dispatch, Dispatch.probe_id == Probe.id)
                .outerjoin(Score, Score.probe_id == Probe.id).where(Probe.host_id == host_id)
                .order_by(Dispatch.finished_at.desc(), Dispatch.id.desc()))
        total = s.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
        return total, [p.id for p, _, _ in s.execute(stmt.limit(limit))]


def answers_page(store: Store, host: str, limit: int = 50) -> tuple[int, list[str]]:
    total, page = store.host_history(host, limit=limit)
    return total, [a["probe"]["id"] for a in page]


def tallied_counts(store: Store) -> tuple:
    return store.host_stats(), store.dispatch_counts(), store.scoring_latency()


def fill(store: Store, start: int, stop: int, records: list[dict], rng: random.Random) -> None:
    """Answers start..stop-1 of the host, 225 s apart (4 per 15 minutes): 1 in 50 a
    failed call, the last QUEUE unscored, the others scored."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    host_id = store.get_host(HOST)["id"]
    with store.session() as s:
        for a in range(start, stop, 2000):
            probes, dispatches, scores = [], [], []
            for i in range(a, min(stop, a + 2000)):
                rec, at, pid = records[i % len(records)], t0 + timedelta(seconds=225 * i), f"r{i // 4}-{HOST}-{i % 4}"
                ok, awaiting = i % 50 != 49, i >= stop - QUEUE
                probes.append(dict(id=pid, round=i // 4, host_id=host_id, index=i % 4, prompt_id=rec["id"],
                                   messages=rec["messages"], configs=rec["configs"], stream=False, created_at=at))
                dispatches.append(dict(probe_id=pid, host_id=host_id, ok=ok, text=rec["response"] if ok else None,
                                       status=200 if ok else None, error=None if ok else "first_byte_timeout",
                                       detail="", ttfb_s=rng.uniform(0.2, 2.0) if ok else None,
                                       total_s=rng.uniform(2, 8), bytes=len(rec["response"]) if ok else 0,
                                       attempts=1, served_by=None, finished_at=at, validator="bench",
                                       awaiting_score=ok and awaiting))
                if ok and not awaiting:
                    scores.append(dict(probe_id=pid, verdict="pass", p_value=rng.random(), reasons=["consistent"],
                                       metrics=METRICS, scored_at=at + timedelta(seconds=30), validator="bench"))
            for model, rows in ((Probe, probes), (Dispatch, dispatches), (Score, scores)):
                if rows:
                    s.execute(insert(model), rows)
            # the running totals record_dispatch and record_score keep (bulk rows bypass them)
            failed = sum(not d["ok"] for d in dispatches)
            store._count(s, host_id, {"probes": len(probes), "calls": len(dispatches), "failed": failed,
                                      "error:first_byte_timeout": failed, "scored": len(scores),
                                      "latency_count": len(scores), "latency_sum_s": 30.0 * len(scores),
                                      latency_bucket(30.0): len(scores)})
    if store.engine.dialect.name == "postgresql":  # what autovacuum does after bulk inserts
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))


def score_queue(store: Store) -> None:
    """Score the answers still awaiting one (before the history grows past them)."""
    with store.session(readonly=True) as s:
        ids = s.scalars(select(Dispatch.probe_id).where(Dispatch.awaiting_score.is_(True))).all()
    for probe_id in ids:
        store.record_score(probe_id, "pass", 0.5, ["consistent"], METRICS, "bench")


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
            score_queue(store)
            fill(store, done, n, records, rng)
            done = n
            t = {}
            t["full_rows_s"], full = best(lambda: full_row_outcomes(store, HOST), min(2, repeat))
            t["narrow_s"], narrow = best(lambda: outcomes(store, HOST), repeat)
            if narrow != full:
                raise SystemExit(f"{n} answers: the narrow read differs from the full rows")
            service = Service(store, Registry.load(), config)
            t["refresh_s"], _ = best(lambda: service.refresh_reputation(HOST), repeat)
            t["scan_s"], scanned = best(lambda: scan_for_unscored(store, "bench"), min(2, repeat))
            t["claim_s"], claimed = best(lambda: store.claim_unscored("bench", QUEUE, 600), repeat)
            if sorted(d["probe_id"] for d in claimed) != sorted(r[0].probe_id for r in scanned):
                raise SystemExit(f"{n} answers: the claim and the scan found different answers")
            t["queue_depth_s"], depth = best(lambda: store.queue_depth(), repeat)
            if depth != len(claimed):
                raise SystemExit(f"{n} answers: queue depth {depth}, claimed {len(claimed)}")
            t["status_s"], _ = best(lambda: store.status(), repeat)
            t["answers_page_sorted_s"], sorted_page = best(lambda: sorted_answers_page(store, HOST), min(2, repeat))
            t["answers_page_s"], page = best(lambda: answers_page(store, HOST), repeat)
            if page != sorted_page:
                raise SystemExit(f"{n} answers: the answers page differs from the sorted one")
            t["aggregated_counts_s"], (stats, _, latency) = best(lambda: aggregated_counts(store), min(2, repeat))
            t["tallied_counts_s"], (tallied, _, (_, _, count)) = best(lambda: tallied_counts(store), repeat)
            if tallied[HOST]["answered"] != stats[0][2] or count != latency[0]:
                raise SystemExit(f"{n} answers: the tallies differ from the stored rows")
            t["metrics_scrape_s"], _ = best(lambda: generate_latest(registry_for(store)), repeat)
            out[str(n)] = {"answers": n, "days_at_default_rate": round(n / ANSWERS_PER_DAY, 1),
                           **{k: round(v, 4) for k, v in t.items()},
                           "narrow_vs_full_rows": round(t["full_rows_s"] / t["narrow_s"], 2),
                           "claim_vs_scan": round(t["scan_s"] / t["claim_s"], 2),
                           "tallies_vs_aggregated": round(t["aggregated_counts_s"] / t["tallied_counts_s"], 2),
                           "page_vs_sorted": round(t["answers_page_sorted_s"] / t["answers_page_s"], 2)}
            print(f"  {n:>7} answers ({n / ANSWERS_PER_DAY:.0f} days): refresh: full rows {t['full_rows_s']:.3f} s, "
                  f"narrow {t['narrow_s']:.3f} s (x{t['full_rows_s'] / t['narrow_s']:.1f} faster), whole "
                  f"{t['refresh_s']:.3f} s; queue: scan {t['scan_s']:.4f} s, claim {t['claim_s']:.4f} s "
                  f"(x{t['scan_s'] / t['claim_s']:.1f} faster), depth {t['queue_depth_s']:.4f} s; "
                  f"status {t['status_s']:.4f} s; answers page: sorted {t['answers_page_sorted_s']:.4f} s, "
                  f"indexed {t['answers_page_s']:.4f} s (x{t['answers_page_sorted_s'] / t['answers_page_s']:.1f} "
                  f"faster); counts: "
                  f"aggregated {t['aggregated_counts_s']:.4f} s, tallies {t['tallied_counts_s']:.4f} s; "
                  f"metrics scrape {t['metrics_scrape_s']:.4f} s", flush=True)
        smallest = out[str(sizes[0])]
        for r in out.values():  # how each operation grew with the history
            r["vs_smallest"] = {k: round(r[k] / smallest[k], 2) for k in r if k.endswith("_s")}
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
    if sizes[0] <= QUEUE:
        ap.error(f"history lengths must be above the queue of {QUEUE}")
    backends = [b.strip() for b in (args.backends or ("sqlite" if args.quick else "sqlite,postgresql")).split(",")]
    if unknown := set(backends) - set(BACKENDS):
        ap.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    out = args.out or ROOT / f"benchmarks/results/history_growth{'.quick' if args.quick else ''}.json"
    records = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]

    results = {}
    for b in backends:
        print(f"{b}:", flush=True)
        results[b] = BACKENDS[b](sizes, args.repeat, records)
    result = {
        "benchmark": "history_growth",
        "command": "python benchmarks/history_growth.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "answers_per_day_at_default_rate": ANSWERS_PER_DAY, "queue": QUEUE, "repeat": args.repeat,
        "backends": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
