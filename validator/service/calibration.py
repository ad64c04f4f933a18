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
import re
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import stats

from validator.scoring.align import AlignItem, Aligner
from validator.network.catalogue import OfflineNetwork
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix
from validator.scoring.reference import ReferenceModel
from validator.models.registry import ModelSpec, Registry
from validator.models.sampling import Settings
from validator.scoring.verdict import EDGE_GAPS, Tolerances, VerdictRule, score_answer

SAFETY = 2.0
CONFIDENCE = 0.95  # of every upper bound on an honest rate (the rule of three's)
FLOORS = {"greedy_gap": 0.5, "support_gap": 0.5, "eos_gap": 1.0}
SEED = 20261127


TRANSFORMERS_ENGINE = re.compile(r"^transformers-(float32|bfloat16|float16)(-eager)?(?:-batch([1-9][0-9]*))?$")


def honest_hosts(name: str) -> dict[str, dict]:
    """The honest host configurations (simulator strategies) behind an engine name:
    transformers-DTYPE[-eager][-batchN] (SDPA attention and batches of up to 32 unless
    named), or llama.cpp with its whitespace-stripped twin."""
    m = TRANSFORMERS_ENGINE.match(name)
    if m:
        dtype, eager, batch = m.groups()
        return {name: {"strategy": "honest-transformers", "dtype": dtype,
                       **({"attention": "eager"} if eager else {}),
                       **({"batch": int(batch)} if batch and int(batch) != 32 else {})}}
    if name == "llama.cpp":
        return {name: {"strategy": "honest-llama.cpp"},
                "llama.cpp-stripped": {"strategy": "honest-llama.cpp", "strip": "either"}}
    raise ValueError(f"unknown engine {name!r} (transformers-DTYPE[-eager][-batchN], DTYPE float32, "
                     "bfloat16 or float16, or llama.cpp)")


def check_engines(spec: ModelSpec, engine_names: list[str]) -> None:
    for name in engine_names:
        honest_hosts(name)
        if name == "llama.cpp" and not spec.is_gguf:
            raise ValueError(f"llama.cpp runs a GGUF file and model {spec.name!r} is a "
                             f"{next(iter(spec.checkpoint))} checkpoint: leave llama.cpp out of --engines")


def default_engines(spec: ModelSpec) -> list[str]:
    """What `validator calibrate` runs unless told: transformers in float32 and bfloat16
    (SDPA, batches of up to 32), float32 with eager attention, float32 in batches of 8
    and one request at a time (no padding), and llama.cpp where a GGUF exists (a hub or
    directory checkpoint has none). Gemma-3 270M on a busy 2-core CPU: 33 minutes of answering for 20 probes
    (`--limit 10`), 78 minutes for 60 (`--limit 30`), hours for the whole bank (docs/production.md, "Calibration")."""
    return (["transformers-float32", "transformers-bfloat16", "transformers-float32-eager",
             "transformers-float32-batch8", "transformers-float32-batch1"]
            + (["llama.cpp"] if spec.is_gguf else []))


def all_engines(spec: ModelSpec) -> list[str]:
    """`--engines all`: every dtype (float16 too), eager attention and batches of 1 and 8
    besides 32 for float32 and bfloat16, and llama.cpp where a GGUF exists."""
    return ([f"transformers-{d}" for d in ("float32", "bfloat16", "float16")]
            + [f"transformers-{d}{v}" for d in ("float32", "bfloat16") for v in ("-eager", "-batch8", "-batch1")]
            + (["llama.cpp"] if spec.is_gguf else []))


