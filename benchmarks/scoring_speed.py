"""Tokens per second of the aligned batched scorer against, in the same run, the three
other ways to put a reference model over the same answers:

  aligned   the real audit path without the re-run: `run_audit(..., rerun=False)` with
            the reference model passed in (parse, prompt, alignment: one batched pass
            plus one per real ambiguity, scoring with the support statistics of sampled
            settings, the per-token metrics);
  generate  (a) re-generating each answer with `ReferenceModel.generate` (batched,
            KV cache, the probe's settings and re-run seed) for exactly as many tokens as
            the answer has: end of sequence is switched off on a shallow copy of the
            reference, so every answer gets its full length;
  naive     (b) a token-by-token aligner: per answer, one forward per token with a KV
            cache (the fair naive version; recomputing prompt + prefix every step would
            only be slower); at each step, of the reference's tokens whose bytes start
            the rest of the text it keeps the one the reference finds likeliest, so each
            choice needs the model's output before the next step can run (a longest-match
            choice would not need the model and could be one batched pass, i.e. path c);
            it reduces each step to the token's log-prob only;
  forward   (c) one plain batched forward pass over prompt + the canonical tokenisation
            of each answer, packed by `ReferenceModel.step_features` under the scorer's
            own batch budget and reduced to the answer's log-probs (greedy reduction, no
            support statistics): the ceiling for any scorer that computes every answer's
            prompt;
  forward_shared_prompts
            (c') the same pass, but each prompt given more than once computed once
            (`ReferenceModel.prefill`) and the answers run from its keys and values, as
            the aligned scorer's first pass does: the ceiling for this scorer.

Tokens, the same for every path: answer tokens scored, that is the aligned token count
of each answer (`metrics["tokens"]` of the aligned scorer, implied whitespace tokens
included); prompt tokens are never counted. A path's tokens per second is the sum of
that count over the answers it handled divided by its wall time. Both baselines (b)
and (c) compute less per step than the scorer (no support statistics), so the ratios
favour them.

Forward passes per scored answer: rows the model's decoder ran for that answer (a row
of a batched pass counts one; a batched generation step counts one for every row of
the batch, finished or not), from a pre-hook on the decoder (`model.model`); for the
aligned path it equals `metrics["alignment"]["forward_passes"]` averaged over answers.
Decoder positions per token: positions the decoder computed (prompts and padding
included) per answer token. The aligned scorer's time is split into the decoder, the
LM head with the reductions (the rest of `ReferenceModel._run_batch` and `prefill`) and
everything else (alignment walk, scoring, parsing).

Input: benchmarks/results/audit_records.jsonl (200 answers to 50 probes, 25 prompts each
asked greedily and sampled, by two honest engines and two cheats, written by real models
with make_records.py), ordered by prompt as `run_audit` orders them, loaded once; the
reference model (SmolLM2-135M, float32; on the GPU when one is present, else the CPU) is
loaded once, outside the timings, and each path is warmed up on one answer first. Torch
runs with `torch.set_num_threads(2)` (`--threads`). The paths take turns on each chunk
of records (the audit's own chunk: 64 answers on a CPU, 256 on a GPU), so a change in a
shared machine's load falls on all of them; the 1-minute load average before each run
is recorded. The default run times the scorer, the forward pass and the re-generation
on every record and the naive aligner on every 4th (it handles one answer at a time, so
its rate does not depend on how many it gets); `--quick` (under a minute on 2 cores) times the scorer and the
forward pass on every tenth record and the re-generation and the naive aligner on 3 of
those; tokens per second need no scaling, as every path's rate is measured on the
answers it ran (but 3 answers make a small generation batch, so --quick overstates
aligned_vs_generate: the default run batches 32, as `generate` does).

    python benchmarks/scoring_speed.py            # all 200 records, about 10 minutes on 2 cores
    python benchmarks/scoring_speed.py --quick    # under a minute

Writes benchmarks/results/scoring_speed.json (--quick: scoring_speed.quick.json), prints
the ratios and ends with one JSON line holding aligned_vs_forward and aligned_vs_generate.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from validator.scoring.batch import parse_line, rerun_seed  # noqa: E402
from validator.service.audit import run_audit  # noqa: E402
from validator.service.scorer import Scorer  # noqa: E402
from validator.scoring.reference import ReferenceModel  # noqa: E402
from validator.models.registry import Registry  # noqa: E402
from validator.models.sampling import Settings  # noqa: E402

MODEL = "smollm2-135m"
RESULTS = ROOT / "benchmarks" / "results"


def sync() -> None:
    """On a GPU, work is queued: a timer must wait for it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class DecoderMeter:
    """Counts the decoder's forward calls, rows and positions, and the time spent in it
    (`model.model`: the transformer without its LM head) and in the scorer's batches
    (`ReferenceModel._run_batch`: decoder, LM head, log-softmax and the reductions; and
    `ReferenceModel.prefill`: the decoder over shared prompts)."""

    def __init__(self, ref: ReferenceModel):
        self.calls = self.rows = self.positions = 0
        self.seconds = self.batch_seconds = 0.0
        self._t0 = 0.0
        ref.model.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        ref.model.model.register_forward_hook(self._post)
        for name in ("_run_batch", "prefill"):  # neither calls the other
            setattr(ref, name, self._timed(getattr(ref, name)))  # on this instance only

    def _timed(self, inner):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            value = inner(*args, **kwargs)
            sync()
            self.batch_seconds += time.perf_counter() - t0
            return value
        return run

    def _pre(self, module, args, kwargs):
        sync()
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.rows += int(ids.shape[0])
        self.positions += int(ids.numel())  # padding included: it is computed all the same
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        sync()
        self.seconds += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.calls = self.rows = self.positions = 0
        self.seconds = self.batch_seconds = 0.0


