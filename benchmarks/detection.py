"""Detection benchmark: the simulated network refereed by the real daemon for K rounds.

    python benchmarks/detection.py                  # the default run (about 30 min on 2 cores)
    python benchmarks/detection.py --quick          # about 5 min: 1 host per kind, 3 rounds of 4
    python benchmarks/detection.py --rounds 6 --replicas 5 --probes-per-host 4
    python benchmarks/detection.py --from-json benchmarks/results/detection.json  # tables, plot again

Default: 4 rounds of 5 probes per host, 3 hosts per cheat, 2 per honest engine (30 hosts,
600 probes), 8 probes in flight, 1 torch thread per generating or scoring thread (several
models generate at once on 2 cores; more threads per model only oversubscribe them).
Twenty probes per host: the weakest cheats (truncation, greedy answers to sampled probes)
give little evidence per answer; with fifteen, the last run caught them after up to 15
and 12 probes and missed one host of each, so fifteen ended before their worst case.

Rounds are numbered 1..K (`--first-round`), not by the clock as a deployed daemon numbers
them: probes derive from the secret, the round and the host, so the same command sends
the same probes. The table still varies a little between runs (the order answers arrive
in decides which probe counts first and what the replaying cheat replays).

Every host is model-backed (no fault hosts): the three honest engines of the calibration
(transformers float32 and bfloat16, llama.cpp on the GGUF) and the eight cheats of
validator/network/simulator.py (other-model, layers-removed, requantised, settings-ignored,
hotter, greedy-when-sampling, truncated, replayed), each run as `--replicas` independent
hosts named `cheat-<strategy>-<i>` (honest ones `honest-<engine>-<i>`, `--honest-replicas`
of each). Different host names get different probes from the secret, so replicas are
independent trials of the same strategy.

The run is `validator demo` itself (validator.cli.demo, imported, not copied) on a
network and validator config written here: the network is served in-process on
loopback, and the real Daemon probes it round after round (APScheduler, client,
SQLite store, scoring worker, reputation) with SmolLM2-135M as the reference on the
CPU. The default reputation settings are used (trust_after 10, alpha 1e-4).

Then, from the database the daemon leaves:

- per cheat host: detected = its state is `flagged` at the end; probes to detection =
  the number of its scored probes (in the order they were answered, as the reputation
  reads them) up to and including the probe at which its evidence crossed 1/alpha,
  i.e. the `last_probe` of its first `-> flagged` reputation event;
- per honest host: false alarm = flagged at the end (Ville's inequality bounds the chance
  by alpha per host); its `fail` verdicts are counted separately (failed answers);
- ROC and AUC of the per-response p-values (score -log10 p, p = 0 taken as 1e-300):
  every scored answer, honest = 0, cheat = 1; overall and per cheat against all honest
  answers. AUC counts ties as one half (the Mann-Whitney statistic); computed with numpy.

Writes benchmarks/results/detection.json (per host, per strategy / engine, ROC points,
p-values, configuration, runtime), detection.md (the tables) and detection.png (ROC
curves), or into --out. --quick writes to the same place unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from validator.network.catalogue import CATALOGUE  # noqa: E402
from validator.network.catalogue import CHEATS as CATALOGUE_CHEATS  # noqa: E402

MODEL = "smollm2-135m"
SECRET = "detection-benchmark-secret"  # fixed: the same probes on every run
# From the catalogue of host behaviours: every cheat (named by its strategy here), and
# the honest engines of the calibration (the stripped llama.cpp host is scored by the tests).
CHEATS = {CATALOGUE[name]["strategy"]: CATALOGUE[name] for name in CATALOGUE_CHEATS}  # group -> host options
HONEST = {  # engine group -> host options in the network file
    "honest-transformers": CATALOGUE["honest-transformers-fp32"],
    "honest-transformers-bf16": CATALOGUE["honest-transformers-bf16"],
    "honest-llama-cpp": CATALOGUE["honest-llama.cpp"],
}
SCORED = ("pass", "fail", "inconclusive")
P_FLOOR = 1e-300  # -log10(0) would be infinite
DEFAULTS = {"rounds": 4, "replicas": 3, "honest_replicas": 2, "probes_per_host": 5}
FIRST_ROUND = 1  # rounds 1..K, not the clock's: the same probes on every run
QUICK = {"rounds": 3, "replicas": 1, "honest_replicas": 1, "probes_per_host": 4}


# --------------------------------------------------------------------------- the run

def network_hosts(replicas: int, honest_replicas: int) -> list[dict]:
    """The network's hosts, each with its "group" (honest engine or cheat strategy)."""
    hosts = []
    # Replica by replica, so that hosts sharing a model are not next to each other: the
    # daemon sends probes in host order, and each model answers one request at a time.
    for i in range(1, max(replicas, honest_replicas) + 1):
        if i <= honest_replicas:
            hosts += [{"name": f"{group}-{i}", "group": group, **options} for group, options in HONEST.items()]
        if i <= replicas:
            hosts += [{"name": f"cheat-{s}-{i}", "group": s, **options} for s, options in CHEATS.items()]
    return hosts


