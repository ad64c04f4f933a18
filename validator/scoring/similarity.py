"""Similarity of a host's answer to the reference's own re-run of the probe.

Reported, never decisive: an honest llama.cpp host matched a transformers re-run
exactly on only 3 of 12 greedy prompts (docs/methodology.md). Library implementations only:
rapidfuzz for the edit distance and the longest common subsequence behind ROUGE-L,
sacrebleu for chrF.
"""

from __future__ import annotations

import os

from rapidfuzz.distance import LCSseq, Levenshtein
from sacrebleu.metrics import CHRF

_CHRF = CHRF()


def similarity(answer: str, rerun: str) -> dict[str, float | bool | int]:
    prefix = len(os.path.commonprefix([answer, rerun]))
    words_a, words_r = answer.split(), rerun.split()
    lcs = LCSseq.similarity(words_a, words_r)
    precision = lcs / len(words_a) if words_a else 0.0
    recall = lcs / len(words_r) if words_r else 0.0
    rouge_l = 2 * precision * recall / (precision + recall) if precision + recall else float(answer == rerun)
    return {
        "exact": answer == rerun,
        "shared_prefix_chars": prefix,
        "shared_prefix_share": prefix / max(len(answer), len(rerun), 1),
        "rouge_l": rouge_l,
        "chrf": _CHRF.sentence_score(answer, [rerun]).score / 100.0,
        "edit_distance": Levenshtein.normalized_distance(answer, rerun),
    }