def engine_names(spec: ModelSpec, given: str | None) -> list[str]:
    """The engines of a `--engines` option: comma separated names, `all`, or (None) the defaults."""
    if not given:
        return default_engines(spec)
    if given.strip() == "all":
        return all_engines(spec)
    return [e.strip() for e in given.split(",") if e.strip()]


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
    out: dict[str, list] = {"greedy_gap": [], "support_gap": [], "eos_gap": [],
                            "sampled_p": [], "greedy_tokens": [0], "sampled_tokens": [0],
                            "early_stops": [0], "statistic": [], "edge": [], "argmax": []}
    for al, s in zip(alignments, settings):
        f, n = al.feats, len(al.tokens)
        score = score_answer(al, s, ref.table, tol)
        pooled = score.metrics["pooled"]
        if s.greedy:
            out["greedy_gap"] += [float(g) for g in f.max_logp[:n] - al.token_logp]
            out["greedy_tokens"][0] += n
            out["argmax"].append([pooled["tokens"], pooled["off_argmax"]])
        else:
            edge = f.boundary[:n].min(axis=1)
            out["support_gap"] += [float(g) for g in np.maximum(edge - al.token_logp, 0.0)]
            out["sampled_tokens"][0] += n
            out["sampled_p"].append(score.metrics["components"]["statistic"])
            out["statistic"].append([pooled["tokens"], *pooled["s"], *pooled["var"], *pooled["sd"]])
            out["edge"].append([f"{s.temperature:g}/{s.top_k}/{s.top_p:g}",
                                pooled["edge"]["tokens"], *pooled["edge"]["beyond"]])
        if not s.length_stop(n):
            out["early_stops"][0] += 1
            final = f.max_logp[n] if s.greedy else f.boundary[n].min()
            out["eos_gap"].append(max(0.0, float(final - al.eos_logp)))
    return out


def calibrate(spec: ModelSpec, prompts_path: str | Path, engine_names: list[str], *, limit: int = 0,
              answers: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """answers: a JSONL file of honest answers. The answers of every engine it holds are
    used (and the file's engines are what the result's command names); engines asked
    for that it lacks are answered and added to it."""
    check_engines(spec, engine_names)
    ref = ReferenceModel.load(spec)
    records: dict[str, list[dict]] = {}
    if answers and answers.exists():
        for line in answers.read_text().splitlines():
            r = json.loads(line)
            records.setdefault(r["host"], []).append(r)
        log(f"reusing {sum(map(len, records.values()))} honest answers of {', '.join(records)} from {answers}")
    missing = [name for name in engine_names if not set(honest_hosts(name)) <= set(records)]
    broken: dict[str, str] = {}
    for name in missing:  # each engine's answers saved as soon as it is done: a stopped run resumes
        new, failed = _answer(spec, prompts_path, [name], limit, log)
        records.update(new)
        broken.update(failed)
        if answers and new:
            answers.parent.mkdir(parents=True, exist_ok=True)
            with answers.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for recs in new.values() for r in recs))
    for name, recs in list(records.items()):
        if not any(r["response"].strip() for r in recs):
            # An engine that answers nothing (float16 overflowing on a model trained in
            # bfloat16) is broken, not honest: its stops would set the tolerances.
            broken[name] = f"all {len(recs)} answers are empty"
            log(f"leaving {name} out: {broken[name]}")
            del records[name]
    if not records:
        raise ValueError(f"no engine gave an answer to calibrate {spec.name} with ({', '.join(broken)} answered nothing)")
    base = Tolerances()
    per_engine: dict[str, dict] = {}
    measured: dict[str, dict] = {}
    pooled: dict[str, list] = {}
    for name, recs in records.items():
        log(f"scoring {len(recs)} answers of {name} ...")
        m = measured[name] = measure(ref, recs, base)
        per_engine[name] = _describe(m)
        for k, v in m.items():
            if k not in ("statistic", "edge", "argmax"):  # per answer, read per engine (_pooled)
                pooled[k] = pooled.get(k, []) + v
    for k in ("greedy_tokens", "sampled_tokens", "early_stops"):
        pooled[k] = [sum(pooled[k])]
    tol = {
        key: round(max(FLOORS[key], SAFETY * float(max(pooled[key]) if pooled[key] else 0.0)), 4)
        for key in ("greedy_gap", "support_gap", "eos_gap")
    }
    tol["token_rate"] = 3.0 / max(pooled["greedy_tokens"][0], 3)
    tol["support_rate"] = 3.0 / max(pooled["sampled_tokens"][0], 3)
    n_answers = sum(len(r) for r in records.values())
    tol["eos_rate"] = early_stop_violation_rate(pooled["early_stops"][0], n_answers)
    host_level = {name: _pooled(m) for name, m in measured.items()}
    for name, described in host_level.items():
        per_engine[name]["pooled"] = described
    tol.update(pooled_tolerances(host_level, pooled["sampled_tokens"][0], pooled["greedy_tokens"][0]))
    used = [name for name in (*records, *broken) if _is_engine(name)]
    # What reproduces the file: its answers may have been saved by an earlier command.
    answered = len({json.dumps(r["messages"]) for recs in records.values() for r in recs})
    shortened = answered < len(load_bank(prompts_path))
    return {
        "model": spec.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"validator calibrate --model {spec.name} --prompts {prompts_path} "
                   f"--engines {','.join(used)}" + (f" --limit {answered}" if shortened else ""),
        "summary": f"{n_answers} honest answers, engines {', '.join(records)}",
        "rule": f"tolerance = max(floor {FLOORS}, {SAFETY} x largest honest value); "
                "rate = 3 / honest observations (rule of three); eos_rate = the smaller of that "
                f"per early stop and the {CONFIDENCE:.0%} upper bound on early stops per answer; "
                f"statistic_slack = max({SAFETY} x |mean of the statistic per unit of its steps' standard "
                "deviations|, 2 standard errors) in the order that fits each engine, the largest; edge_rate (per gap "
                f"{list(EDGE_GAPS)}), argmax_rate = {SAFETY} x the largest honest share (edge: per engine and "
                "settings), at least the rule of three",
        "tolerances": tol,
        "observed": _describe(pooled),
        "engines": per_engine,
        **({"left_out": broken} if broken else {}),
        "verdict_rule": VerdictRule().__dict__,
    }