def validator_settings(probes_per_host: int, concurrency: int) -> dict:
    """configs/demo.yaml's validator section, with the default reputation settings and
    deadlines long enough for requests queued behind shared models on 2 cores."""
    return {
        "instance": "detection-benchmark",
        "secret": SECRET,
        # The demo's answers of 48-96 tokens, as every run in benchmarks/README.md: the
        # default mix's 512-token answers take a CPU round past the client's deadlines.
        "settings_mix": "short",
        "rounds": {"interval_s": 5, "jitter_s": 0, "spread_s": 0,  # back to back
                   "probes_per_host": probes_per_host, "concurrency": concurrency},
        "scoring": {"interval_s": 2, "batch": 32},
        "client": {"connect_s": 5, "first_byte_s": 120, "total_s": 180, "retries": 1},
        "reputation": {},  # defaults: trust_after 10, alpha 1e-4
    }


def run_network(workdir: Path, db: Path, hosts: list[dict], rounds: int, validator: dict,
                first_round: int = FIRST_ROUND) -> float:
    """`validator demo` on this network; returns its wall time in seconds."""
    from validator.cli import demo

    network = workdir / "network.yaml"
    network.write_text(yaml.safe_dump({"model": MODEL, "hosts": [
        {k: v for k, v in h.items() if k != "group"} for h in hosts]}, sort_keys=False))
    config = workdir / "demo.yaml"
    config.write_text(yaml.safe_dump({"network": str(network), "rounds": rounds, "first_round": first_round,
                                      "database": str(db), "validator": validator}, sort_keys=False))
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the host list: we read the database instead
        demo(config=config, rounds=rounds, as_json=True)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- analysis

def per_host(db: Path, hosts: list[dict], reputation) -> tuple[dict[str, dict], list[int]]:
    """Each host's answers, verdicts, state and (if flagged) probes to detection; and the
    round numbers the daemon probed."""
    from validator.reputation import log_e_values, log_evidence
    from validator.store import Store

    store = Store(Store.default_url(db))
    try:
        rows = store.export_rows()  # oldest answer first: the order the reputation reads
        states = {h["name"]: h["state"] for h in store.list_hosts()}
        rounds = sorted({r["round"] for r in rows})
        out = {}
        for h in hosts:
            name = h["name"]
            mine = [r for r in rows if r["host"] == name]
            scored = [r for r in mine if r["verdict"] in SCORED and r["p_value"] is not None]
            flags = [e for e in reversed(store.reputation_events(name)) if e["state_to"] == "flagged"]
            to_detection = flag_round = None
            if flags:
                event = flags[0]
                seen = [r["probe_id"] for r in scored if r["scored_at"] <= event["at"]]
                crossing = event["evidence"]["last_probe"]
                to_detection = seen.index(crossing) + 1
                flag_round = rounds.index(next(r["round"] for r in scored if r["probe_id"] == crossing)) + 1
            log_r = log_evidence(log_e_values(np.array([r["p_value"] for r in scored]), reputation))
            out[name] = {
                "group": h["group"], "honest": h["group"] in HONEST, "state": states[name],
                "flagged": bool(flags), "probes_to_detection": to_detection,
                "round_of_detection": flag_round,
                "probes": len(scored),
                "answers": sum(r["ok"] for r in mine),
                "transport_errors": sum(not r["ok"] for r in mine),
                "unscored": sum(r["ok"] and r["verdict"] not in SCORED for r in mine),
                "verdicts": {v: sum(r["verdict"] == v for r in scored) for v in SCORED},
                "evidence_log10_final": _log10(log_r[-1]) if len(log_r) else 0.0,
                "evidence_log10_max": _log10(log_r.max()) if len(log_r) else 0.0,
                "p_values": [float(f"{r['p_value']:.4g}") for r in scored],
                "flag_reason": flags[0]["reason"] if flags else None,
            }
        return out, rounds
    finally:
        store.close()


def _log10(log_e: float) -> float:
    return round(float(log_e) / math.log(10), 3)


