"""`validator audit` end to end, as a user runs it: a subprocess on a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from validator.scoring.batch import run_audit
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
    assert proc.returncode == 0, proc.stderr
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
        assert set(s) >= {"id", "host", "verdict", "p_value", "reasons", "metrics"}
        assert s["verdict"] in {"pass", "fail", "inconclusive"} and 0.0 <= s["p_value"] <= 1.0
        assert s["reasons"] and all(isinstance(r, str) and r for r in s["reasons"])
        assert {"tokens", "gap", "termination", "similarity", "per_token"} <= set(s["metrics"])
    hosts = json.loads(hosts_out.read_text())
    assert set(hosts) == {"honest-llama.cpp", "cheat-other-model"}
    for h in hosts.values():
        assert set(h) == {"verdict", "records", "failed", "p_value"} and h["records"] == 3
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
    lines, _ = run_audit(mixed, registry, models=loaded)
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
    out, _ = run_audit(lines, registry, models={MODEL: ref})
    assert [o["verdict"] != "error" for o in out] == [True] * 4
    assert out[0]["verdict"] == "fail" and "cannot fit" in out[0]["reasons"][0]
    assert out[2]["verdict"] == "fail"  # 40 copies of a control-token string as text: too long
