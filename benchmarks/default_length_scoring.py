"""What answers of the default length cost the scorer, against the short answers the other
speed benchmarks use, in one process (one model load, the same machine load).

  default   benchmarks/results/audit_records_default_mix.jsonl: 8 prompts of the general
            bank, each asked greedily and sampled with the `default` mix (max_tokens up to
            512), answered by the honest llama.cpp host
            (make_records.py --prompts 8 --first 0 --hosts honest-llama.cpp --mix default
            --max-tokens 512)
  short     every 10th record of benchmarks/results/audit_records.jsonl (the `calibration`
            mix, max_tokens 48-96), as scoring_speed.py --quick takes them

Each set is scored by the real audit path (`run_audit`, no re-run) after a one-answer
warm-up, twice, alternating, so that a change in load falls on both; the faster pass of
each counts. Tokens are the aligned tokens of each answer (metrics["tokens"]).
Answers per hour = answers / wall time: the capacity of one scorer on this machine.

    python benchmarks/default_length_scoring.py   (about 5 minutes on 2 busy cores)

Writes benchmarks/results/default_length_scoring.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from validator.models.registry import Registry  # noqa: E402
from validator.scoring.reference import ReferenceModel  # noqa: E402
from validator.service.audit import run_audit  # noqa: E402
from validator.service.scorer import Scorer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETS = {"default": (RESULTS / "audit_records_default_mix.jsonl", 1),
        "short": (RESULTS / "audit_records.jsonl", 10)}


def main() -> None:
    torch.set_num_threads(2)
    registry = Registry.load()
    ref = ReferenceModel.load(registry.get("smollm2-135m"))
    scorer = Scorer(registry, models={"smollm2-135m": ref})
    lines = {name: [l for l in path.read_text().splitlines() if l.strip()][::every]
             for name, (path, every) in SETS.items()}
    for name in SETS:
        run_audit(lines[name][:1], scorer, rerun=False)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(2):
        for name in SETS:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            out, _ = run_audit(lines[name], scorer, rerun=False)
            wall = time.perf_counter() - t0
            tokens = [o.get("metrics", {}).get("tokens", 0) for o in out]
            run = {"answers": len(out), "wall_s": round(wall, 2), "tokens": sum(tokens),
                   "tokens_per_answer": round(sum(tokens) / len(out), 1), "longest_answer_tokens": max(tokens),
                   "max_tokens_asked": sorted({json.loads(l)["configs"]["max_tokens"] for l in lines[name]}),
                   "tokens_per_s": round(sum(tokens) / wall, 1), "answers_per_hour": round(3600 * len(out) / wall),
                   "verdicts": {v: sum(o["verdict"] == v for o in out) for v in {o["verdict"] for o in out}},
                   "load_1min_before": round(load, 2)}
            if name not in best or run["wall_s"] < best[name]["wall_s"]:
                best[name] = run
            print(name, json.dumps(run), file=sys.stderr)
    result = {"benchmark": "default_length_scoring", "command": "python benchmarks/default_length_scoring.py",
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
              "torch_threads": 2, "model": "smollm2-135m (float32, cpu)", "sets": best,
              "default_vs_short_answers_per_hour": round(best["default"]["answers_per_hour"]
                                                         / best["short"]["answers_per_hour"], 3),
              "default_vs_short_tokens_per_s": round(best["default"]["tokens_per_s"] / best["short"]["tokens_per_s"], 3)}
    out = RESULTS / "default_length_scoring.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
