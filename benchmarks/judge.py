"""How far the `judge` component of POST /validator/v1/llm agrees with people: the judge
model (validator/scoring/judge.py; by default the reference) grades labelled answers,
a correct and a wrong one to each question with a ground truth
(benchmarks/data/judge_pairs.jsonl, 25 questions, 50 answers, written by hand: the wrong
answer is phrased like the right one and differs in the fact asked for).

Reported, per judge and rubric (with the ground truth, as the endpoint uses it when a pair
has one, and without):
- auc: the chance a correct answer gets a higher grade than a wrong one (ties count half)
  over all answers; 0.5 is a coin.
- paired_agreement: share of questions where the correct answer's grade is above the
  wrong one's (ties count half).
- mean_mass: the probability the judge put on the five grade digits at all.
The `cosine` component (all-MiniLM-L6-v2, answer vs ground truth) on the same answers is
reported beside it, as what the network's methodology weighs with the judge.

    python benchmarks/judge.py                      # SmolLM2-135M, about a minute on a CPU
    python benchmarks/judge.py --model gemma-3-270m

Writes benchmarks/results/judge[.MODEL].json; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from validator.models.registry import DEFAULT_MODEL, Registry  # noqa: E402
from validator.scoring.judge import Judge  # noqa: E402
from validator.scoring.reference import ReferenceModel  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "judge_pairs.jsonl"


def auc(scores: list[float], labels: list[int]) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney U / n1 n0)."""
    pos = np.array([s for s, y in zip(scores, labels) if y == 1])
    neg = np.array([s for s, y in zip(scores, labels) if y == 0])
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def paired(scores: list[float], rows: list[dict]) -> float:
    by_question: dict[str, dict[int, float]] = {}
    for s, r in zip(scores, rows):
        by_question.setdefault(r["question"], {})[r["label"]] = s
    wins = [1.0 if q[1] > q[0] else 0.5 if q[1] == q[0] else 0.0 for q in by_question.values()]
    return float(np.mean(wins))


def summary(scores: list[float], rows: list[dict], masses: list[float] | None = None) -> dict:
    labels = [r["label"] for r in rows]
    out = {"auc": round(auc(scores, labels), 4), "paired_agreement": round(paired(scores, rows), 4),
           "mean_score_correct": round(float(np.mean([s for s, y in zip(scores, labels) if y])), 4),
           "mean_score_wrong": round(float(np.mean([s for s, y in zip(scores, labels) if not y])), 4)}
    if masses is not None:
        out["mean_mass"] = round(float(np.mean(masses)), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Registry name of the judge model.")
    ap.add_argument("--no-cosine", action="store_true", help="Skip the cosine baseline.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40 and {r["label"] for r in rows} == {0, 1}

    t0 = time.perf_counter()
    judge = Judge(ReferenceModel.load(Registry.load().get(args.model)))
    load_s = time.perf_counter() - t0
    results = {}
    for name, truth in (("judge_with_ground_truth", True), ("judge_without_ground_truth", False)):
        t = time.perf_counter()
        grades = judge.grade([(r["question"], r["answer"], r["ground_truth"] if truth else None) for r in rows])
        results[name] = {**summary([g.score for g in grades], rows, [g.mass for g in grades]),
                         "seconds": round(time.perf_counter() - t, 1)}
    if not args.no_cosine:
        from validator.service.scorer import Scorer

        emb = Scorer(Registry.load()).embed([r["answer"] for r in rows] + [r["ground_truth"] for r in rows])
        cos = np.clip(np.sum(emb[: len(rows)] * emb[len(rows):], axis=1), 0, 1).tolist()
        results["cosine_to_ground_truth"] = summary(cos, rows)

    report = {"benchmark": "judge", "judge_model": args.model, "pairs": len(rows),
              "questions": len({r["question"] for r in rows}), "data": str(DATA.relative_to(ROOT)),
              "load_s": round(load_s, 1), "results": results,
              "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    out = args.out or ROOT / "benchmarks" / "results" / (
        "judge.json" if args.model == DEFAULT_MODEL else f"judge.{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
