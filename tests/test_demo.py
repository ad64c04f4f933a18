"""A reduced `validator demo` (fewer hosts, two rounds; the real daemon, simulated hosts
on loopback, SmolLM2 reference), then the admin CLI on the database it leaves."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from validator.cli import app
from validator.configs import shipped

HOSTS = [
    {"name": "honest-llama-cpp", "strategy": "honest-llama.cpp"},
    {"name": "honest-transformers", "strategy": "honest-transformers"},
    {"name": "cheat-other-model", "strategy": "other-model"},
    {"name": "cheat-replayed", "strategy": "replayed"},
    {"name": "fault-500", "strategy": "server-error"},
    {"name": "fault-stream-cut", "strategy": "stream-cut"},
]
runner = CliRunner()


def copy_db(src: Path, dst: Path) -> str:
    """A consistent copy of a SQLite database in WAL mode (the file alone may lag)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return str(dst)


def cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory, hosts):  # `hosts` loads the engines the simulated hosts share
    tmp = tmp_path_factory.mktemp("demo")
    network = tmp / "network.yaml"
    network.write_text(yaml.safe_dump({"model": "smollm2-135m", "hosts": HOSTS}))
    demo = yaml.safe_load(shipped("demo.yaml").read_text())
    demo.update(network=str(network), rounds=2, database=str(tmp / "demo.db"))
    config = tmp / "demo.yaml"
    config.write_text(yaml.safe_dump(demo))
    result = cli("demo", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    return tmp / "demo.db", rows


def test_reduced_demo_trusts_the_honest_and_flags_every_cheat(demo_db):
    _, rows = demo_db
    by_host = {r["host"]: r for r in rows}
    assert set(by_host) == {h["name"] for h in HOSTS}
    for name, r in by_host.items():
        assert {"host", "state", "score", "probes"} <= set(r)
        assert r["probes"] == 2 * 4  # two rounds of four probes, each recorded once
        if name.startswith("honest-"):
            assert r["state"] == "trusted", r
            assert r["errors"] == 0 and r["scored"] == 8
        elif name.startswith("cheat-"):
            assert r["state"] == "flagged" and r["score"] == 0.0, r
        else:  # faults: every probe an error, nothing to score, availability zero
            assert r["errors"] == 8 and r["scored"] == 0 and r["state"] == "new", r
            assert r["score"] == 0.0
    assert by_host["honest-llama-cpp"]["score"] > 0.5


def test_demo_rounds_are_numbered_from_the_config_so_probes_repeat(demo_db):
    """configs/demo.yaml's first_round numbers the rounds instead of the clock: every
    demo run sends exactly the probes derived for rounds 1 and 2."""
    from validator.service.config import ValidatorConfig
    from validator.probing.probes import derive_probes, load_bank, load_mix

    db, _ = demo_db
    demo = yaml.safe_load(shipped("demo.yaml").read_text())
    assert demo["first_round"] == 1
    cfg = ValidatorConfig.model_validate({**demo["validator"], "hosts": []})
    bank, mix = load_bank(cfg.prompts), load_mix(cfg.settings_mix)
    with sqlite3.connect(db) as c:
        sent = set(c.execute("select hosts.name, probes.round, probes.id from probes "
                             "join hosts on hosts.id = probes.host_id").fetchall())
    expected = {(h["name"], r, p.id) for h in HOSTS for r in (1, 2)
                for p in derive_probes(cfg.probe_secret(), r, h["name"], bank, mix, 4)}
    assert sent == expected


def test_hosts_list_and_show(demo_db):
    db, rows = demo_db
    listed = json.loads(cli("hosts", "list", "--db", str(db), "--json").stdout)
    assert [(r["host"], r["state"]) for r in listed] == [(r["host"], r["state"]) for r in rows]
    table = cli("hosts", "list", "--db", str(db)).stdout
    assert "cheat-other-model" in table and "flagged" in table
    shown = cli("hosts", "show", "cheat-other-model", "--db", str(db)).stdout
    assert "new -> flagged" in shown and "1/alpha" in shown  # the change and its evidence
    assert "fail" in shown  # recent verdicts with reasons
    missing = cli("hosts", "show", "nobody", "--db", str(db))
    assert missing.exit_code == 2


def test_admin_changes_are_recorded(demo_db, tmp_path):
    d = copy_db(demo_db[0], tmp_path / "admin.db")  # the other tests expect the demo's as it was
    assert cli("hosts", "release", "cheat-other-model", "--db", d, "--note", "appealed").exit_code == 0
    assert cli("hosts", "release", "honest-llama-cpp", "--db", d).exit_code != 0  # not flagged
    assert cli("hosts", "disable", "fault-500", "--db", d, "--note", "broken").exit_code == 0
    assert cli("hosts", "add", "newcomer", "http://127.0.0.1:9/v1", "--model", "smollm2-135m",
               "--db", d).exit_code == 0
    assert cli("hosts", "add", "newcomer", "http://x/v1", "--model", "smollm2-135m", "--db", d).exit_code != 0
    assert cli("hosts", "remove", "fault-stream-cut", "--db", d).exit_code == 0
    states = {r["host"]: r["state"] for r in json.loads(cli("hosts", "list", "--db", d, "--json").stdout)}
    assert states["cheat-other-model"] == "probation" and states["fault-500"] == "disabled"
    assert states["newcomer"] == "new" and "fault-stream-cut" not in states
    history = cli("hosts", "show", "cheat-other-model", "--db", d).stdout
    assert "flagged -> probation" in history and "appealed" in history


def test_feedback_moves_the_score(demo_db, tmp_path):
    db = copy_db(demo_db[0], tmp_path / "fb.db")
    export = json.loads(cli("export", "--format", "json", "--db", str(db)).stdout)
    probe = next(r for r in export if r["host"] == "honest-llama-cpp")
    before = next(r for r in demo_db[1] if r["host"] == "honest-llama-cpp")["score"]
    result = cli("feedback", probe["probe_id"], "--rating", "1", "--note", "wrong answer", "--db", str(db))
    assert result.exit_code == 0, result.output
    after = {r["host"]: r["score"] for r in json.loads(cli("hosts", "list", "--db", str(db), "--json").stdout)}
    assert after["honest-llama-cpp"] < before
    assert cli("feedback", probe["probe_id"], "--rating", "9", "--db", str(db)).exit_code != 0
    assert "wrong answer" in cli("hosts", "show", "honest-llama-cpp", "--db", str(db)).stdout


def test_export_csv_and_json_agree(demo_db):
    db = str(demo_db[0])
    rows = json.loads(cli("export", "--format", "json", "--db", db).stdout)
    out = Path(db).with_suffix(".csv")  # a file: CliRunner's stdout folds \r\n into \n
    assert cli("export", "--format", "csv", "--db", db, "--out", str(out)).exit_code == 0
    with out.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(rows) == len(table) == 6 * 8
    assert [r["probe_id"] for r in rows] == [r["probe_id"] for r in table]
    assert [r["text"] or "" for r in rows] == [r["text"] for r in table]  # answers survive exactly
    assert {r["verdict"] for r in rows if r["host"].startswith("cheat-")} >= {"fail"}
    # the honest hosts' answers all pass the audit (`validator audit`'s scorer, via the daemon)
    assert {r["verdict"] for r in rows if r["host"].startswith("honest-")} <= {"pass", "inconclusive"}
    assert cli("export", "--format", "xml", "--db", db).exit_code != 0


def test_status_shows_the_stopped_demo_validator(demo_db):
    st = json.loads(cli("status", "--db", str(demo_db[0]), "--json").stdout)
    assert st["queue_depth"] == 0 and st["last_round"] is not None
    assert [(v["name"], v["state"]) for v in st["validators"]] == [("demo", "stopped")]
    assert cli("status", "--db", str(Path(demo_db[0]).with_name("missing.db"))).exit_code == 2


def test_probes_show_is_reproducible_and_host_specific(tmp_path):
    config = tmp_path / "v.yaml"
    config.write_text(yaml.safe_dump({"secret": "s3cret", "rounds": {"probes_per_host": 3}}))
    show = lambda *a: json.loads(cli("probes", "show", "--config", str(config), "--json", *a).stdout)  # noqa: E731
    a = show("--round", "7", "--host", "h1")
    assert a == show("--round", "7", "--host", "h1") and len(a) == 3
    assert a != show("--round", "8", "--host", "h1") and a != show("--round", "7", "--host", "h2")
    assert all("seed" not in p["configs"] for p in a)  # nothing on the wire marks a probe
    assert len({p["prompt_id"] for p in a}) == 3
