"""`validator audit`: score recorded answers from JSONL lines.

Input line: {"id", "host", "model", "messages", "configs", "response"}.
Output line: {"id", "host", "model", "verdict", "p_value", "reasons", "metrics",
"provenance"}, in input order, yielded window by window as it is scored (a crash or
Ctrl-C keeps every line written before it); a line that cannot be scored becomes
{"line", "id", "host", "verdict": "error", "reasons": [why], ...}.
Hosts: {host: {"verdict", "records", "failed", "p_value", "evidence", "pooled"}}
(validator.reputation's host rule over the scored lines: the answers' p-values and the
pooled evidence the daemon's reputation reads, in input order).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

from validator.reputation import HostRule, host_verdict
from validator.scoring.batch import AnswerRecord, InputError, ScoredAnswer, error, parse_line
from validator.service.scorer import ModelUnavailable, Scorer

WINDOW = 256  # lines scored together: enough to share prompts, few enough to write often


def _raw_fields(text: str) -> dict:
    """id and host of a bad line, where they can be read, for its error line."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _error_line(line: int, text: str, reason: str) -> dict:
    raw = _raw_fields(text)
    return {"line": line, **error(raw.get("id"), raw.get("host"), raw.get("model"), reason).as_dict()}


def audit_lines(lines: Iterable[str], scorer: Scorer, *, rerun: bool = True,
                on_error: Callable[[str], None] = lambda message: None,
                progress: Callable[[int], None] | None = None, window: int = WINDOW) -> Iterator[dict]:
    """Output lines in input order, one window at a time. Never raises for a line: a
    malformed one, or one whose reference cannot load, becomes an error line."""
    pending: list[tuple[int, str]] = []
    done = 0

    def flush() -> Iterator[dict]:
        nonlocal done
        records: list[tuple[int, AnswerRecord]] = []
        out: dict[int, dict] = {}
        for line_no, text in pending:
            try:
                records.append((line_no, parse_line(text)))
            except InputError as exc:
                out[line_no] = _error_line(line_no, text, str(exc))
                on_error(f"line {line_no}: {exc}")
        by_model: dict[str, list[tuple[int, AnswerRecord]]] = defaultdict(list)
        for item in records:
            by_model[item[1].model].append(item)
        for items in by_model.values():
            try:
                scored: list[ScoredAnswer] = scorer.score([r for _, r in items], rerun=rerun)
            except ModelUnavailable as exc:
                scored = [error(r.id, r.host, r.model, str(exc)) for _, r in items]
            for (line_no, _), s in zip(items, scored):
                out[line_no] = ({"line": line_no, **s.as_dict()} if s.verdict == "error" else s.as_dict())
                if s.verdict == "error":
                    on_error(f"line {line_no}: {s.reasons[0]}")
        for line_no in sorted(out):
            yield out[line_no]
        done += len(pending)
        pending.clear()
        if progress:
            progress(done)

    for line_no, text in enumerate(lines, start=1):
        if text.strip():
            pending.append((line_no, text))
        if len(pending) >= window:
            yield from flush()
    if pending:
        yield from flush()


class HostTally:
    """The host rule over the scored lines seen so far (error lines carry no evidence)."""

    def __init__(self, rule: HostRule = HostRule()):
        self.rule = rule
        self.p_values: dict[str, list[float]] = defaultdict(list)
        self.verdicts: dict[str, list[str]] = defaultdict(list)
        self.pooled: dict[str, list[dict | None]] = defaultdict(list)

    def add(self, out: dict) -> None:
        if out["verdict"] != "error" and out.get("host"):
            self.p_values[out["host"]].append(out["p_value"])
            self.verdicts[out["host"]].append(out["verdict"])
            self.pooled[out["host"]].append((out.get("metrics") or {}).get("pooled"))

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h: host_verdict(self.p_values[h], self.verdicts[h], self.rule, pooled=self.pooled[h])
                for h in sorted(self.p_values)}


def run_audit(lines: Iterable[str], scorer: Scorer, *, host_rule: HostRule = HostRule(), rerun: bool = True,
              on_error: Callable[[str], None] = lambda message: None) -> tuple[list[dict], dict[str, dict]]:
    """Every output line, and the hosts' verdicts."""
    tally = HostTally(host_rule)
    outputs = []
    for out in audit_lines(lines, scorer, rerun=rerun, on_error=on_error):
        tally.add(out)
        outputs.append(out)
    return outputs, tally.hosts()


def audit_records(records: list[AnswerRecord], scorer: Scorer, *, rerun: bool = True,
                  host_rule: HostRule = HostRule()) -> tuple[list[dict], dict[str, dict]]:
    """Score typed records (POST /validator/v1/llm's pairs): output dicts in order and
    the hosts' verdicts. A reference that cannot load raises ModelUnavailable."""
    tally = HostTally(host_rule)
    outputs = [s.as_dict() for s in scorer.score(records, rerun=rerun)]
    for out in outputs:
        tally.add(out)
    return outputs, tally.hosts()
