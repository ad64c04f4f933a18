"""`validator bench`: every example suite in configs/suites/ against a simulated network
(`validator simulate` in a subprocess, SmolLM2 behind the model-backed hosts, the real
reference scoring), the HTML report in headless chromium, an interrupted run resumed,
and `--compare` on two runs that differ in a known way.

Kept small on purpose (one prompt per set, short answers): the suites' full sizes are for
researchers, the tests check that each runs and reports what it is for."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from validator.bench.runner import run_bench
from validator.cli import app

from validator.configs import shipped

from .conftest import MODEL
from .test_simulator import start_simulator, stop_simulator

SUITES = shipped("suites")
NETWORK = {"model": MODEL, "hosts": [
    {"name": "honest", "strategy": "honest-transformers"},
    {"name": "ignored", "strategy": "settings-ignored"},  # samples at T=1, no top-k/top-p, always
    {"name": "static", "strategy": "static"},
    {"name": "slow", "strategy": "slow-first-byte", "delay_s": 0.3}],
    # One endpoint in front of an honest and a dishonest backend, alternating.
    "gateway": {"name": "mixed", "hosts": ["honest", "ignored"], "policy": "round-robin"}}
DOWN = "http://127.0.0.1:9/v1"  # nothing listens: connect_error
QUICK = {"limit": 1, "max_tokens": 12}
TIMEOUT = 120


@pytest.fixture(scope="module")
def net(tmp_path_factory, request):
    with ThreadPoolExecutor(1) as pool:  # the simulator loads its model while we load ours
        started = pool.submit(start_simulator, NETWORK, tmp_path_factory.mktemp("bench-net"))
        request.getfixturevalue("ref")
        proc, rows = started.result()
    yield {name: url for name, (url, _) in rows.items()}
    assert stop_simulator(proc) == 0


def hosts(net: dict, **mapping: str) -> str:
    """--hosts value: suite host name -> simulator host name (or a URL)."""
    return ",".join(f"{name}={net.get(target, target)}" for name, target in mapping.items())


def bench(suite: str | Path, out: Path, host_spec: str, registry, ref, **options):
    path = suite if isinstance(suite, Path) else SUITES / f"{suite}.yaml"
    return run_bench(path, out, hosts=host_spec, registry=registry,
                     models={MODEL: ref}, progress=False, **{**QUICK, **options})


# The shipped smoke suite with one client setting added: no retries, so that the host
# that is down (DOWN) records its connect_error at once instead of after the client's
# backoff (15-90 s of waiting, most of this file's run time).
SMOKE_CLIENT = "\nclient: {retries: 0}\n"


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def smoke(net, registry, ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    suite = tmp_path_factory.mktemp("smoke-suite") / "smoke.yaml"
    suite.write_text((SUITES / "smoke.yaml").read_text() + SMOKE_CLIENT)
    spec = hosts(net, honest="honest", static="static", down=DOWN)
    return bench(suite, out, spec, registry, ref), spec, suite


def test_smoke_suite(smoke):
    result, _, _ = smoke
    rep = result.report
    assert result.sent == 6 and result.skipped == 0 and result.scored == 4
    h = rep["hosts"]
    assert (h["honest"]["pass"], h["honest"]["fail"]) == (2, 0)
    assert h["static"]["fail"] == 2 and h["static"]["gap"]["mean"] > 1.0
    assert h["down"]["errors"] == {"connect_error": 2} and h["down"]["answered"] == 0
    assert rep["run"]["complete"] and rep["totals"] == {"probes": 6, "recorded": 6, "answered": 4,
                                                        "scored": 4}
    assert h["honest"]["latency"]["ttfb_p50"] > 0 and h["honest"]["gap"]["tokens"] > 0
    assert {p["name"] for p in rep["plots"]} >= {"gaps", "p_values", "latency", "by_cell", "agreement"}
    # reproduction: the suite's exact text, its seed and every probe's re-run seed
    saved = json.loads((result.out / "report.json").read_text())
    assert saved["suite"]["text"] == (SUITES / "smoke.yaml").read_text() + SMOKE_CLIENT
    assert saved["suite"]["seed"] == 1 and all(isinstance(p["seed"], int) for p in saved["probes"])
    md = (result.out / "report.md").read_text()
    assert "connect_error" in md and "![Per-token gap distributions](plots/gaps.png)" in md
    assert (result.out / "plots" / "gaps.png").stat().st_size > 1000


def test_same_command_again_sends_and_scores_nothing(smoke, registry, ref):
    first, spec, suite = smoke
    again = bench(suite, first.out, spec, registry, ref)
    assert (again.sent, again.scored, again.skipped, again.resumed) == (0, 0, 6, True)
    assert again.report["hosts"]["honest"]["pass"] == 2  # the recorded scores, not new ones
    sessions = [json.loads(x) for x in (first.out / "sessions.jsonl").read_text().splitlines()]
    assert [(s["session"], s["sent"], s["scored"]) for s in sessions] == [(1, 6, 4), (2, 0, 0)]


def test_html_report_opens_with_its_plots(smoke):
    from .browser import chromium_page, screenshot

    result, _, _ = smoke
    with chromium_page() as page:
        page.goto((result.out / "report.html").as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        names = page.eval_on_selector_all("img.plot", "imgs => imgs.map(i => i.dataset.plot)")
        embedded = json.loads(page.text_content("#report-data"))
        hosts_rows = page.locator("table.hosts tbody tr").count()
        external = page.eval_on_selector_all("[src], link[href]", "els => els.map(e => e.src || e.href)"
                                             ".filter(u => !u.startsWith('data:'))")
        screenshot(page, "bench-report")
        assert page.js_errors == []
    assert len(widths) == len(result.report["plots"]) >= 5 and all(w > 100 for w in widths), widths
    assert {"gaps", "p_values", "latency", "by_cell"} <= set(names)
    assert hosts_rows == 3 and external == []
    assert embedded["suite"]["fingerprint"] == result.report["suite"]["fingerprint"]


def test_compare_reports_a_host_swapped_for_a_cheat(smoke, net, registry, ref, tmp_path):
    """Run B points the suite's `honest` host at one answering canned text."""
    a, _, suite = smoke
    b = bench(suite, tmp_path / "b", hosts(net, honest="static"), registry, ref)
    assert b.report["hosts"]["honest"]["fail"] == 2
    a_json, b_json = str(a.out / "report.json"), str(b.out / "report.json")
    code, out, _ = cli("bench", "--compare", a_json, b_json, "--json")
    assert code == 0
    diff = json.loads(out)
    row = next(r for r in diff["rows"] if r["host"] == "honest" and r["metric"] == "fail rate")
    assert (row["a"], row["b"], row["changed"]) == (0, 1, True)
    assert not next(r for r in diff["rows"] if r["host"] == "honest" and r["metric"] == "errors")["changed"]
    gone = {r["host"] for r in diff["rows"] if r["metric"] == "present"}
    assert gone == {"static", "down"}  # run B had only the one host
    assert any("differ in suite or options" in n for n in diff["notes"])
    code, table, _ = cli("bench", "--compare", a_json, b_json)
    assert code == 0 and "fail rate" in table and "changed" in table


