"""`validator calibrate`: tolerances from honest engines, never from cheaters.

Honest answers come from the simulator's honest hosts (validator.network.catalogue, run
offline), one per engine named (transformers in float32 and bfloat16, llama.cpp on the
GGUF, and llama.cpp behind an API that strips the whitespace around an answer: both
ends or the leading one). Each is aligned and scored, and we record how far honest
tokens fall:
- greedy tokens: gap below the reference's best;
- sampled tokens: distance below the edge of the top-k/top-p support;
- early stops: end of sequence below the best (greedy) or below the support edge.
Rule (docs/methodology.md): a tolerance is SAFETY times the largest honest value
seen, never below a floor; the honest violation rate at that tolerance is bounded by
the rule of three, 3 / (number of honest observations), since none were seen.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Callable

import numpy as np

from validator.scoring.align import AlignItem, Aligner
from validator.network.catalogue import OfflineNetwork
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix
from validator.scoring.reference import ReferenceModel
from validator.models.registry import ModelSpec, Registry
from validator.models.sampling import Settings
from validator.scoring.verdict import Tolerances, VerdictRule, score_answer

SAFETY = 2.0
FLOORS = {"greedy_gap": 0.5, "support_gap": 0.5, "eos_gap": 1.0}
SEED = 20261127


def honest_hosts(name: str) -> dict[str, dict]:
    """The honest host configurations (simulator strategies) behind an engine name:
    transformers-DTYPE, or llama.cpp with its whitespace-stripped twin."""
    if name.startswith("transformers-"):
        return {name: {"strategy": "honest-transformers", "dtype": name.split("-", 1)[1]}}
    if name == "llama.cpp":
        return {name: {"strategy": "honest-llama.cpp"},
                "llama.cpp-stripped": {"strategy": "honest-llama.cpp", "strip": "either"}}
    raise ValueError(f"unknown engine {name!r} (transformers-DTYPE or llama.cpp)")


def check_engines(spec: ModelSpec, engine_names: list[str]) -> None:
    for name in engine_names:
        honest_hosts(name)
        if name == "llama.cpp" and not spec.is_gguf:
            raise ValueError(f"llama.cpp runs a GGUF file and model {spec.name!r} is a "
                             f"{next(iter(spec.checkpoint))} checkpoint: leave llama.cpp out of --engines")


def default_engines(spec: ModelSpec) -> list[str]:
    """What honest hosts run for this checkpoint: transformers in float32 and bfloat16,
    and llama.cpp where a GGUF exists (a hub or directory checkpoint has none)."""
    return ["transformers-float32", "transformers-bfloat16"] + (["llama.cpp"] if spec.is_gguf else [])


def measure(ref: ReferenceModel, records: list[dict], tol: Tolerances) -> dict[str, list[float]]:
    """Honest deviations of every kind, over a list of audit records. A record whose
    conversation the reference's chat template refuses is left out (it is never sent
    as a probe either)."""
    prompts = []
    for r in records:
        try:
            prompts.append(ref.prompt_ids(r["messages"]))
        except Exception:  # noqa: BLE001 - a template (Jinja) may raise anything
            prompts.append(None)
    records = [r for r, p in zip(records, prompts) if p is not None]
    prompts = [p for p in prompts if p is not None]
    settings = [Settings.from_configs(r["configs"]) for r in records]
    alignments = Aligner(ref).align([
        AlignItem(prompt, r["response"], s, support_tolerance=tol.support_gap)
        for prompt, r, s in zip(prompts, records, settings)])
    out: dict[str, list[float]] = {"greedy_gap": [], "support_gap": [], "eos_gap": [],
                                   "sampled_p": [], "greedy_tokens": [0], "sampled_tokens": [0],
                                   "early_stops": [0]}
    for al, s in zip(alignments, settings):
        f, n = al.feats, len(al.tokens)
        if s.greedy:
            out["greedy_gap"] += [float(g) for g in f.max_logp[:n] - al.token_logp]
            out["greedy_tokens"][0] += n
        else:
            edge = f.boundary[:n].min(axis=1)
            out["support_gap"] += [float(g) for g in np.maximum(edge - al.token_logp, 0.0)]
            out["sampled_tokens"][0] += n
            out["sampled_p"].append(score_answer(al, s, ref.table, tol).metrics["components"]["statistic"])
        if not s.length_stop(n):
            out["early_stops"][0] += 1
            final = f.max_logp[n] if s.greedy else f.boundary[n].min()
            out["eos_gap"].append(max(0.0, float(final - al.eos_logp)))
    return out


def calibrate(spec: ModelSpec, prompts_path: str | Path, engine_names: list[str], *, limit: int = 0,
              answers: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """answers: a JSONL file of honest answers; reused when it exists, written when not."""
    check_engines(spec, engine_names)
    ref = ReferenceModel.load(spec)
    if answers and answers.exists():
        records: dict[str, list[dict]] = {}
        for line in answers.read_text().splitlines():
            r = json.loads(line)
            records.setdefault(r["host"], []).append(r)
        log(f"reusing {sum(map(len, records.values()))} honest answers from {answers}")
    else:
        records = _answer(spec, prompts_path, engine_names, limit, log)
        if answers:
            answers.parent.mkdir(parents=True, exist_ok=True)
            answers.write_text("".join(json.dumps(r) + "\n" for recs in records.values() for r in recs))
    base = Tolerances()
    per_engine: dict[str, dict] = {}
    pooled: dict[str, list[float]] = {}
    for name, recs in records.items():
        log(f"scoring {len(recs)} answers of {name} ...")
        m = measure(ref, recs, base)
        per_engine[name] = _describe(m)
        for k, v in m.items():
            pooled[k] = pooled.get(k, []) + v
    for k in ("greedy_tokens", "sampled_tokens", "early_stops"):
        pooled[k] = [sum(pooled[k])]
    tol = {
        key: round(max(FLOORS[key], SAFETY * float(max(pooled[key]) if pooled[key] else 0.0)), 4)
        for key in ("greedy_gap", "support_gap", "eos_gap")
    }
    tol["token_rate"] = 3.0 / max(pooled["greedy_tokens"][0], 3)
    tol["support_rate"] = 3.0 / max(pooled["sampled_tokens"][0], 3)
    tol["eos_rate"] = 3.0 / max(pooled["early_stops"][0], 3)
    n_answers = sum(len(r) for r in records.values())
    return {
        "model": spec.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"validator calibrate --model {spec.name} --prompts {prompts_path} "
                   f"--engines {','.join(engine_names)}" + (f" --limit {limit}" if limit else ""),
        "summary": f"{n_answers} honest answers, engines {', '.join(records)}",
        "rule": f"tolerance = max(floor {FLOORS}, {SAFETY} x largest honest value); "
                "rate = 3 / honest observations (rule of three)",
        "tolerances": tol,
        "observed": _describe(pooled),
        "engines": per_engine,
        "verdict_rule": VerdictRule().__dict__,
    }


def _answer(spec: ModelSpec, prompts_path, engine_names: list[str], limit: int,
            log: Callable[[str], None]) -> dict[str, list[dict]]:
    prompts = load_bank(prompts_path)[: limit or None]
    probes = greedy_and_sampled(prompts, load_mix("calibration"), SEED)
    records: dict[str, list[dict]] = {}
    for name in engine_names:
        hosts = honest_hosts(name)
        # One engine in memory at a time: each may be a large model.
        network = OfflineNetwork.of(hosts, spec.name, Registry({spec.name: spec}), shared_engines=False)
        for host in hosts:
            log(f"answering {len(probes)} probes with {host} ...")
            records[host] = network.records(host, probes)
        network.close()
    return records


def _describe(m: dict[str, list[float]]) -> dict:
    out = {"greedy_tokens": m["greedy_tokens"][0], "sampled_tokens": m["sampled_tokens"][0],
           "early_stops": m["early_stops"][0]}
    for key in ("greedy_gap", "support_gap", "eos_gap"):
        v = np.array(m[key]) if m[key] else np.zeros(1)
        out[key] = {"max": round(float(v.max()), 4), "p99": round(float(np.quantile(v, 0.99)), 4),
                    "p90": round(float(np.quantile(v, 0.9)), 4), "share_zero": round(float((v < 1e-6).mean()), 4)}
    if m["sampled_p"]:
        out["sampled_statistic_min_p"] = float(min(m["sampled_p"]))
    return out