def early_stop_violation_rate(early_stops: int, answers: int) -> float:
    """Upper bound on how often an honest answer ends early where the reference does not.
    No honest early stop violated the tolerance (it is set above them), so per early stop
    the rule of three bounds the rate by 3 / early stops; and an answer can only violate
    it by stopping early, so the rate per answer is also at most the rate of early stops,
    bounded (Clopper-Pearson) from the answers. The smaller bound holds; a model whose
    honest answers never stop early (a base model) gets about 3 / answers, not 1."""
    per_stop = 3.0 / max(early_stops, 3)
    if answers <= early_stops:
        return per_stop
    per_answer = float(stats.beta.ppf(CONFIDENCE, early_stops + 1, answers - early_stops))
    return min(per_stop, per_answer)


def _pooled(m: dict) -> dict:
    """One engine's host-level (pooled) measures: the log-prob statistic's mean per token
    and per unit of its steps' standard deviations (with its standard error) in each
    sampler order, its share of sampled tokens beyond the
    support's edge per settings (by more than each of EDGE_GAPS), its share of greedy tokens
    off the reference's argmax."""
    out: dict = {}
    if m["statistic"]:
        # per answer: tokens, then per order S, its variance, its steps' standard deviations summed
        a = np.array(m["statistic"], dtype=float)
        n, sd = a[:, 0].sum(), a[:, 5:7].sum(0)
        if n > 0 and (sd > 0).all():
            out["statistic_per_token"] = [round(float(v), 5) for v in a[:, 1:3].sum(0) / n]
            out["statistic_per_sd"] = [round(float(v), 5) for v in a[:, 1:3].sum(0) / sd]
            out["statistic_per_sd_se"] = [round(float(v), 5) for v in np.sqrt(a[:, 3:5].sum(0)) / sd]
            out["statistic_tokens"] = int(n)
    edge: dict[str, np.ndarray] = {}
    for key, *counts in m["edge"]:  # tokens, then beyond the edge by more than each gap
        edge[key] = edge.get(key, np.zeros(1 + len(EDGE_GAPS), dtype=int)) + np.asarray(counts, dtype=int)
    if edge:
        out["edge"] = {k: {"tokens": int(v[0]), "beyond": [int(b) for b in v[1:]]} for k, v in edge.items()}
    if m["argmax"]:
        tokens, off = (int(v) for v in np.array(m["argmax"]).sum(0))
        out["greedy_off_argmax"] = {"tokens": tokens, "off": off}
    return out