def test_sampling_compliance_suite_locates_ignored_settings(net, registry, ref, tmp_path):
    """The settings-ignoring host samples at T=1 with no top-k/top-p whatever it is asked:
    it fails where the grid asks for something else and never in the cell matching it."""
    result = bench("sampling-compliance", tmp_path / "sc", hosts(net, cheat="ignored"), registry, ref)
    cells = result.report["by_cell"]["cheat"]
    assert len(cells) == 8 and all(c["scored"] == 1 for c in cells.values())
    assert cells["T=1 top_k=0 top_p=1 max=12"]["fail"] == 0  # what it really does
    assert cells["T=0 top_k=50 top_p=0.5 max=12"]["fail"] == 1  # greedy asked, sampled anyway
    assert sum(c["fail"] for c in cells.values()) >= 2
    assert result.report["hosts"]["cheat"]["verdict"] == "dishonest"


def test_long_context_suite_reports_per_prompt_set(net, registry, ref, tmp_path):
    result = bench("long-context", tmp_path / "lc", hosts(net, honest="honest"), registry, ref,
                   context_scale=0.05)
    sets = result.report["by_set"]["honest"]
    assert list(sets) == ["ctx-0", "ctx-500", "ctx-2000"]
    chars = [s["prompt_chars_mean"] for s in sets.values()]
    assert chars[0] < chars[1] < chars[2] and chars[2] > chars[0] + 400  # 100 words of background
    assert all(s["scored"] == 2 and s["fail"] == 0 for s in sets.values()), sets
    assert any(p["name"] == "by_set" for p in result.report["plots"])


