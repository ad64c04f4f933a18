"""Greedy answers and precision: does the share of greedy tokens off the reference's argmax
tell a lower-precision host (FP8 weights) from the honest engines?

    python benchmarks/greedy_precision.py                 # 80 greedy probes per host
    python benchmarks/greedy_precision.py --probes 20     # a quick look

Hosts (validator/network/simulator.py), each answering the same greedy probes (the
general prompt bank, max_tokens 48): honest transformers float32 (the reference's own
weights and precision, batched), honest transformers bfloat16, honest llama.cpp (the
GGUF), `fp8-weights` (the weights rounded to float8 e4m3 with a scale per row, the
arithmetic in float32) and `requantised` (4-bit groups of 32, a cheat the answers'
evidence catches), for scale.

Every answer is scored as `validator audit` scores it (no re-run). Per host: failed
answers, the audit's host verdict, greedy tokens, the share off the reference's argmax
(with a 95% Clopper-Pearson interval), the mean gap of those tokens (nats below the
reference's best), and log R of the binomial e-process of the off-argmax count against
the calibrated `argmax_rate` (the pooled statistic for greedy answers; reported by the
reputation, not used as evidence). Writes results/greedy_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
HOSTS = {
    "honest-transformers-fp32": {"strategy": "honest-transformers", "dtype": "float32"},
    "honest-transformers-bf16": {"strategy": "honest-transformers", "dtype": "bfloat16"},
    "honest-llama.cpp": {"strategy": "honest-llama.cpp"},
    "fp8-weights": {"strategy": "fp8-weights"},
    "requantised-q4": {"strategy": "requantised"},
}


def measure(lines: list[dict], rate: float) -> dict:
    import numpy as np
    from scipy import stats

    from validator.reputation import RATE_MULTIPLES

    tokens = sum(line["metrics"]["pooled"]["tokens"] for line in lines)
    off = sum(line["metrics"]["pooled"]["off_argmax"] for line in lines)
    gap = sum(line["metrics"]["pooled"]["gap_sum"] for line in lines)
    low = float(stats.beta.ppf(0.025, off, tokens - off + 1)) if off else 0.0
    high = float(stats.beta.ppf(0.975, off + 1, tokens - off))
    r = np.minimum(RATE_MULTIPLES * rate, 0.9)
    log_e = off * np.log(r / rate) + (tokens - off) * (np.log1p(-r) - np.log1p(-rate))
    return {"answers": len(lines), "failed": sum(line["verdict"] == "fail" for line in lines),
            "greedy_tokens": tokens, "off_argmax": off, "off_argmax_share": round(off / tokens, 5),
            "share_95": [round(low, 5), round(high, 5)],
            "mean_gap_off_argmax": round(gap / off, 4) if off else None,
            "log_r_against_argmax_rate": round(float(np.logaddexp.reduce(log_e) - np.log(len(r))), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "greedy_precision.json")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from validator.models.registry import Registry
    from validator.models.sampling import Settings
    from validator.network.catalogue import OfflineNetwork
    from validator.probing.probes import load_bank
    from validator.service.audit import run_audit
    from validator.service.scorer import Scorer

    registry = Registry.load()
    scorer = Scorer(registry)
    rate = scorer.auditor(MODEL).tol.argmax_rate
    bank = load_bank("configs/prompts/general.yaml")[: args.probes]
    probes = [(p, Settings(temperature=0.0, max_tokens=args.max_tokens)) for p in bank]
    started = time.time()
    result = {"command": "python benchmarks/greedy_precision.py " + " ".join(sys.argv[1:]),
              "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "model": MODEL, "probes": len(probes), "max_tokens": args.max_tokens, "argmax_rate": rate,
              "hosts": {}}
    for host, config in HOSTS.items():
        network = OfflineNetwork.of({host: config}, MODEL, registry, shared_engines=False)
        t0 = time.time()
        records = network.records(host, probes)
        network.close()
        lines, verdicts = run_audit((json.dumps(r) for r in records), scorer, rerun=False)
        result["hosts"][host] = {**measure(lines, rate), "host_verdict": verdicts[host]["verdict"],
                                 "seconds": round(time.time() - t0, 1)}
        print(host, json.dumps(result["hosts"][host]), flush=True)
    result["runtime_s"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