def roc(negatives, positives) -> dict:
    """ROC of score = -log10(p) (higher: more suspicious), one point per distinct
    threshold, and its area (trapezoids: ties count one half)."""
    neg = np.sort(_suspicion(negatives))
    pos = np.sort(_suspicion(positives))
    if not len(neg) or not len(pos):
        return {"auc": None, "fpr": [], "tpr": [], "negatives": len(neg), "positives": len(pos)}
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.concatenate([[0.0], 1.0 - np.searchsorted(neg, thresholds, "left") / len(neg)])
    tpr = np.concatenate([[0.0], 1.0 - np.searchsorted(pos, thresholds, "left") / len(pos)])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return {"auc": round(auc, 4), "fpr": [round(x, 5) for x in fpr], "tpr": [round(x, 5) for x in tpr],
            "negatives": len(neg), "positives": len(pos)}


def _suspicion(p_values) -> np.ndarray:
    return -np.log10(np.maximum(np.asarray(p_values, dtype=float), P_FLOOR))


def summarise(hosts: dict[str, dict]) -> tuple[dict, dict, dict]:
    """(per cheat strategy, per honest engine, ROC curves) from the per-host results."""
    honest_p = [p for h in hosts.values() if h["honest"] for p in h["p_values"]]
    curves = {"overall": roc(honest_p, [p for h in hosts.values() if not h["honest"] for p in h["p_values"]])}
    cheats, engines = {}, {}
    for group in HONEST:
        mine = [h for h in hosts.values() if h["group"] == group]
        engines[group] = {
            "hosts": len(mine), "probes": sum(h["probes"] for h in mine),
            "false_alarms": sum(h["flagged"] for h in mine),
            "failed_answers": sum(h["verdicts"]["fail"] for h in mine),
            "inconclusive_answers": sum(h["verdicts"]["inconclusive"] for h in mine),
            "transport_errors": sum(h["transport_errors"] for h in mine),
            "states": sorted(h["state"] for h in mine),
            "max_evidence_log10": max((h["evidence_log10_max"] for h in mine), default=None),
        }
    for strategy in CHEATS:
        mine = {n: h for n, h in hosts.items() if h["group"] == strategy}
        if not mine:
            continue
        found = [h["probes_to_detection"] for h in mine.values() if h["flagged"]]
        curves[strategy] = roc(honest_p, [p for h in mine.values() for p in h["p_values"]])
        cheats[strategy] = {
            "hosts": len(mine), "detected": len(found), "detection_rate": round(len(found) / len(mine), 3),
            "probes_to_detection_median": statistics.median(found) if found else None,
            "probes_to_detection_worst": max(found) if found else None,
            "undetected": sorted(n for n, h in mine.items() if not h["flagged"]),
            "probes": sum(h["probes"] for h in mine.values()),
            "failed_answers": sum(h["verdicts"]["fail"] for h in mine.values()),
            "auc": curves[strategy]["auc"],
        }
    return cheats, engines, curves


# --------------------------------------------------------------------------- outputs

