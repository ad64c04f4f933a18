"""The recorded answers and reference generations (tests/answers.py) are reused only
while nothing that decides them has changed; otherwise they are generated again and the
file rewritten."""

from __future__ import annotations

import dataclasses
import json

from validator.models.sampling import Settings

from .answers import fingerprint, generation_fingerprint, load_or_generate, reference_generations


def _generator(calls: list):
    def generate():
        calls.append(1)
        return {"honest": {"h": [{"id": "h/1", "host": "h", "response": "text é\\n"}]},
                "cheat": {"c": [{"id": "c/1", "host": "c", "response": ""},
                                {"id": "c/2", "host": "c", "response": "x"}]}}
    return generate


def test_recorded_answers_are_reused_only_under_the_same_fingerprint(tmp_path, hosts, probes):
    path = tmp_path / "answers.jsonl"
    plan = {"honest": ["h"], "cheats": ["c"]}
    calls: list = []
    first = load_or_generate(hosts, probes, plan, _generator(calls), path=path)
    assert len(calls) == 1 and path.exists()
    again = load_or_generate(hosts, probes, plan, _generator(calls), path=path)
    assert len(calls) == 1, "same fingerprint: read from the file, not generated"
    assert again == first

    # Another plan, or probes that differ in one setting, are generated afresh.
    load_or_generate(hosts, probes, {**plan, "cheats": ["c", "d"]}, _generator(calls), path=path)
    assert len(calls) == 2
    p, s = probes[0]
    changed = [(p, dataclasses.replace(s, max_tokens=s.max_tokens + 1))] + list(probes[1:])
    assert fingerprint(hosts, changed, plan) != fingerprint(hosts, probes, plan)
    load_or_generate(hosts, changed, plan, _generator(calls), path=path)
    assert len(calls) == 3
    header = json.loads(path.read_text().splitlines()[0])
    assert header["fingerprint"] == fingerprint(hosts, changed, plan)


def test_fresh_answers_can_be_forced(tmp_path, hosts, probes, monkeypatch):
    path = tmp_path / "answers.jsonl"
    calls: list = []
    load_or_generate(hosts, probes, {}, _generator(calls), path=path)
    monkeypatch.setenv("VALIDATOR_FRESH_ANSWERS", "1")
    load_or_generate(hosts, probes, {}, _generator(calls), path=path)
    assert len(calls) == 2


def test_reference_generations_are_reused_only_under_the_same_fingerprint(tmp_path, ref, monkeypatch):
    path = tmp_path / "generations.jsonl"
    calls: list = []

    def generate(prompts, settings, seeds):
        calls.append(list(seeds))
        return [[7, seed] for seed in seeds]

    monkeypatch.setattr(ref, "generate", generate)  # this instance only, undone after the test
    greedy, sampled = Settings(temperature=0.0, max_tokens=8), Settings(temperature=1.0, max_tokens=8)
    first = reference_generations(ref, "a", [[1, 2]], [greedy], [3], path=path)
    assert first == [[7, 3]] and len(calls) == 1
    assert reference_generations(ref, "a", [[1, 2]], [greedy], [3], path=path) == first
    assert len(calls) == 1, "same fingerprint: read from the file, not generated"
    # another use keeps its own row; another setting or seed is generated afresh
    reference_generations(ref, "b", [[1, 2]], [sampled], [3], path=path)
    reference_generations(ref, "a", [[1, 2]], [greedy], [4], path=path)
    assert calls == [[3], [3], [4]]
    assert generation_fingerprint(ref, [[1, 2]], [greedy], [3]) != generation_fingerprint(ref, [[1, 2]], [sampled], [3])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["name"], r["tokens"]) for r in rows] == [("a", [[7, 4]]), ("b", [[7, 3]])]
    monkeypatch.setenv("VALIDATOR_FRESH_ANSWERS", "1")
    reference_generations(ref, "b", [[1, 2]], [sampled], [3], path=path)
    assert len(calls) == 4