class Runs:
    """Per path: the runs of its function, chunk by chunk, added up, with the decoder's
    counts and the machine's 1-minute load before each run (the machine may be shared;
    a busy one slows the many small matmuls of token-by-token paths far more than the
    few large ones of batched passes)."""

    KEYS = ("wall_s", "decoder_calls", "decoder_rows", "decoder_positions", "decoder_s", "scorer_batches_s")

    def __init__(self, meter: DecoderMeter):
        self.meter = meter
        self.paths: dict[str, dict] = {}

    def run(self, name: str, fn):
        load = os.getloadavg()[0]
        m = self.meter
        m.reset()
        sync()
        t0 = time.perf_counter()
        value = fn()
        sync()
        got = (time.perf_counter() - t0, m.calls, m.rows, m.positions, m.seconds, m.batch_seconds)
        total = self.paths.setdefault(name, {**dict.fromkeys(self.KEYS, 0), "load_1min": []})
        for key, v in zip(self.KEYS, got):
            total[key] += v
        total["load_1min"].append(round(load, 2))
        return value


# -- the paths ----------------------------------------------------------------------
def aligned(ref: ReferenceModel, registry: Registry, lines: list[str]) -> list[dict]:
    outputs, _ = run_audit(lines, Scorer(registry, models={MODEL: ref}), rerun=False,
                           on_error=lambda m: print(m, file=sys.stderr))
    bad = [o for o in outputs if o["verdict"] == "error"]
    if bad:
        sys.exit(f"records the scorer rejected: {bad[:3]}")
    return outputs


def regenerate(ref: ReferenceModel, jobs: list[tuple], lengths: list[int]) -> list[list[int]]:
    """jobs: (record, prompt ids, settings); each answer re-generated for exactly its
    aligned length (end of sequence off)."""
    forced = copy.copy(ref)
    forced.eos_ids = []
    settings = [dataclasses.replace(s, max_tokens=max(1, n)) for (_, _, s), n in zip(jobs, lengths)]
    seeds = [rerun_seed(r["messages"], s) for r, _, s in jobs]  # the audit's re-run seed
    return forced.generate([p for _, p, _ in jobs], settings, seeds)


@torch.inference_mode()
def naive_align(ref: ReferenceModel, prompt: list[int], text: str) -> tuple[list[int], list[float]]:
    data = text.encode("utf-8", "surrogatepass")
    cache_arg = ref._cache_arg  # `cache` in transformers 5.x, `past_key_values` before
    step = ref.model(input_ids=torch.tensor([prompt], device=ref.device), use_cache=True, logits_to_keep=1)
    pos, tokens, logps = 0, [], []
    while True:
        logp = torch.log_softmax(step.logits[0, -1].float(), dim=-1)
        if pos >= len(data):
            logps.append(float(logp[ref.eos_ids].max()))  # the stop
            return tokens, logps
        cands = ref.table.candidates(data, pos, lead=False, trail=False)
        best = max(cands, key=lambda c: float(logp[c.token]))
        tokens.append(best.token)
        logps.append(float(logp[best.token]))
        pos += best.consumed
        step = ref.model(input_ids=torch.tensor([[best.token]], device=ref.device), use_cache=True,
                         logits_to_keep=1, **{cache_arg: getattr(step, cache_arg)})


def naive(ref: ReferenceModel, jobs: list[tuple]) -> list[int]:
    return [len(naive_align(ref, p, r["response"])[0]) for r, p, _ in jobs]