def test_determinism_suite_tells_a_mixed_backend_apart(net, registry, ref, tmp_path):
    result = bench("determinism", tmp_path / "det", hosts(net, direct="honest", mixed="mixed"),
                   registry, ref)
    h = result.report["hosts"]
    assert result.scored == 0 and "verdict" not in h["direct"]  # no reference model needed
    assert h["direct"]["determinism"]["greedy_identical_share"] == 1.0 and h["direct"]["answered"] == 5
    assert h["mixed"]["determinism"]["greedy_identical_share"] == 0.0  # 1 group, 2 distinct answers
    assert {p["name"] for p in result.report["plots"]} == {"latency", "agreement", "determinism"}
    ag = result.report["agreement"]
    assert ag["greedy_identical"][0][1] < 1.0 and ag["greedy_identical"][0][0] == 1.0


# --------------------------------------------------------------------------- resume

RESUME_SUITE = {"name": "resume", "prompts": [{"name": "p", "inline": [f"Say {i}." for i in range(10)]}],
                "settings": {"temperature": 0, "max_tokens": 8}, "concurrency": 2,
                "metrics": ["latency", "determinism"]}  # no scoring: this is about the results


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_text()
    return data[: data.rfind("\n") + 1].splitlines()


def _start(suite: Path, out: Path, spec: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "validator.cli", "bench", str(suite), "--hosts", spec,
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop_when(proc: subprocess.Popen, results: Path, at_least: int, sig: int) -> list[str]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_lines(results)) >= at_least:
            proc.send_signal(sig)
            proc.wait(timeout=60)
            return _lines(results)
        time.sleep(0.05)
    raise AssertionError(f"never caught the run midway: {proc.communicate()[0][-2000:]}")


def test_interrupted_run_resumes_without_resending(net, tmp_path):
    """SIGKILL mid-run, then SIGTERM mid-run (a clean stop), then a run that finishes:
    every recorded probe stays as it was and none is sent twice."""
    suite = tmp_path / "resume.yaml"
    suite.write_text(yaml.safe_dump(RESUME_SUITE))
    out, spec = tmp_path / "out", hosts(net, a="slow", b="slow")
    results = out / "results.jsonl"
    total = 20

    first = _start(suite, out, spec)
    killed = _stop_when(first, results, 3, signal.SIGKILL)
    assert 3 <= len(killed) < total and first.returncode == -signal.SIGKILL

    second = _start(suite, out, spec)
    stopped = _stop_when(second, results, len(killed) + 2, signal.SIGTERM)
    log = second.communicate()[0]
    assert second.returncode == 130, log
    assert "run the same command again to resume" in log
    assert stopped[: len(killed)] == killed and len(stopped) < total

    third = _start(suite, out, spec)
    log = third.communicate(timeout=TIMEOUT)[0]
    assert third.returncode == 0, log
    final = _lines(results)
    assert final[: len(stopped)] == stopped  # recorded lines untouched
    keys = [json.loads(line)["key"] for line in final]
    assert len(keys) == len(set(keys)) == total  # every probe once: none lost, none re-sent
    sessions = [json.loads(x) for x in (out / "sessions.jsonl").read_text().splitlines()]
    # the killed run never wrote its session line; the others count exactly what they sent
    assert [(s["skipped"], s["sent"], s["interrupted"]) for s in sessions] == [
        (len(killed), len(stopped) - len(killed), True), (len(stopped), total - len(stopped), False)]
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["complete"] and report["totals"]["answered"] == total
    assert report["hosts"]["a"]["determinism"] is None  # one repeat: nothing to compare
    assert report["hosts"]["a"]["latency"]["ttfb_p50"] >= 0.3  # the host's own delay


