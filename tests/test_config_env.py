"""Configuration from the environment: every key can be set by a VALIDATOR_ variable
(nested keys joined by __), over the config file; --db over both. The database password
never appears in what a command prints or logs. The commands run as an operator runs
them (subprocesses), on the local PostgreSQL, which accepts any password here (trust
auth): so a password in the URL is accepted and must still be masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from validator.service.config import ValidatorConfig, redact_url

from .conftest import PG_URL, fresh_postgres_database

PASSWORD = "hunter2-do-not-print"


def test_environment_overrides_nested_keys_over_the_file(tmp_path, monkeypatch):
    path = tmp_path / "validator.yaml"
    path.write_text(yaml.safe_dump({"database": "file.db", "rounds": {"interval_s": 60, "probes_per_host": 3},
                                    "serve": {"llm": {"max_pairs": 8}}}))
    monkeypatch.setenv("VALIDATOR_ROUNDS__PROBES_PER_HOST", "7")
    monkeypatch.setenv("VALIDATOR_SERVE__LLM__WEIGHTS__COSINE", "0.5")
    monkeypatch.setenv("VALIDATOR_HOSTS", json.dumps([{"name": "h", "url": "http://h/v1", "model": "m"}]))
    monkeypatch.setenv("VALIDATOR_DATABASE", f"postgresql+psycopg://v:{PASSWORD}@db:5432/validator")
    cfg = ValidatorConfig.load(path)
    assert cfg.rounds.probes_per_host == 7 and cfg.rounds.interval_s == 60  # file keys beside it stay
    assert cfg.serve.llm.max_pairs == 8 and cfg.serve.llm.weights["cosine"] == 0.5 and cfg.serve.llm.weights["judge"] == 0.25
    assert [h.name for h in cfg.hosts] == ["h"]
    assert cfg.database_url.endswith("@db:5432/validator") and PASSWORD not in cfg.database_shown
    assert ValidatorConfig.load(path, database="other.db").database.endswith("other.db")  # --db wins

    monkeypatch.setenv("VALIDATOR_ROUNDS__PROBES_PER_HOTS", "2")  # a typo is an error, not ignored
    with pytest.raises(ValueError, match="probes_per_hots"):
        ValidatorConfig.load(path)


def test_redact_url():
    assert redact_url(f"postgresql+psycopg://v:{PASSWORD}@db/x") == "postgresql+psycopg://v:***@db/x"
    assert redact_url("/var/lib/validator.db") == "/var/lib/validator.db"
    assert PASSWORD not in redact_url(f"not a url://v:{PASSWORD}@")


def cli(*args, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "validator.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_database_url_from_the_environment_is_used_and_never_printed(tmp_path):
    config = tmp_path / "validator.yaml"
    config.write_text(yaml.safe_dump({"database": str(tmp_path / "not-used.db"), "hosts": [],
                                      "rounds": {"interval_s": 1e9, "jitter_s": 0}, "scoring": {"interval_s": 1}}))
    with fresh_postgres_database() as name:
        url = PG_URL.format(db=name).replace("postgres@", f"postgres:{PASSWORD}@")
        env = {**os.environ, "VALIDATOR_DATABASE": url, "VALIDATOR_SECRET": "s", "VALIDATOR_CONFIG": str(config),
               "VALIDATOR_ROUNDS__PROBES_PER_HOST": "2"}
        runs = [cli("db", "upgrade", env=env, cwd=tmp_path),
                cli("-v", "run", "--rounds", "1", "--instance", "env-test", env=env, cwd=tmp_path),
                cli("status", env=env, cwd=tmp_path),
                cli("status", "--json", env=env, cwd=tmp_path),
                cli("hosts", "list", env=env, cwd=tmp_path)]
        for r in runs:
            assert r.returncode == 0, r.stdout + r.stderr
            assert PASSWORD not in r.stdout + r.stderr
        assert f"postgres:***@127.0.0.1:5432/{name}" in runs[0].stderr  # db upgrade names it, masked
        assert f"postgres:***@127.0.0.1:5432/{name}" in runs[1].stderr  # so does the daemon at start
        assert [v["name"] for v in json.loads(runs[3].stdout)["validators"]] == ["env-test"]  # it ran there
        assert not (tmp_path / "not-used.db").exists()

        probes = cli("probes", "show", "--round", "1", "--host", "h", "--json", env=env, cwd=tmp_path)
        assert len(json.loads(probes.stdout)) == 2  # a nested key from the environment

        # --db wins over the environment.
        other = cli("db", "upgrade", "--db", str(tmp_path / "cli.db"), env=env, cwd=tmp_path)
        assert other.returncode == 0 and (tmp_path / "cli.db").exists()
