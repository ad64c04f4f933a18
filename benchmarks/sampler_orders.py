"""How much a settings-bending host's answers say against each honest sampler order.

    python benchmarks/sampler_orders.py --answers benchmarks/data/compliance_answers/max_tokens-48/default.temperature-hotter_0.25.jsonl \
        --asked 0.7/50/0.5 --host 0.95/50/0.5

The pooled evidence (docs/methodology.md, "Pooled evidence") accepts a host when either
honest sampler order (validator/models/sampling.py: the temperature before top-k/top-p,
"transformers", or after, "llama.cpp") explains its answers. This measures, over a
host's own answers and the reference model's distributions at each of their steps:

- the per-token Kullback-Leibler divergence of the host's sampling distribution from
  each honest order's (infinite where the host samples outside that order's support;
  then the host's mass outside it per token): what the best possible test, one that knew
  the host's settings, gains per token against that order;
- the share of tokens outside the support both orders keep (the host's expected and
  observed, the honest llama.cpp order's expected): a simple statistic that might see
  the difference.

The host samples in the transformers order (the simulator's engine). Writes JSON to
--out (default results/sampler_orders.json, one entry per answers file, appended).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def distribution(logits, temperature: float, top_k: int, top_p: float, order: str):
    """log q over the vocabulary (-inf outside the support) for one sampler order."""
    import torch

    logp = torch.log_softmax(logits.double(), -1)
    top, ids = logp.sort(descending=True)
    k = top_k if top_k > 0 else len(top)
    top, ids = top[:k], ids[:k]
    cut = torch.log_softmax(top / temperature if order == "transformers" else top, -1).exp()
    keep = (cut.cumsum(0) - cut) < top_p  # kept while the mass before it is below top_p
    keep[0] = True
    q = torch.full_like(logp, -math.inf)
    q[ids[keep]] = torch.log_softmax(top[keep] / temperature, -1)
    return q


def measure(answers: Path, asked: tuple, host: tuple, limit: int) -> dict:
    import torch

    from validator.models.registry import Registry
    from validator.service.scorer import Scorer

    ref = Scorer(Registry.load()).auditor("smollm2-135m").ref
    rows = [json.loads(line)["record"] for line in answers.read_text().splitlines()][:limit]
    kl = {"transformers": 0.0, "llama.cpp": 0.0}
    outside = {"transformers": 0.0, "llama.cpp": 0.0}
    common_honest = common_host = common_seen = 0.0
    tokens = 0
    for r in rows:
        prompt = ref.prompt_ids(r["messages"])
        path = ref.tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = ref.model(torch.tensor([prompt + path])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(path)]
        for t, token in enumerate(path):
            h = distribution(logits[t], *host, "transformers")
            honest = {o: distribution(logits[t], *asked, o) for o in kl}
            inside = torch.isfinite(h)
            for o, q in honest.items():
                missing = inside & ~torch.isfinite(q)
                if missing.any():
                    outside[o] += float(h[missing].exp().sum())
                both = inside & torch.isfinite(q)
                kl[o] += float((h[both].exp() * (h[both] - q[both])).sum())
            common = torch.isfinite(honest["transformers"]) & torch.isfinite(honest["llama.cpp"])
            common_honest += float(honest["llama.cpp"][~common].exp().sum())
            common_host += float(h[~common & inside].exp().sum())
            common_seen += float(not bool(common[token]))
            tokens += 1
    return {"answers": str(answers.relative_to(ROOT)) if answers.is_relative_to(ROOT) else str(answers),
            "asked": asked, "host": host, "answers_read": len(rows), "tokens": tokens,
            # kl_per_token None: infinite (the host samples outside that order's support)
            "per_order": {o: {"kl_per_token": round(kl[o] / tokens, 5) if outside[o] == 0 else None,
                              "kl_per_token_inside": round(kl[o] / tokens, 5),
                              "host_mass_outside_support_per_token": round(outside[o] / tokens, 5)} for o in kl},
            "outside_common_support_per_token": {"honest_llama.cpp_expected": round(common_honest / tokens, 5),
                                                 "host_expected": round(common_host / tokens, 5),
                                                 "host_observed": round(common_seen / tokens, 5)}}


def settings(text: str) -> tuple:
    t, k, p = text.split("/")
    return float(t), int(k), float(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=Path, required=True, help="a compliance_power.py answers file")
    parser.add_argument("--asked", type=settings, required=True, help="temperature/top_k/top_p asked")
    parser.add_argument("--host", type=settings, required=True, help="temperature/top_k/top_p the host used")
    parser.add_argument("--limit", type=int, default=20, help="answers read (the first N)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sampler_orders.json")
    args = parser.parse_args()
    result = measure(args.answers.resolve(), args.asked, args.host, args.limit)
    found = json.loads(args.out.read_text()) if args.out.exists() else []
    found = [f for f in found if (f["answers"], f["asked"], f["host"]) != (result["answers"], list(args.asked), list(args.host))]
    args.out.write_text(json.dumps(found + [result], indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
