"""An operator's install, outside the source tree: the wheel built from this checkout,
installed without -e into a fresh virtualenv, run from an empty directory. The venv
reuses this environment's packages (torch and the rest are not downloaded again): a .pth
file puts this interpreter's site-packages after the venv's own, so `validator` itself
comes from the wheel and the configs from the installed package, never the checkout.
What `validator init` writes is checked with the real tools: systemd-analyze verify for
the units, promtool check/test rules for the Prometheus rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("install")
    # Build from a copy: an in-tree build would leave build/ and egg-info in the checkout.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "validator", src / "validator",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", tmp / "dist", src], cwd=tmp)
    wheel = next((tmp / "dist").glob("validator-*.whl"))

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "reuse-current-environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VALIDATOR_CONFIG")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # pip comes from this environment, installs into the venv; the editable `validator`
    # of this environment is outside the venv, so pip leaves it alone.
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel],
        cwd=tmp, env=env)
    empty = tmp / "empty"
    empty.mkdir()
    return {"venv": venv, "python": python, "validator": venv / "bin" / "validator", "env": env,
            "cwd": empty, "site": site, "wheel": wheel}


def test_wheel_ships_configs_and_templates(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for name in ("validator/configs/models.yaml", "validator/configs/settings.yaml",
                 "validator/configs/prompts/general.yaml", "validator/configs/network.demo.yaml",
                 "validator/configs/demo.yaml", "validator/configs/calibration/smollm2-135m.json",
                 "validator/configs/network.gemma.yaml", "validator/configs/calibration/gemma-3-270m.json",
                 "validator/deploy/systemd/validator.service", "validator/deploy/prometheus/validator.rules.yml",
                 "validator/py.typed", "validator/migrations/script.py.mako"):
        assert name in names, name


def test_installed_validator_runs_from_an_empty_directory(installed):
    cwd, env, exe = installed["cwd"], installed["env"], installed["validator"]
    where = run([installed["python"], "-c", "import validator; print(validator.__file__)"], cwd, env).stdout
    assert where.strip().startswith(str(installed["site"])), where  # the wheel's copy, not the checkout

    from validator import __version__

    assert run([exe, "--version"], cwd, env).stdout.strip() == f"validator {__version__}"

    models = json.loads(run([exe, "models", "--json"], cwd, env).stdout)
    by_name = {m["model"]: m for m in models}
    assert {"smollm2-135m", "gemma-7b", "gemma-3-270m"} <= set(by_name)
    smol = by_name["smollm2-135m"]
    assert smol["calibrated"] and smol["calibration"].startswith(str(installed["site"]))
    assert by_name["gemma-3-270m"]["calibrated"] and not by_name["gemma-7b"]["calibrated"]

    # The shipped demo bank and settings mix resolve from the package, not the working directory.
    probes = json.loads(run([exe, "probes", "show", "--round", "1", "--host", "h", "--json"], cwd,
                            {**env, "VALIDATOR_SECRET": "s"}).stdout)
    assert len(probes) == 4 and all(p["messages"] for p in probes)
    assert list(cwd.iterdir()) == []  # nothing written where it ran


def test_installed_init_writes_units_and_rules_the_tools_accept(installed):
    cwd, env, exe = installed["cwd"], installed["env"], installed["validator"]
    target = cwd.parent / "prod"
    out = run([exe, "init", target], cwd, env)
    written = [Path(line) for line in out.stdout.split()]
    assert all(p.exists() for p in written) and len(written) == 7
    for secret in ("validator.env", "credentials.yaml"):
        assert (target / secret).stat().st_mode & 0o777 == 0o600
    secret_line = next(l for l in (target / "validator.env").read_text().splitlines()
                       if l.startswith("VALIDATOR_SECRET="))
    assert len(secret_line.split("=", 1)[1]) >= 40

    units = sorted((target / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["validator-serve.service", "validator.service"]
    assert f"ExecStart={exe} run" in (target / "systemd" / "validator.service").read_text()
    verify = run(["systemd-analyze", "verify", *units], cwd, env, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip() and not verify.stdout.strip(), verify

    rules = target / "prometheus" / "validator.rules.yml"
    checked = run(["promtool", "check", "rules", rules], cwd, env, check=False)
    assert checked.returncode == 0 and "SUCCESS: 9 rules found" in checked.stdout, checked
    tested = run(["promtool", "test", "rules", "validator.rules.test.yml"], target / "prometheus", env,
                 check=False)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested

    # The written config loads, with the environment over it (secrets from validator.env).
    envfile = dict(l.split("=", 1) for l in (target / "validator.env").read_text().splitlines()
                   if l and not l.startswith("#"))
    shown = run([installed["python"], "-c", "from validator.service.config import ValidatorConfig as V; "
                 f"c = V.load({str(target / 'validator.yaml')!r}); print(c.database_shown, c.probe_secret() != '', "
                 "c.credentials_file)"], cwd, {**env, **envfile})
    assert shown.stdout.split() == ["postgresql+psycopg://validator@127.0.0.1:5432/validator", "True",
                                    str(target / "credentials.yaml")]

    again = run([exe, "init", target], cwd, env, check=False)
    assert again.returncode == 2 and "exists" in again.stderr  # the secret is not silently replaced


def test_every_alert_has_a_firing_promtool_test():
    """The shipped rule tests fire each alert the rules define (not only some of them)."""
    import yaml

    from validator.deploy import TEMPLATES

    rules = yaml.safe_load((TEMPLATES / "prometheus" / "validator.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((TEMPLATES / "prometheus" / "validator.rules.test.yml").read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
             if not t["exp_alerts"]}
    assert alerts == fired == quiet == {"ValidatorHostFlagged", "ValidatorScoringQueueGrowing",
                                        "ValidatorSilent", "ValidatorProbeErrorRate",
                                        "ValidatorCredentialsRefused"}
