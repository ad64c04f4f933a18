"""The batch scorer: hosts' answers scored against the reference model of the model each
claims. Every front door scores through it, by way of validator.service (the daemon's
queue, `validator audit`, the probe page, POST /validator/v1/llm, `validator bench`).

Input: `AnswerRecord`s (typed; `parse_line` reads one from a `validator audit` JSONL
line). Output: one `ScoredAnswer` per record, in input order. A record this scorer
cannot take comes back with verdict "error" and the reason; nothing is printed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from validator.models.sampling import Settings, SettingsError
from validator.scoring.align import AlignItem, Aligner
from validator.scoring.reference import ReferenceModel
from validator.scoring.similarity import similarity
from validator.scoring.verdict import AnswerScore, Tolerances, VerdictRule, score_answer

log = logging.getLogger(__name__)
# Natural text runs 3-5 bytes a token. An answer denser than this many bytes a token of
# max_tokens is failed without alignment, so a hostile megabyte costs no model time.
MAX_BYTES_PER_TOKEN = 32
SEED_LIMIT = 2**63  # torch's generators take 64-bit seeds; the API itself sends none


class InputError(ValueError):
    """A record that cannot be scored as it is (malformed, or not for this reference)."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class _AuditLine(BaseModel):
    """One `validator audit` input line."""
    id: str | int
    host: str = Field(min_length=1)
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    configs: dict[str, Any] = Field(default_factory=dict)
    response: str


@dataclass(frozen=True)
class AnswerRecord:
    """One host's answer to one conversation, with the sampling settings it was asked for."""
    id: str | int
    host: str
    model: str
    messages: list[dict]
    settings: Settings
    response: str

    @classmethod
    def build(cls, id: Any, host: str, model: str, messages: Any, configs: Any,
              response: Any) -> "AnswerRecord":
        """Validated from untrusted fields (a stored probe, an audit line, an API pair)."""
        try:
            line = _AuditLine.model_validate({"id": id, "host": host, "model": model, "messages": messages,
                                              "configs": configs if configs is not None else {},
                                              "response": response})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise InputError(f"{where}: {first['msg']}{more}") from None
        try:
            settings = Settings.from_configs(line.configs)
        except (SettingsError, OverflowError) as exc:
            raise InputError(str(exc) if isinstance(exc, SettingsError) else f"configs: {exc}") from None
        if settings.seed is not None and not 0 <= settings.seed < SEED_LIMIT:
            raise InputError(f"configs.seed={settings.seed} is outside [0, 2^63)")
        return cls(line.id, line.host, line.model, [m.model_dump() for m in line.messages],
                   settings, line.response)

    @property
    def conversation_key(self) -> str:
        return json.dumps(self.messages, sort_keys=True)

    @property
    def probe_key(self) -> str:
        """The conversation and its settings: one re-run per key, shared by every host."""
        return json.dumps([self.messages, self.settings.as_configs()], sort_keys=True)


@dataclass
class ScoredAnswer:
    id: str | int | None
    host: str | None
    model: str | None
    verdict: str  # pass | fail | inconclusive | error
    p_value: float | None
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)
    # What produced the verdict (validator.service.provenance); None for an error.
    provenance: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def error(id: Any, host: Any, model: Any, reason: str) -> ScoredAnswer:
    return ScoredAnswer(id if isinstance(id, (str, int)) and not isinstance(id, bool) else None, host if isinstance(host, str) else None,
                        model if isinstance(model, str) else None, "error", None, [reason])


