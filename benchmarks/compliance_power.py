"""Compliance power: how many sampled probes it takes to flag a host that bends the
requested sampling settings a little, and that honest engines are never flagged.

    python benchmarks/compliance_power.py                     # the full run (see README)
    python benchmarks/compliance_power.py --reduced           # what fits 2 shared CPU cores
    python benchmarks/compliance_power.py --from-json benchmarks/results/compliance_power.json

Hosts (validator.network: the simulator's strategies, run offline with their engine
calls batched; the deviations are validator/network/deviations.py):
- honest: transformers float32 (its generate() batched 32 requests at a time, left
  padded: the "batched transformers" host), transformers bfloat16, llama.cpp on the GGUF;
- deviations, each at several sizes, `--hosts` independent hosts each (different prompt
  orders and seeds): temperature offsets both ways, top-p widened, top-k ignored, top-k
  and top-p ignored at the asked temperature, a clamped temperature.
Every host answers sampled probes at one sampling setting per run block (the API's
default and others where top-k binds), prompts from the general bank.

The daemon's path from the answer on: each round's answers are stored (SQLite), scored by
`Service.score_stored` (the daemon's scoring worker: the batch scorer, each score stored
with its pooled record) and the host's reputation refreshed after every batch
(`Service.refresh_reputation`, the same call the daemon makes). What is not the daemon's:
the probes are sent in-process (OfflineNetwork) rather than over HTTP, and each host gets
its probes in rounds of `--round-size`; a host flagged stops being probed.

Per host: probes to detection = the `last_probe` of its `-> flagged` event (the probe at
which its evidence crossed 1/alpha), counted in probes answered; honest hosts: false
alarms (flagged) and failed answers. Writes results/compliance_power.json (every host,
every setting), compliance_power.md (tables) and compliance_power.png (power curves).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
# Sampling settings (name -> configs). "default" is the API's documented default.
SETTINGS = {
    "default": {"temperature": 0.7, "top_k": 50, "top_p": 0.5},
    "t1.0-k40": {"temperature": 1.0, "top_k": 40, "top_p": 1.0},
    "t0.8-k20-p0.95": {"temperature": 0.8, "top_k": 20, "top_p": 0.95},
}
HONEST = {
    "honest-transformers-fp32-batched": {"strategy": "honest-transformers", "dtype": "float32"},
    "honest-transformers-bf16": {"strategy": "honest-transformers", "dtype": "bfloat16"},
    "honest-llama.cpp": {"strategy": "honest-llama.cpp"},
}
# family -> (strategy, option, sizes); the acceptance sizes first.
FAMILIES = {
    "temperature-colder": ("temperature-offset", "offset", [-0.25, -0.4, -0.1]),
    "temperature-hotter": ("temperature-offset", "offset", [0.25, 0.4, 0.1]),
    "top-p-widened": ("top-p-widened", "widen", [0.1, 0.2, 0.05]),
    "top-k-ignored": ("top-k-ignored", "top_k", [0]),
    "filters-ignored": ("filters-ignored", "top_p", [1.0]),
    "temperature-clamped": ("temperature-clamped", "high", [0.5]),
}
ACCEPTANCE = {"temperature-colder": -0.25, "temperature-hotter": 0.25, "top-p-widened": 0.1,
              "top-k-ignored": 0, "filters-ignored": 1.0}


def hosts_for(families: dict, replicas: int, all_sizes: bool) -> dict[str, dict]:
    out = dict(HONEST)
    for family, (strategy, option, sizes) in families.items():
        for size in sizes if all_sizes else sizes[:1]:
            for i in range(1, replicas + 1):
                out[f"{family}={size:g}-{i}"] = {"strategy": strategy, option: size,
                                                 "family": family, "size": size}
    return out


def probes_for(host: str, n: int, bank, configs: dict, max_tokens: int):
    """n sampled probes for `host`: its own prompt order and seeds (independent trials)."""
    from validator.models.sampling import Settings

    rng = random.Random(f"{host}/{json.dumps(configs, sort_keys=True)}")
    order = list(range(len(bank)))
    rng.shuffle(order)
    return [(bank[order[i % len(order)]],
             Settings(**configs, max_tokens=max_tokens, seed=rng.randrange(2**31)))
            for i in range(n)]


def run_setting(name: str, configs: dict, hosts: dict[str, dict], args, registry, scorer) -> dict:
    from validator.network.catalogue import OfflineNetwork
    from validator.probing.client import CallRecord
    from validator.probing.probes import load_bank
    from validator.reputation import ReputationConfig
    from validator.service.operations import Service
    from validator.store import Store, upgrade

    bank = load_bank("configs/prompts/general.yaml")
    strategies = {h: {k: v for k, v in c.items() if k not in ("family", "size")} for h, c in hosts.items()}
    network = OfflineNetwork.of(strategies, MODEL, registry)
    db = Path(tempfile.mkdtemp(prefix="compliance-")) / "store.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    store = Store(url)
    service = Service(store, registry, ReputationConfig(), scorer)
    plan = {h: probes_for(h, args.probes, bank, configs, args.max_tokens) for h in hosts}
    for h in hosts:
        store.add_host(h, f"http://{h}", MODEL)
    active = set(hosts)
    sent = {h: 0 for h in hosts}
    started = time.time()
    for start in range(0, args.probes, args.round_size):
        if not active:
            break
        rnd = start // args.round_size + 1
        for h in sorted(active):
            probes = plan[h][start : start + args.round_size]
            texts = network.answers(h, probes)
            rows = [{"id": f"{h}/{name}/{start + i}", "index": start + i, "prompt_id": p.id,
                     "messages": p.messages, "configs": s.as_configs(), "stream": False}
                    for i, (p, s) in enumerate(probes)]
            store.ensure_probes(rnd, h, rows)
            for row, text in zip(rows, texts):
                store.record_dispatch(row["id"], CallRecord(ok=True, status=200, text=text, ttfb_s=0.1,
                                                            total_s=0.5, bytes=len(text), attempts=1), "bench")
            sent[h] += len(rows)
        while service.score_stored("bench", limit=256, lease_s=3600, rerun=False).scored:
            pass
        for h in list(active):
            if store.get_host(h)["state"] == "flagged":
                active.discard(h)
        print(f"  {name}: {min(start + args.round_size, args.probes)} probes, "
              f"{len(hosts) - len(active)} flagged, {time.time() - started:.0f} s", flush=True)
    out = {}
    for h, c in hosts.items():
        events = [e for e in store.reputation_events(h) if e["state_to"] == "flagged"]
        rows = store.host_scores(h)
        verdicts = [r["score"]["verdict"] for r in rows if r["score"]]
        first = events[-1] if events else None  # newest first
        detection = None
        if first is not None:
            ids = [r["probe"]["id"] for r in reversed(rows)]
            detection = ids.index(first["evidence"]["last_probe"]) + 1
        from validator.service.operations import assess_host

        _, standing, _ = assess_host(store, h, service.reputation)
        out[h] = {"family": c.get("family", "honest"), "size": c.get("size"), "honest": h in HONEST,
                  "probes": sent[h], "flagged": first is not None, "probes_to_detection": detection,
                  "leading_process": first["evidence"].get("leading_process") if first else None,
                  "verdicts": {v: verdicts.count(v) for v in ("pass", "inconclusive", "fail", "error")},
                  "processes": standing.evidence["processes"], "pooled": standing.evidence["pooled"]}
    network.close()
    return out


def summarise(result: dict) -> dict:
    table = {}
    for setting, hosts in result["settings"].items():
        groups: dict[tuple, list] = {}
        for h in hosts.values():
            groups.setdefault((h["family"], h["size"]), []).append(h)
        for (family, size), members in groups.items():
            caught = [m["probes_to_detection"] for m in members if m["flagged"]]
            table.setdefault(setting, {})[f"{family}={size}" if size is not None else family] = {
                "family": family, "size": size, "hosts": len(members), "flagged": len(caught),
                "probes": [m["probes"] for m in members],
                "median": statistics.median(caught) if len(caught) == len(members) else None,
                "worst": max(caught) if len(caught) == len(members) else None,
                "failed_answers": sum(m["verdicts"]["fail"] for m in members),
                "statistic_z": [m["pooled"].get("statistic_z") for m in members],
                "edge_share": [m["pooled"].get("edge_share") for m in members]}
    return table


def markdown(result: dict) -> str:
    lines = [f"# Compliance power ({result['created']})", "", f"`{result['command']}`", "",
             f"{result['config']['probes']} sampled probes per host at most, rounds of "
             f"{result['config']['round_size']}, max_tokens {result['config']['max_tokens']}, "
             f"{result['config']['hosts']} host(s) per deviation size; alpha 1e-4.", ""]
    for setting, rows in result["summary"].items():
        lines += [f"## {setting}: {json.dumps(SETTINGS[setting])}", "",
                  "| host kind | hosts | flagged | median probes | worst probes | failed answers | z (pooled) | beyond edge |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, r in rows.items():
            z = ", ".join(f"{v:+.1f}" for v in r["statistic_z"] if v is not None)
            e = ", ".join(f"{v:.3f}" for v in r["edge_share"] if v is not None)
            lines.append(f"| {key} | {r['hosts']} | {r['flagged']} | {r['median'] if r['median'] is not None else '-'} | "
                         f"{r['worst'] if r['worst'] is not None else 'not all'} | {r['failed_answers']} | {z} | {e} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["summary"])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 5), squeeze=False)
    limit = result["config"]["probes"]
    for ax, setting in zip(axes[0], settings):
        rows = result["summary"][setting]
        for family in FAMILIES:
            pts = sorted((r["size"], r["median"], r["worst"]) for r in rows.values() if r["family"] == family)
            if not pts:
                continue
            xs = list(range(len(pts))) if family in ("top-k-ignored", "filters-ignored", "temperature-clamped") \
                else [abs(p[0]) for p in pts]
            med = [p[1] if p[1] is not None else limit + 5 for p in pts]
            worst = [p[2] if p[2] is not None else limit + 5 for p in pts]
            line = ax.plot(xs, med, marker="o", label=f"{family} (median)")[0]
            ax.plot(xs, worst, marker="x", ls="--", color=line.get_color(), alpha=0.7)
        ax.axhline(40, color="grey", ls=":", lw=1)
        ax.set_title(f"{setting}: {SETTINGS[setting]}")
        ax.set_xlabel("deviation size (|temperature offset|, top-p widening; 0 for on/off deviations)")
        ax.set_ylabel(f"probes to detection (>{limit}: not flagged); dashed: worst host")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=200, help="sampled probes per host at most")
    parser.add_argument("--hosts", type=int, default=3, help="hosts per deviation size")
    parser.add_argument("--round-size", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--all-sizes-in", default="default",
                        help="settings that run every size (the others: the acceptance sizes only)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--reduced", action="store_true",
                        help="40 probes, max_tokens 48: what 2 shared CPU cores allow in about an hour")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        write_outputs(result, args.out)
        return
    if args.reduced:
        args.probes, args.max_tokens = 40, 48
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from validator.models.registry import Registry
    from validator.service.scorer import Scorer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    registry = Registry.load()
    scorer = Scorer(registry)
    families = {f: FAMILIES[f] for f in args.families.split(",")}
    full = set(args.all_sizes_in.split(","))
    started = time.time()
    result = {"command": "python benchmarks/compliance_power.py " + " ".join(sys.argv[1:]),
              "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "config": {"probes": args.probes, "hosts": args.hosts, "round_size": args.round_size,
                         "max_tokens": args.max_tokens, "model": MODEL},
              "settings": {}}
    for name in args.settings.split(","):
        print(f"setting {name}: {SETTINGS[name]}", flush=True)
        hosts = hosts_for(families, args.hosts, name in full)
        result["settings"][name] = run_setting(name, SETTINGS[name], hosts, args, registry, scorer)
        result["runtime_s"] = round(time.time() - started, 1)
        result["summary"] = summarise(result)
        write_outputs(result, args.out)  # after every setting: a partial run is kept
    print(json.dumps({"runtime_s": result["runtime_s"], "summary": result["summary"]}))


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarise(result)
    (out / "compliance_power.json").write_text(json.dumps(result, indent=1))
    (out / "compliance_power.md").write_text(markdown(result))
    plot(result, out / "compliance_power.png")


if __name__ == "__main__":
    main()
