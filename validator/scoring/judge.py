"""An LLM as judge: a model grades a response to a prompt (against a ground truth when
there is one) on a fixed rubric, and the grade is read from the probabilities of the grade
tokens at the first position of its answer: one forward pass, no sampling, the same
numbers on every run.

The grade is the expected value of the grade digit 1..5 under the judge's distribution
restricted to those five tokens, mapped to [0, 1] as (E - 1) / 4. `mass` is the
probability the judge put on the five digits at all: a judge that wanted to say something
else (mass near 0) is guessing.

This is the network's LLM-as-judge component with a model of the registry (by default
the reference model itself). benchmarks/judge.py measures how far its grades agree with
labelled correct and wrong answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from validator.scoring.reference import ReferenceModel

GRADES = ("1", "2", "3", "4", "5")
RUBRIC_WITH_TRUTH = (
    "You are grading an answer to a question. Compare it with the reference answer.\n\n"
    "Question: {prompt}\n\nReference answer: {ground_truth}\n\nAnswer to grade: {response}\n\n"
    "Grade the answer from 1 to 5: 1 = wrong or unrelated, 3 = partly correct, "
    "5 = correct and consistent with the reference answer. Reply with the digit only.")
RUBRIC_WITHOUT_TRUTH = (
    "You are grading an answer to a question.\n\n"
    "Question: {prompt}\n\nAnswer to grade: {response}\n\n"
    "Grade the answer from 1 to 5: 1 = wrong or unrelated, 3 = partly correct, "
    "5 = correct, relevant and complete. Reply with the digit only.")


class JudgeError(ValueError):
    """The judge model cannot grade (its tokenizer splits a grade digit)."""


@dataclass(frozen=True)
class Grade:
    score: float  # (expected grade - 1) / 4, in [0, 1]
    expected: float  # expected grade, 1..5
    mass: float  # probability on the five grade tokens
    probs: tuple[float, ...]  # P(grade) for 1..5, renormalised over the five


class Judge:
    def __init__(self, model: ReferenceModel, batch_tokens: int = 8192):
        self.model = model
        self.batch_tokens = batch_tokens
        ids = []
        for g in GRADES:
            encoded = model.canonical_ids(g)
            if len(encoded) != 1:
                raise JudgeError(f"judge {model.spec.name}: grade {g!r} is {len(encoded)} tokens, not one")
            ids.append(encoded[0])
        self.grade_ids = torch.tensor(ids)

    def prompt_ids(self, prompt: str, response: str, ground_truth: str | None) -> list[int]:
        rubric = RUBRIC_WITHOUT_TRUTH if ground_truth is None else RUBRIC_WITH_TRUTH
        text = rubric.format(prompt=prompt, response=response, ground_truth=ground_truth)
        return self.model.prompt_ids([{"role": "user", "content": text}])

    def grade(self, items: Sequence[tuple[str, str, str | None]]) -> list[Grade | None]:
        """(prompt, response, ground truth or None) -> a Grade each; None where the rubric
        does not fit in the judge's context."""
        seqs = [self.prompt_ids(*item) for item in items]
        out: list[Grade | None] = [None] * len(seqs)
        order = [i for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
                 if len(seqs[i]) <= self.model.max_positions]
        batch: list[int] = []
        for i in order + [None]:
            if i is not None and (not batch or (len(batch) + 1) * len(seqs[i]) <= self.batch_tokens):
                batch.append(i)
                continue
            if batch:
                for j, g in zip(batch, self._last_logits([seqs[j] for j in batch])):
                    out[j] = g
            batch = [i] if i is not None else []
        return out

    @torch.inference_mode()
    def _last_logits(self, seqs: list[list[int]]) -> list[Grade]:
        ref = self.model
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), ref.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):  # right-padded: a causal model's last real position is exact
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        with ref.lock:
            logits = ref.model(input_ids=ids.to(ref.device), attention_mask=mask.to(ref.device)).logits
        last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])].float()
        logp = torch.log_softmax(last, dim=-1)[:, self.grade_ids.to(last.device)].cpu()
        grades = []
        for row in logp:
            p = torch.exp(row)
            mass = float(p.sum())
            q = (p / p.sum()).tolist()
            expected = sum((k + 1) * qk for k, qk in enumerate(q))
            grades.append(Grade(score=(expected - 1) / 4, expected=expected, mass=mass, probs=tuple(q)))
        return grades