def parse_line(text: str) -> AnswerRecord:
    """A `validator audit` JSONL line; InputError (never anything else) when it is unusable."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # 5,000-digit integers, 100,000 nested brackets
        raise InputError(f"not JSON this scorer reads: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    return AnswerRecord.build(raw.get("id"), raw.get("host"), raw.get("model"), raw.get("messages"),
                              raw.get("configs"), raw.get("response"))


def rerun_seed(messages: list[dict], settings: Settings) -> int:
    """The seed of the reference's own answer (its re-run): the request's seed, else one
    derived from the content, so the same probe always re-runs the same way and is
    computed once for all hosts."""
    if settings.seed is not None:
        return settings.seed
    key = json.dumps([messages, settings.as_configs()], sort_keys=True)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


class Auditor:
    """Scores records of one model; the reference is loaded by the caller, once."""

    def __init__(self, ref: ReferenceModel, tolerances: Tolerances, rule: VerdictRule = VerdictRule()):
        self.ref = ref
        self.tol = tolerances
        self.rule = rule
        self.aligner = Aligner(ref)
        self.reruns = ref.reruns  # per probe key, shared by every audit on this model
        # Prompt ids per conversation: every host gets the same probes, and the chat
        # template is the slowest step of preparing an answer.
        self.prompts: dict[str, list[int]] = {}

    def prompt(self, record: AnswerRecord) -> list[int]:
        key = record.conversation_key
        if key not in self.prompts:
            self.prompts[key] = self.ref.prompt_ids(record.messages)
        ids = self.prompts[key]
        room = self.ref.max_positions - record.settings.max_tokens - 8
        if len(ids) > room:
            raise InputError(f"prompt of {len(ids)} tokens leaves no room for max_tokens="
                             f"{record.settings.max_tokens} in the model's {self.ref.max_positions} positions")
        return ids

    def rerun(self, jobs: list[tuple[AnswerRecord, list[int]]]) -> list[str]:
        """The reference's fixed-seed answer per record, generated once per probe key."""
        todo = {}
        for record, prompt in jobs:
            if record.probe_key not in self.reruns and record.probe_key not in todo:
                todo[record.probe_key] = (record, prompt)
        if todo:
            items = list(todo.values())
            outs = self.ref.generate([p for _, p in items], [r.settings for r, _ in items],
                                     [rerun_seed(r.messages, r.settings) for r, _ in items])
            for key, toks in zip(todo, outs):
                self.reruns[key] = self.ref.tokenizer.decode(toks, skip_special_tokens=True)
        return [self.reruns[record.probe_key] for record, _ in jobs]

    def score(self, jobs: list[tuple[AnswerRecord, list[int]]], reruns: list[str] | None) -> list[AnswerScore]:
        out: list[AnswerScore | None] = [None] * len(jobs)
        to_align = []
        for i, (record, prompt) in enumerate(jobs):
            size = len(record.response.encode("utf-8", "surrogatepass"))
            limit = record.settings.max_tokens * min(MAX_BYTES_PER_TOKEN, self.ref.table.max_len)
            if size > limit:
                out[i] = AnswerScore("fail", 0.0, [f"answer of {size} bytes cannot fit in max_tokens="
                                                   f"{record.settings.max_tokens} tokens (over {limit} bytes)"],
                                     {"bytes": size, "byte_limit": limit})
            else:
                to_align.append(i)
        alignments = self.aligner.align([
            AlignItem(jobs[i][1], jobs[i][0].response, jobs[i][0].settings,
                      support_tolerance=self.tol.support_gap) for i in to_align]) if to_align else []
        for i, al in zip(to_align, alignments):
            record = jobs[i][0]
            s = score_answer(al, record.settings, self.ref.table, self.tol, self.rule)
            gaps = al.feats.max_logp[: len(al.tokens)] - al.token_logp
            s.metrics["per_token"] = {
                "text": [self.ref.table.bytes[t].decode("utf-8", "replace") for t in al.tokens],
                "gap": [round(float(g), 3) for g in gaps],
            }
            if reruns is not None:
                s.metrics["similarity"] = similarity(record.response, reruns[i])
                s.metrics["rerun"] = reruns[i]
            s.metrics["tolerances"] = self.tol.source
            out[i] = s
        return out  # type: ignore[return-value]


def score_records(records: Sequence[AnswerRecord], auditor_for: Callable[[str], Auditor], *,
                  rerun: bool = True, provenance_for: Callable[[str], dict] = lambda model: {},
                  progress: Callable[[int, int], None] | None = None) -> list[ScoredAnswer]:
    """Score every record (grouped by claimed model); results in input order.
    `auditor_for(model)` may raise: its exception propagates (the caller decides whether a
    reference that cannot load is an error per record or a failed request)."""
    results: list[ScoredAnswer | None] = [None] * len(records)
    by_model: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_model.setdefault(record.model, []).append(i)
    done = 0
    for model, indices in by_model.items():
        auditor = auditor_for(model)
        provenance = provenance_for(model)
        ready: list[tuple[int, list[int]]] = []
        for i in indices:
            try:
                ready.append((i, auditor.prompt(records[i])))
            except Exception as exc:  # a chat template may reject a conversation
                r = records[i]
                results[i] = error(r.id, r.host, r.model, f"prompt: {exc}")
                log.debug("prompt rejected", exc_info=True)
        # Answers to one prompt side by side, so that a chunk computes each prompt once
        # (ReferenceModel.prefill); results keep the input order all the same.
        ready.sort(key=lambda item: item[1])
        step = auditor.ref.align_chunk
        for start in range(0, len(ready), step):
            chunk = ready[start : start + step]
            jobs = [(records[i], prompt) for i, prompt in chunk]
            reruns = auditor.rerun(jobs) if rerun else None
            for (i, _), s in zip(chunk, auditor.score(jobs, reruns)):
                r = records[i]
                results[i] = ScoredAnswer(r.id, r.host, r.model, s.verdict, s.p_value, s.reasons,
                                          s.metrics, provenance)
            done += len(chunk)
            if progress:
                progress(done, len(records))
        done += len(indices) - len(ready)
    return results  # type: ignore[return-value]