def plain_forward(ref: ReferenceModel, jobs: list[tuple], share_prompts: bool = False) -> int:
    items = []
    for r, prompt, _ in jobs:
        path = ref.canonical_ids(r["response"])
        items.append((prompt, path, [[t] for t in path] + [ref.eos_ids], Settings(temperature=0.0), 0))
    if share_prompts:  # as the scorer does: each prompt given more than once computed once
        ref.score_paths(items, pasts=ref.prefill([i[0] for i in items]))
    else:
        ref.step_features(items)
    return sum(len(i[1]) for i in items)


# -- the run ------------------------------------------------------------------------
def path_result(run: dict, answers: int, tokens: int, **extra) -> dict:
    return {"answers": answers, "tokens": tokens, "wall_s": round(run["wall_s"], 3),
            "tokens_per_s": round(tokens / run["wall_s"], 1),
            "decoder_calls": run["decoder_calls"],
            "forward_passes_per_answer": round(run["decoder_rows"] / answers, 2),
            "decoder_positions_per_token": round(run["decoder_positions"] / tokens, 2),
            "decoder_s": round(run["decoder_s"], 3),
            "decoder_share": round(run["decoder_s"] / run["wall_s"], 3),
            "scorer_batches_s": round(run["scorer_batches_s"], 3),
            "load_1min_before_each_chunk": run["load_1min"], **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset: under a minute on 2 cores")
    ap.add_argument("--records", type=Path, default=RESULTS / "audit_records.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out_path = args.out or RESULTS / ("scoring_speed.quick.json" if args.quick else "scoring_speed.json")
    torch.set_num_threads(args.threads)

    lines = [line for line in args.records.read_text().splitlines() if line.strip()]
    if args.quick:
        lines = lines[::10]
    registry = Registry.load()
    t0 = time.perf_counter()
    ref = ReferenceModel.load(registry.get(MODEL))
    load_s = time.perf_counter() - t0
    meter = DecoderMeter(ref)
    jobs = []
    for line in lines:
        record = parse_line(line)
        jobs.append((json.loads(line), ref.prompt_ids(record.messages), record.settings))
    # Answers to one prompt side by side, as `run_audit` orders them before chunking (so
    # that a chunk computes each prompt once); every path gets the same chunks.
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][1])
    jobs, lines = [jobs[i] for i in order], [lines[i] for i in order]
    # (a) re-generation runs on every answer (on --quick: 3 of them, spread over the
    # hosts), batched as `generate` batches. (b) the naive aligner handles one answer at a
    # time, so its rate does not depend on which answers it gets: every 4th (--quick: the
    # same 3) keeps the full run to minutes.
    slow_idx = list(range(0, len(jobs), -(-len(jobs) // 3) if args.quick else 1))
    naive_idx = slow_idx if args.quick else list(range(0, len(jobs), 4))
    slow = [jobs[i] for i in slow_idx]
    print(f"{len(lines)} records from {args.records.name}; model loaded in {load_s:.1f} s; "
          f"{args.threads} torch threads", file=sys.stderr)

    # Warm-up on one answer each (kernels, allocator, the tokenizer's caches).
    aligned(ref, registry, lines[:1])
    regenerate(ref, jobs[:1], [4])
    naive(ref, jobs[:1])
    plain_forward(ref, jobs[:1])
    plain_forward(ref, jobs[:2], share_prompts=True)

    # The paths take turns on each chunk of records (the audit's own chunk), so a
    # change in the machine's load falls on all of them.
    runs = Runs(meter)
    outputs: list[dict] = []
    lengths: list[int] = []
    slow_set, naive_set = set(slow_idx), set(naive_idx)
    naive_own = 0  # tokens the naive aligner's own segmentation has
    for start in range(0, len(jobs), ref.align_chunk):
        idx = list(range(start, min(start + ref.align_chunk, len(jobs))))
        outputs += runs.run("aligned", lambda: aligned(ref, registry, [lines[i] for i in idx]))
        lengths = [o["metrics"]["tokens"] for o in outputs]
        runs.run("forward", lambda: plain_forward(ref, [jobs[i] for i in idx]))
        runs.run("forward_shared_prompts", lambda: plain_forward(ref, [jobs[i] for i in idx], share_prompts=True))
        sidx = [i for i in idx if i in slow_set]
        if sidx:
            gen = runs.run("generate", lambda: regenerate(ref, [jobs[i] for i in sidx],
                                                          [lengths[i] for i in sidx]))
            assert [len(t) for t in gen] == [max(1, lengths[i]) for i in sidx]
        nidx = [i for i in idx if i in naive_set]
        if nidx:
            naive_own += sum(runs.run("naive", lambda: naive(ref, [jobs[i] for i in nidx])))
        print(f"records {idx[-1] + 1}/{len(jobs)}: " + ", ".join(
            f"{k} {v['wall_s']:.1f} s" for k, v in runs.paths.items()), file=sys.stderr)

    tokens = sum(lengths)
    slow_tokens = sum(lengths[i] for i in slow_idx)
    naive_tokens = sum(lengths[i] for i in naive_idx)
    passes = [o["metrics"]["alignment"]["forward_passes"] for o in outputs]
    canonical = sum(len(ref.canonical_ids(r["response"])) for r, _, _ in jobs)
    paths = {
        "aligned": path_result(runs.paths["aligned"], len(jobs), tokens,
                               mean_alignment_forward_passes=round(sum(passes) / len(passes), 2),
                               max_alignment_forward_passes=max(passes),
                               answers_with_branches=sum(o["metrics"]["alignment"]["branches"] > 0
                                                         for o in outputs)),
        "generate": path_result(runs.paths["generate"], len(slow), slow_tokens),
        "naive": path_result(runs.paths["naive"], len(naive_idx), naive_tokens, naive_own_tokens=naive_own),
        "forward": path_result(runs.paths["forward"], len(jobs), tokens, canonical_tokens=canonical),
        "forward_shared_prompts": path_result(runs.paths["forward_shared_prompts"], len(jobs), tokens,
                                              canonical_tokens=canonical),
    }
    rate = {k: v["tokens_per_s"] for k, v in paths.items()}
    ratios = {f"aligned_vs_{k}": round(rate["aligned"] / rate[k], 3)
              for k in ("forward", "generate", "naive", "forward_shared_prompts")}
    a, f = runs.paths["aligned"], runs.paths["forward"]
    where = {  # the aligned scorer's wall time, split
        "decoder_s": round(a["decoder_s"], 2),
        "lm_head_and_reductions_s": round(a["scorer_batches_s"] - a["decoder_s"], 2),
        "alignment_walk_scoring_and_parsing_s": round(a["wall_s"] - a["scorer_batches_s"], 2),
        "decoder_positions_vs_forward": round(a["decoder_positions"] / f["decoder_positions"], 2),
        "decoder_s_vs_forward": round(a["decoder_s"] / f["decoder_s"], 2),
        "scorer_batches_s_vs_forward": round(a["scorer_batches_s"] / f["scorer_batches_s"], 2),
    }
    verdicts: dict[str, dict[str, int]] = {}
    for o in outputs:
        verdicts.setdefault(o["host"], {}).setdefault(o["verdict"], 0)
        verdicts[o["host"]][o["verdict"]] += 1
    result = {
        "benchmark": "scoring_speed",
        "command": "python benchmarks/scoring_speed.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
                   + (f", {torch.cuda.get_device_name()}" if ref.device.startswith("cuda") else ""),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "model": f"{MODEL} ({ref.spec.dtype}, {ref.device})", "model_load_s": round(load_s, 1),
        "records_file": str(args.records.relative_to(ROOT) if args.records.is_relative_to(ROOT) else args.records),
        "records": len(jobs), "subset": "every 10th record" if args.quick else "all",
        "generate_records": len(slow), "naive_records": len(naive_idx),
        "tokens_definition": "answer tokens scored: the aligned token count of each answer "
                             "(implied whitespace tokens included, prompt tokens never)",
        "paths": paths, **ratios, "aligned_time": where,
        "acceptance": {"aligned_at_least_half_of_forward": ratios["aligned_vs_forward"] >= 0.5,
                       "aligned_at_least_10x_generate": ratios["aligned_vs_generate"] >= 10},
        "verdicts": verdicts,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'path':<22} {'answers':>7} {'tokens':>7} {'wall s':>8} {'tokens/s':>9} {'passes/answer':>13} "
          f"{'positions/token':>15} {'in decoder':>10}")
    for name, p in paths.items():
        print(f"{name:<22} {p['answers']:>7} {p['tokens']:>7} {p['wall_s']:>8.2f} {p['tokens_per_s']:>9.1f} "
              f"{p['forward_passes_per_answer']:>13.2f} {p['decoder_positions_per_token']:>15.2f} "
              f"{100 * p['decoder_share']:>9.0f}%")
    print("aligned scorer's time: " + ", ".join(f"{k} {v}" for k, v in where.items()))
    print("  ".join(f"{k} = {v:.2f}" for k, v in ratios.items()) + f"  (wrote {out_path})")
    print(json.dumps({"records": len(jobs), **ratios, **{f"{k}_tokens_per_s": v for k, v in rate.items()},
                      "aligned_forward_passes_per_answer": paths["aligned"]["forward_passes_per_answer"]}))


if __name__ == "__main__":
    main()
