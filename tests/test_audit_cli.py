"""`validator audit` end to end, as a user runs it: a subprocess on a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from validator.service.audit import run_audit
from validator.service.scorer import Scorer
from validator.models.registry import DEFAULT_REGISTRY, Registry

from .conftest import MODEL


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_cli_scores_good_lines_and_reports_bad_ones(tmp_path, honest_records, cheat_records):
    good = honest_records["honest-llama.cpp"][:3] + cheat_records["cheat-other-model"][:3]
    bad = [
        "{not json",
        json.dumps({"id": "x1", "host": "h", "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}],
                    "response": "hello"}),
        json.dumps({"id": "x2", "host": "h", "model": MODEL, "messages": [{"role": "wizard", "content": "hi"}],
                    "response": "hello"}),
        json.dumps({"id": "x3", "host": "h", "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "configs": {"top_p": 7}, "response": "hello"}),
        json.dumps({"id": "x4", "host": "h", "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        json.dumps([1, 2, 3]),
    ]
    lines = [json.dumps(good[0])] + bad[:3] + [json.dumps(r) for r in good[1:]] + bad[3:]
    records = _write(tmp_path / "in.jsonl", lines)
    out, hosts_out = tmp_path / "scored.jsonl", tmp_path / "hosts.json"
    proc = subprocess.run([sys.executable, "-m", "validator.cli", "audit", str(records), "--out", str(out),
                           "--hosts-out", str(hosts_out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr  # documented: some lines could not be scored
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(lines)  # one output line per input line, in order
    errors = {s["line"]: s for s in scored if s["verdict"] == "error"}
    assert sorted(errors) == [2, 3, 4, 10, 11, 12]
    assert "not JSON" in errors[2]["reasons"][0]
    assert "no-such-model" in errors[3]["reasons"][0]
    assert "role" in errors[4]["reasons"][0] and errors[4]["id"] == "x2"
    assert "top_p" in errors[10]["reasons"][0]
    assert "response" in errors[11]["reasons"][0]
    assert "not a JSON object" in errors[12]["reasons"][0]
    for n in errors:
        assert f"line {n}:" in proc.stderr
    ok = [s for s in scored if s["verdict"] != "error"]
    assert [s["id"] for s in ok] == [r["id"] for r in good]
    for s in ok:
        assert set(s) >= {"id", "host", "verdict", "p_value", "reasons", "metrics", "provenance"}
        assert s["provenance"]["model"] == MODEL and s["provenance"]["checkpoint"]["sha256"]
        assert s["verdict"] in {"pass", "fail", "inconclusive"} and 0.0 <= s["p_value"] <= 1.0
        assert s["reasons"] and all(isinstance(r, str) and r for r in s["reasons"])
        assert {"tokens", "gap", "termination", "similarity", "per_token"} <= set(s["metrics"])
    hosts = json.loads(hosts_out.read_text())
    assert set(hosts) == {"honest-llama.cpp", "cheat-other-model"}
    for h in hosts.values():
        assert set(h) == {"verdict", "records", "failed", "p_value", "evidence", "pooled"} and h["records"] == 3
    assert hosts["cheat-other-model"]["failed"] >= 1


def test_one_file_mixes_models_each_loaded_once(tmp_path, honest_records, ref):
    """Two registry names for the same checkpoint: each loads once, answers go to their own."""
    raw = yaml.safe_load(DEFAULT_REGISTRY.read_text())
    raw["models"]["smollm2-copy"] = dict(raw["models"][MODEL])
    raw["models"]["smollm2-copy"]["calibration"] = str(DEFAULT_REGISTRY.parent / raw["models"][MODEL]["calibration"])
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    registry = Registry.load(path)
    records = honest_records["honest-transformers-fp32"][:4]
    copies = [{**r, "model": "smollm2-copy", "id": r["id"] + "-copy"} for r in records]
    mixed = [json.dumps(r) for pair in zip(records, copies) for r in pair]
    loaded = {MODEL: ref}
    lines, _ = run_audit(mixed, Scorer(registry, models=loaded), rerun=False)  # the re-run: test_cli_scores_good_lines
    assert set(loaded) == {MODEL, "smollm2-copy"}
    assert [line["model"] for line in lines] == [MODEL, "smollm2-copy"] * 4
    for a, b in zip(lines[::2], lines[1::2]):  # same checkpoint, same evidence
        assert a["verdict"] == b["verdict"]
        assert abs(a["metrics"]["mean_logprob"] - b["metrics"]["mean_logprob"]) < 1e-3


def test_hostile_answers_are_judged_not_crashed(registry, ref):
    base = {"host": "h", "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
            "configs": {"temperature": 0, "max_tokens": 16}}
    huge = "word " * 200_000  # a megabyte answer to a 16-token request
    lines = [json.dumps({**base, "id": 1, "response": huge}),
             json.dumps({**base, "id": 2, "response": "\ud800\udfff broken surrogates \x00 and nulls"}),
             json.dumps({**base, "id": 3, "response": "<|im_end|>" * 40}),
             json.dumps({**base, "id": 4, "response": ""})]
    out, _ = run_audit(lines, Scorer(registry, models={MODEL: ref}))
    assert [o["verdict"] != "error" for o in out] == [True] * 4
    assert out[0]["verdict"] == "fail" and "cannot fit" in out[0]["reasons"][0]
    assert out[2]["verdict"] == "fail"  # 40 copies of a control-token string as text: too long


HOSTILE_LINES = [
    '{"id": 1, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"max_tokens": ' + "9" * 5000 + '}, "response": "x"}',
    '{"id": 2, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"temperature": NaN}, "response": "x"}',
    '{"id": 3, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"top_p": Infinity}, "response": "x"}',
    '{"id": 4, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"temperature": 0.7, "seed": ' + str(2**70) + '}, "response": "x"}',
    "[" * 100_000 + "]" * 100_000,
    '{"id": 6, "host": "h", "model": "smollm2-135m", "messages": ' + "[" * 50_000 + "]" * 50_000 + ', "response": "x"}',
    '{"id": 7, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"max_tokens": 1e400}, "response": "x"}',
    '{"id": 8, "host": "h", "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], '
    '"configs": {"top_k": ' + "1" * 400 + '}, "response": "x"}',
]


def test_cli_turns_every_hostile_line_into_an_error_line(tmp_path):
    """Integers of 5,000 digits, NaN and infinite settings, a seed of 2^70, deep nesting:
    each an `error` line with its reason; the exit status says some lines errored."""
    records = _write(tmp_path / "in.jsonl", HOSTILE_LINES)
    out = tmp_path / "scored.jsonl"
    proc = subprocess.run([sys.executable, "-m", "validator.cli", "audit", str(records), "--out", str(out),
                           "--no-rerun"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["line"] for s in scored] == list(range(1, len(HOSTILE_LINES) + 1))
    assert all(s["verdict"] == "error" and s["reasons"][0] for s in scored)
    assert "seed" in scored[3]["reasons"][0]
    assert "temperature" in scored[1]["reasons"][0] and "top_p" in scored[2]["reasons"][0]


def test_results_are_written_as_they_are_scored(registry, ref):
    """Window by window: an input that breaks off (a crash, Ctrl-C) keeps every line
    scored before it."""
    from validator.service.audit import audit_lines

    good = json.dumps({"id": 0, "host": "h", "model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                       "configs": {"temperature": 0, "max_tokens": 8}, "response": "Hi!"})

    def lines():
        for i in range(4):
            yield good
        raise KeyboardInterrupt

    got = []
    try:
        for out in audit_lines(lines(), Scorer(registry, models={MODEL: ref}), rerun=False, window=2):
            got.append(out)
    except KeyboardInterrupt:
        pass
    assert len(got) == 4 and all(o["verdict"] != "error" for o in got)


def test_audit_never_raises_on_any_line(registry, ref):
    """Property: any text, any JSON, and records whose every field is hostile, give one
    output line each and never an exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from validator.service.audit import audit_lines

    scorer = Scorer(registry, models={MODEL: ref})
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
    any_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | any_json,
                                     "content": st.text(max_size=30) | any_json})
    record = st.fixed_dictionaries({
        "id": any_json, "host": st.text(max_size=8) | any_json, "model": st.just(MODEL) | any_json,
        "messages": st.lists(message, max_size=3) | any_json,
        "configs": st.dictionaries(st.sampled_from(["temperature", "top_k", "top_p", "max_tokens", "seed"]),
                                   scalars, max_size=5) | any_json,
        "response": st.text(max_size=30) | any_json})
    line = (st.text(max_size=200) | any_json.map(lambda v: json.dumps(v, allow_nan=True))
            | record.map(lambda v: json.dumps(v, allow_nan=True)))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(line, min_size=1, max_size=4))
    def check(lines):
        lines = [text.replace("\n", " ").replace("\r", " ") for text in lines]
        out = list(audit_lines(lines, scorer, rerun=False))
        assert len(out) == sum(bool(text.strip()) for text in lines)
        assert all(o["verdict"] in ("pass", "fail", "inconclusive", "error") for o in out)

    check()