def pooled_tolerances(engines: dict[str, dict], sampled_tokens: int, greedy_tokens: int) -> dict[str, float]:
    """The pooled evidence's tolerances (validator.reputation) from the engines' `_pooled`
    measures. statistic_slack: the statistic's honest bias per unit of standard deviation
    (numeric noise moves a step's X in proportion to its spread; a step that keeps one
    token has none): per engine in the order that fits it (the smaller |mean|: the
    per-answer minimum over the orders picks it), SAFETY x that mean, never below two
    standard errors (a smaller bias than that is not resolved by the calibration); the
    largest over the engines. edge_rate, per gap of EDGE_GAPS: SAFETY x the largest share
    beyond the edge by more than that gap of any engine at any settings (tokens beyond it
    cluster at narrow top-p, and most lie just beyond it). argmax_rate (reported
    only): SAFETY x the largest share of greedy tokens off the argmax. Each rate at least
    3 / tokens (the rule of three)."""
    out: dict[str, float] = {}
    bias = []
    for e in engines.values():
        if "statistic_per_sd" in e:
            o = int(np.argmin(np.abs(e["statistic_per_sd"])))
            bias.append(max(SAFETY * abs(e["statistic_per_sd"][o]), 2 * e["statistic_per_sd_se"][o]))
    if bias:
        out["statistic_slack"] = round(max(bias), 4)
    shares = np.array([np.asarray(g["beyond"], dtype=float) / g["tokens"] for e in engines.values()
                       for g in e.get("edge", {}).values() if g["tokens"]]).reshape(-1, len(EDGE_GAPS))
    if sampled_tokens:
        largest = shares.max(axis=0) if len(shares) else np.zeros(len(EDGE_GAPS))
        out["edge_rate"] = [round(float(min(0.5, max(3.0 / sampled_tokens, SAFETY * v))), 6) for v in largest]
    off = [e["greedy_off_argmax"]["off"] / e["greedy_off_argmax"]["tokens"] for e in engines.values()
           if e.get("greedy_off_argmax", {}).get("tokens")]
    if greedy_tokens:
        out["argmax_rate"] = round(min(0.5, max(3.0 / greedy_tokens, SAFETY * max(off, default=0.0))), 6)
    return out


def _is_engine(host: str) -> bool:
    """Whether a calibration host is an engine's own (not llama.cpp's stripped twin)."""
    try:
        return host in honest_hosts(host)
    except ValueError:
        return False


def _answer(spec: ModelSpec, prompts_path, engine_names: list[str], limit: int,
            log: Callable[[str], None]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """The honest hosts' records per host, and the engines that failed (name -> why)."""
    prompts = load_bank(prompts_path)[: limit or None]
    probes = greedy_and_sampled(prompts, load_mix("calibration"), SEED)
    records: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    for name in engine_names:
        hosts = honest_hosts(name)
        # One engine in memory at a time: each may be a large model.
        network = OfflineNetwork.of(hosts, spec.name, Registry({spec.name: spec}), shared_engines=False)
        try:
            for host in hosts:
                log(f"answering {len(probes)} probes with {host} ...")
                records[host] = network.records(host, probes)
        except RuntimeError as exc:  # e.g. float16 logits overflowing to inf/nan while sampling
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log(f"leaving {name} out: {failed[name]}")
            for host in hosts:
                records.pop(host, None)
        finally:
            network.close()
    return records, failed


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