def markdown(result: dict) -> str:
    cfg, cheats, engines = result["config"], result["cheat_strategies"], result["honest_engines"]
    hosts = result["hosts"]
    missed = [n for s in cheats.values() for n in s["undetected"]]
    alarms = [n for n, h in hosts.items() if h["honest"] and h["flagged"]]
    honest_p = [p for h in hosts.values() if h["honest"] for p in h["p_values"]]
    cheat_p = [p for h in hosts.values() if not h["honest"] for p in h["p_values"]]
    per_host = cfg["rounds"] * cfg["probes_per_host"]
    late = [f"{name} was caught only in the last round (worst {s['probes_to_detection_worst']} of "
            f"{per_host} probes): with fewer probes per host it may not be."
            for name, s in cheats.items()
            if (s["probes_to_detection_worst"] or 0) > per_host - cfg["probes_per_host"]]
    lines = [
        "# Detection benchmark",
        "",
        f"`{result['command']}`, {result['created']}, {result['machine']}.",
        "",
        f"The simulated network (model-backed hosts only) refereed by the real daemon (`validator demo`'s "
        f"path) for **{cfg['rounds']} round(s) of {cfg['probes_per_host']} probes** per host: "
        f"{cfg['replicas']} host(s) per cheat, {cfg['honest_replicas']} per honest engine, "
        f"{len(hosts)} hosts in all; reference {MODEL} on the CPU; reputation defaults "
        f"(trust_after {cfg['trust_after']}, alpha {cfg['alpha']:.0e}); client first byte "
        f"{cfg['validator']['client']['first_byte_s']} s, concurrency {cfg['validator']['rounds']['concurrency']}. "
        f"Wall time {result['runtime_s']['total']:.0f} s (model loading, rounds and scoring).",
        "",
        ("**Every cheat host was flagged.**" if not missed else
         f"**Not detected: {', '.join(missed)}** (see below)."),
        ("**No honest host was flagged** (zero false alarms)." if not alarms else
         f"**False alarms: {', '.join(alarms)}.**"),
        f"Overall AUC of the per-answer p-values, cheat vs honest answers: "
        f"**{result['roc']['overall']['auc']}** ({result['roc']['overall']['positives']} cheat, "
        f"{result['roc']['overall']['negatives']} honest answers); "
        f"{sum(p == 1.0 for p in honest_p)} of the honest and {sum(p == 1.0 for p in cheat_p)} of the "
        "cheat answers have p = 1 exactly: those ties (counted one half) are what keeps the AUC below 1.",
        *late,
        "",
        "## Cheats",
        "",
        "Probes to detection: the host's scored probes up to and including the one at which its "
        "evidence crossed 1/alpha (its state became `flagged`). AUC: its answers against every honest answer.",
        "",
        "| cheat | hosts | detected | probes to detection, median | worst | answers failed | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in cheats.items():
        worst = "-" if s["probes_to_detection_worst"] is None else str(s["probes_to_detection_worst"])
        if s["undetected"]:
            worst += f" (+{len(s['undetected'])} not detected)"
        median = "-" if s["probes_to_detection_median"] is None else f"{s['probes_to_detection_median']:g}"
        lines.append(f"| {name} | {s['hosts']} | {s['detected']} of {s['hosts']} | {median} | {worst} | "
                     f"{s['failed_answers']} of {s['probes']} | {s['auc']} |")
    lines += [
        "",
        "## Honest engines",
        "",
        "False alarms: honest hosts flagged. Failed answers: answers with verdict `fail` "
        "(p < 1e-4), counted separately; evidence: the largest R_n any of its hosts reached "
        f"(flagging needs 10^{math.log10(1 / cfg['alpha']):g}).",
        "",
        "| honest engine | hosts | probes | false alarms | answers failed | inconclusive | largest evidence | states |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in engines.items():
        lines.append(f"| {name} | {e['hosts']} | {e['probes']} | {e['false_alarms']} | {e['failed_answers']} | "
                     f"{e['inconclusive_answers']} | 10^{e['max_evidence_log10']} | {', '.join(e['states'])} |")
    lines += ["", "## Hosts", "", f"Rounds: {result['rounds']}.", "",
              "| host | state | probes scored | pass / inconclusive / fail | transport errors | "
              "probes to detection (round) | final evidence |",
              "|---|---|---|---|---|---|---|"]
    order = [*HONEST, *CHEATS]
    for name, h in sorted(hosts.items(), key=lambda kv: (order.index(kv[1]["group"]), kv[0])):
        v = h["verdicts"]
        det = "-" if h["probes_to_detection"] is None else f"{h['probes_to_detection']} ({h['round_of_detection']})"
        lines.append(f"| {name} | {h['state']} | {h['probes']} | {v['pass']} / {v['inconclusive']} / {v['fail']} | "
                     f"{h['transport_errors']} | {det} | 10^{h['evidence_log10_final']} |")
    if missed:
        lines += ["", "## Not detected", ""]
        for n in missed:
            h = hosts[n]
            lines.append(f"- {n}: {h['probes']} probes scored, {h['verdicts']['fail']} failed, "
                         f"{h['verdicts']['inconclusive']} inconclusive; its evidence peaked at "
                         f"10^{h['evidence_log10_max']}, short of 10^{math.log10(1 / cfg['alpha']):g}.")
    lines += ["", "![ROC curves](detection.png)", ""]
    return "\n".join(lines)


def plot(curves: dict, hosts: dict[str, dict], path: Path) -> None:
    """ROC curves (left) and each group's -log10 p per answer (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.1]})
    for name, c in curves.items():
        if name != "overall" and c["auc"] is not None:
            left.plot(c["fpr"], c["tpr"], lw=1.2, alpha=0.85, label=f"{name} (AUC {c['auc']:.3f})")
    overall = curves["overall"]
    left.plot(overall["fpr"], overall["tpr"], color="black", lw=2.5, label=f"all cheats (AUC {overall['auc']:.3f})")
    left.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    left.set(xlabel="false positive rate (honest answers)", ylabel="true positive rate (cheat answers)",
             title="ROC of the per-answer p-values (score -log10 p)")
    left.grid(alpha=0.3)
    left.legend(loc="lower right", fontsize=8)

    groups = [*HONEST, *CHEATS]
    rng = np.random.default_rng(0)
    for y, group in enumerate(groups):
        scores = _suspicion([p for h in hosts.values() if h["group"] == group for p in h["p_values"]])
        right.scatter(np.minimum(scores, 30.0), y + rng.uniform(-0.25, 0.25, len(scores)), s=9, alpha=0.6,
                      color="tab:green" if group in HONEST else "tab:red")
    for x in (2, 4):  # the verdicts' thresholds: pass at p >= 1e-2, fail below 1e-4
        right.axvline(x, color="grey", ls="--", lw=1)
    right.set_yticks(range(len(groups)), groups, fontsize=8)
    right.invert_yaxis()
    right.set(xlabel="-log10 p per answer (capped at 30; dashed: pass left of 2, fail right of 4)", title="every scored answer, by host kind")
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, help=f"probe rounds (default {DEFAULTS['rounds']})")
    ap.add_argument("--replicas", type=int, help=f"hosts per cheat (default {DEFAULTS['replicas']})")
    ap.add_argument("--honest-replicas", type=int,
                    help=f"hosts per honest engine (default {DEFAULTS['honest_replicas']})")
    ap.add_argument("--probes-per-host", type=int,
                    help=f"probes per host per round (default {DEFAULTS['probes_per_host']})")
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    ap.add_argument("--first-round", type=int, default=FIRST_ROUND,
                    help=f"number of the first round (default {FIRST_ROUND}); probes are drawn from the "
                         "secret, round and host, so another first round is another sample of probes")
    ap.add_argument("--concurrency", type=int, default=8, help="probes in flight at once (default 8)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per generating or scoring thread, 0 for torch's own (default 1: several models "
                         "generate at once, and more threads only oversubscribe 2 cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where detection.json/.md/.png go (default benchmarks/results)")
    ap.add_argument("--db", type=Path, help="keep the daemon's SQLite database here (default: a temporary file)")
    ap.add_argument("--from-json", type=Path, metavar="JSON",
                    help="no run: write detection.md and detection.png again from a detection.json")
    args = ap.parse_args()
    if args.from_json:
        write_outputs(json.loads(args.from_json.read_text()), args.out)
        return
    preset = QUICK if args.quick else DEFAULTS
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    if min(size.values()) < 1:
        ap.error("--rounds, --replicas, --honest-replicas and --probes-per-host must be at least 1")

    import torch

    from validator.reputation import ReputationConfig

    if args.threads:
        torch.set_num_threads(args.threads)

    validator = validator_settings(size["probes_per_host"], args.concurrency)
    reputation = ReputationConfig.from_dict(validator["reputation"])
    hosts = network_hosts(size["replicas"], size["honest_replicas"])
    with tempfile.TemporaryDirectory(prefix="detection-") as tmp:
        db = (args.db or Path(tmp) / "detection.db").resolve()
        wall = run_network(Path(tmp), db, hosts, size["rounds"], validator, args.first_round)
        t0 = time.perf_counter()
        results, rounds = per_host(db, hosts, reputation)
    cheats, engines, curves = summarise(results)
    argv = " ".join(sys.argv[1:])
    result = {
        "command": "python benchmarks/detection.py" + (f" {argv}" if argv else ""),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                   f"Python {platform.python_version()}",
        "config": {**size, "first_round": args.first_round, "quick": args.quick, "threads": args.threads, "model": MODEL, "trust_after": reputation.trust_after,
                   "alpha": reputation.alpha, "validator": validator,
                   "network": [{k: v for k, v in h.items() if k != "group"} for h in hosts]},
        "rounds": rounds,
        "runtime_s": {"total": round(wall, 1), "analysis": round(time.perf_counter() - t0, 2)},
        # The minimum contract: per host, keyed by host name.
        "cheats": {n: {"strategy": h["group"], "detected": h["flagged"],
                       "probes_to_detection": h["probes_to_detection"], "probes": h["probes"]}
                   for n, h in results.items() if not h["honest"]},
        "honest": {n: {"engine": h["group"], "false_alarms": int(h["flagged"]), "probes": h["probes"],
                       "failed_answers": h["verdicts"]["fail"]}
                   for n, h in results.items() if h["honest"]},
        "cheat_strategies": cheats,
        "honest_engines": engines,
        "roc": curves,
        "hosts": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detection.json").write_text(json.dumps(result, indent=1) + "\n")
    write_outputs(result, args.out)


def write_outputs(result: dict, out: Path) -> None:
    """detection.md and detection.png from the results; prints the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection.md").write_text(markdown(result))
    plot(result["roc"], result["hosts"], out / "detection.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
