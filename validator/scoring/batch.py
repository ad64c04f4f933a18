"""`validator audit`: score recorded answers from a JSONL file.

Input line: {"id", "host", "model", "messages", "configs", "response"}.
Output line: {"id", "host", "verdict", "p_value", "reasons", "metrics"} in input order;
a bad input line becomes {"line", "id", "host", "verdict": "error", "reasons": [why]}.
Hosts: {host: {"verdict", "records", "failed", "p_value"}}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from validator.scoring.align import AlignItem, Aligner
from validator.reputation import HostRule, host_verdict
from validator.scoring.reference import ReferenceModel
from validator.models.registry import Registry, RegistryError
from validator.models.sampling import Settings, SettingsError
from validator.scoring.verdict import Score, Tolerances, VerdictRule, score
from validator.scoring.similarity import similarity

log = logging.getLogger(__name__)
# Natural text runs 3-5 bytes a token. An answer denser than this many bytes a token of
# max_tokens is failed without alignment, so a hostile megabyte costs no model time.
MAX_BYTES_PER_TOKEN = 32


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class AuditRecord(BaseModel):
    id: str | int
    host: str = Field(min_length=1)
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    configs: dict[str, Any] = Field(default_factory=dict)
    response: str


@dataclass
class Job:
    line: int
    record: AuditRecord
    settings: Settings
    prompt: list[int] | None = None
    rerun: str | None = None
    result: dict | None = None


class InputError(ValueError):
    pass


def parse_line(text: str) -> tuple[AuditRecord, Settings]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(raw, dict):
        raise InputError("not a JSON object")
    try:
        record = AuditRecord.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise InputError(f"{where}: {first['msg']}{more}") from None
    try:
        settings = Settings.from_configs(record.configs)
    except SettingsError as exc:
        raise InputError(str(exc)) from None
    return record, settings


def probe_seed(messages: list[dict], settings: Settings) -> int:
    """The re-run's seed: the probe's own, else one derived from its content, so the
    same probe always re-runs the same way and is computed once for all hosts."""
    if settings.seed is not None:
        return settings.seed
    key = json.dumps([messages, settings.as_configs()], sort_keys=True)
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def error_line(line: int, raw: dict | None, message: str) -> dict:
    raw = raw if isinstance(raw, dict) else {}
    return {"line": line, "id": raw.get("id"), "host": raw.get("host"), "verdict": "error",
            "p_value": None, "reasons": [message], "metrics": {}}


class Auditor:
    """Scores jobs of one model; the model is loaded once."""

    def __init__(self, ref: ReferenceModel, tolerances: Tolerances, rule: VerdictRule = VerdictRule()):
        self.ref = ref
        self.tol = tolerances
        self.rule = rule
        self.aligner = Aligner(ref)
        self.reruns = ref.reruns  # per probe, shared by every audit on this model
        # Prompt ids per conversation: every host gets the same probes, and the chat
        # template is the slowest step of preparing an answer.
        self.prompts: dict[str, list[int]] = {}

    def prepare(self, job: Job) -> None:
        messages = [m.model_dump() for m in job.record.messages]
        key = json.dumps(messages, sort_keys=True)
        if key not in self.prompts:
            self.prompts[key] = self.ref.prompt_ids(messages)
        job.prompt = self.prompts[key]
        room = self.ref.max_positions - job.settings.max_tokens - 8
        if len(job.prompt) > room:
            raise InputError(f"prompt of {len(job.prompt)} tokens leaves no room for max_tokens="
                             f"{job.settings.max_tokens} in the model's {self.ref.max_positions} positions")

    def rerun_all(self, jobs: list[Job]) -> None:
        """One fixed-seed generation per distinct probe, shared by every host that got it."""
        todo: dict[str, Job] = {}
        keys = {}
        for job in jobs:
            msgs = [m.model_dump() for m in job.record.messages]
            key = json.dumps([msgs, job.settings.as_configs()], sort_keys=True)
            keys[id(job)] = key
            if key not in self.reruns and key not in todo:
                todo[key] = job
        if todo:
            items = list(todo.items())
            outs = self.ref.generate(
                [j.prompt for _, j in items], [j.settings for _, j in items],
                [probe_seed([m.model_dump() for m in j.record.messages], j.settings) for _, j in items])
            for (key, _), toks in zip(items, outs):
                self.reruns[key] = self.ref.tokenizer.decode(toks, skip_special_tokens=True)
        for job in jobs:
            job.rerun = self.reruns[keys[id(job)]]

    def score_jobs(self, jobs: list[Job]) -> None:
        to_align = []
        for job in jobs:
            size = len(job.record.response.encode("utf-8", "surrogatepass"))
            limit = job.settings.max_tokens * min(MAX_BYTES_PER_TOKEN, self.ref.table.max_len)
            if size > limit:
                s = Score("fail", 0.0, [f"answer of {size} bytes cannot fit in max_tokens="
                                        f"{job.settings.max_tokens} tokens (over {limit} bytes)"],
                          {"bytes": size, "byte_limit": limit})
                job.result = self._output(job, s)
            else:
                to_align.append(job)
        if not to_align:
            return
        alignments = self.aligner.align([
            AlignItem(j.prompt, j.record.response, j.settings,
                      support_tolerance=self.tol.support_gap) for j in to_align])
        for job, al in zip(to_align, alignments):
            s = score(al, job.settings, self.ref.table, self.tol, self.rule)
            gaps = al.feats.max_logp[: len(al.tokens)] - al.token_logp
            s.metrics["per_token"] = {
                "text": [self.ref.table.bytes[t].decode("utf-8", "replace") for t in al.tokens],
                "gap": [round(float(g), 3) for g in gaps],
            }
            if job.rerun is not None:
                s.metrics["similarity"] = similarity(job.record.response, job.rerun)
                s.metrics["rerun"] = job.rerun
            s.metrics["tolerances"] = self.tol.source
            job.result = self._output(job, s)

    @staticmethod
    def _output(job: Job, s: Score) -> dict:
        return {"id": job.record.id, "host": job.record.host, "model": job.record.model,
                "verdict": s.verdict, "p_value": s.p_value, "reasons": s.reasons, "metrics": s.metrics}


def run_audit(lines: Iterable[str], registry: Registry, *, rule: VerdictRule = VerdictRule(),
              host_rule: HostRule = HostRule(), rerun: bool = True,
              on_error: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
              progress: Callable[[int, int], None] | None = None,
              models: dict[str, ReferenceModel] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """Score every line; returns (output lines in input order, hosts summary)."""
    outputs: dict[int, dict] = {}
    by_model: dict[str, list[Job]] = defaultdict(list)
    line_no = 0
    for line_no, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record, settings = parse_line(text)
            registry.get(record.model)
        except (InputError, RegistryError) as exc:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError:
                raw = None
            outputs[line_no] = error_line(line_no, raw, str(exc))
            on_error(f"line {line_no}: {exc}")
            continue
        by_model[record.model].append(Job(line_no, record, settings))

    total = sum(len(v) for v in by_model.values())
    done = 0
    models = models if models is not None else {}
    for name, jobs in by_model.items():
        spec = registry.get(name)
        if name not in models:
            models[name] = ReferenceModel.load(spec)
        auditor = Auditor(models[name], Tolerances.from_file(spec.calibration), rule)
        ready = []
        for job in jobs:
            try:
                auditor.prepare(job)
                ready.append(job)
            except Exception as exc:  # a chat template may reject a conversation
                outputs[job.line] = error_line(job.line, job.record.model_dump(), f"prompt: {exc}")
                on_error(f"line {job.line}: prompt: {exc}")
                log.debug("prompt rejected", exc_info=True)
        # Answers to one prompt side by side, so that a chunk computes each prompt once
        # (ReferenceModel.prefill); outputs keep the input order all the same.
        ready.sort(key=lambda job: job.prompt)
        step = auditor.ref.align_chunk
        for start in range(0, len(ready), step):
            chunk = ready[start : start + step]
            if rerun:
                auditor.rerun_all(chunk)
            auditor.score_jobs(chunk)
            for job in chunk:
                outputs[job.line] = job.result
            done += len(chunk)
            if progress:
                progress(done, total)
        done += len(jobs) - len(ready)

    ordered = [outputs[k] for k in sorted(outputs)]
    hosts: dict[str, dict] = {}
    per_host: dict[str, list[dict]] = defaultdict(list)
    for out in ordered:
        if out["verdict"] != "error":
            per_host[out["host"]].append(out)
    for host, outs in sorted(per_host.items()):
        hosts[host] = host_verdict([o["p_value"] for o in outs], [o["verdict"] for o in outs], host_rule)
    return ordered, hosts