# --------------------------------------------------------------------------- errors

def test_bad_suites_and_options_fail_clearly(tmp_path):
    def run(text: str | None, *extra: str) -> tuple[int, str]:
        path = tmp_path / "suite.yaml"
        if text is not None:
            path.write_text(text)
        code, _, err = cli("bench", str(path), "--out", str(tmp_path / "o"), *extra)
        return code, err.strip()

    base = {**RESUME_SUITE, "hosts": [{"name": "a", "url": DOWN}]}
    ok = yaml.safe_dump(base)
    variant = lambda **changes: yaml.safe_dump({**base, **changes})  # noqa: E731
    cases = [
        ("name: x\nprompts: [", "not valid YAML at line"),
        (variant(settings={"temperature": 0, "max_tokens": 0}), "settings.0: configs.max_tokens=0 is outside"),
        (ok + "temprature: 1\n", "temprature: Extra inputs are not permitted"),
        (variant(metrics=["speed"]), "metrics.0: Input should be"),
        (variant(prompts=[{"name": "p", "bank": "general", "inline": ["x"]}]), "give exactly one of"),
        (variant(prompts=[{"name": "p", "bank": "no-such-bank"}]), "cannot load bank"),
        (variant(hosts=[{"name": "a", "url": DOWN, "token_env": "BENCH_TEST_UNSET_TOKEN"}]),
         "environment variable BENCH_TEST_UNSET_TOKEN is not set"),
    ]
    for text, message in cases:
        code, err = run(text)
        assert code == 2 and message in err and "\n" not in err, (message, err)
    code, err = run(ok, "--hosts", "a")
    assert code == 2 and "--hosts: expected NAME=URL" in err
    code, err = run(yaml.safe_dump(RESUME_SUITE))
    assert code == 2 and "names no hosts" in err
    # a run directory holds one suite: the same --out with another suite is refused
    quick = {**RESUME_SUITE, "hosts": [{"name": "a", "url": DOWN}], "client": {"retries": 0}}
    code, err = run(yaml.safe_dump(quick))
    assert code == 0, err
    code, err = run(yaml.safe_dump({**quick, "repeats": 2}))
    assert code == 2 and "holds a run of a different suite" in err and "suite.repeats" in err, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hosts"]["a"]["errors"] == {"connect_error": 10}
    # errors are results: sent again only on request, and then counted once per probe
    code, err = run(yaml.safe_dump(quick), "--retry-errors")
    assert code == 0, err
    sessions = [json.loads(x) for x in (tmp_path / "o" / "sessions.jsonl").read_text().splitlines()]
    assert [s["sent"] for s in sessions] == [10, 10] and len(_lines(tmp_path / "o" / "results.jsonl")) == 20
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["hosts"]["a"]["errors"] == {"connect_error": 10} and report["totals"]["recorded"] == 10
    code, _, err = cli("bench", "--compare", str(tmp_path / "suite.yaml"), str(tmp_path / "suite.yaml"))
    assert code == 2 and "not JSON" in err
