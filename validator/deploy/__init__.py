"""`validator init DIR`: a production skeleton from the templates beside this file.

- validator.yaml: the config (PostgreSQL URL without its password, the private prompt
  bank's path, the credentials file, the defaults written out);
- validator.env (mode 0600): a fresh probe secret, commented lines for the database URL
  with its password and for host credentials;
- credentials.yaml (mode 0600): the host secrets file, empty;
- systemd/validator.service (`validator run`) and systemd/validator-serve.service;
- prometheus/validator.rules.yml (recording and alert rules) and its promtool tests.

Templates use `${name}` placeholders (string.Template); the Prometheus files are copied
as they are (their own templates use `{{ }}` and `$labels`).
"""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import sys
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent
FILES = {  # written file -> (template, mode, substituted)
    "validator.yaml": ("validator.yaml", 0o644, True),
    "validator.env": ("validator.env", 0o600, True),
    "credentials.yaml": ("credentials.yaml", 0o600, True),
    "systemd/validator.service": ("systemd/validator.service", 0o644, True),
    "systemd/validator-serve.service": ("systemd/validator-serve.service", 0o644, True),
    "prometheus/validator.rules.yml": ("prometheus/validator.rules.yml", 0o644, False),
    "prometheus/validator.rules.test.yml": ("prometheus/validator.rules.test.yml", 0o644, False),
}


def validator_command() -> str:
    """How a unit starts this installation: the `validator` script beside this Python,
    else this Python running the CLI module."""
    script = Path(sys.executable).parent / "validator"
    if script.exists():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m validator.cli"


def init(directory: Path, *, user: str | None = None, instance: str | None = None,
         force: bool = False) -> list[Path]:
    """Write the skeleton into `directory` (created); returns the files written. An
    existing file is an error unless `force` (the secret would change)."""
    directory = directory.expanduser().resolve()
    targets = [directory / name for name in FILES]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists (pass --force to overwrite, which makes a new secret)")
    values = {"directory": str(directory), "user": user or getpass.getuser(),
              "instance": instance or directory.name or "validator",
              "secret": secrets.token_urlsafe(32), "command": validator_command()}
    for target, (template, mode, substituted) in zip(targets, FILES.values()):
        target.parent.mkdir(parents=True, exist_ok=True)
        text = (TEMPLATES / template).read_text()
        if substituted:
            text = Template(text).substitute(values)
        # Created with its mode, so a secret is never readable by others, not even briefly.
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(target, mode)  # whatever the umask
    (directory / "prompts").mkdir(exist_ok=True)
    return targets


def next_steps(directory: Path) -> str:
    d = directory.expanduser().resolve()
    return "\n".join([
        f"1. Write your private prompt bank to {d}/prompts/private.yaml (the shipped bank is public).",
        f"2. Set VALIDATOR_DATABASE (with its password) in {d}/validator.env, and host credentials "
        f"in {d}/credentials.yaml or VALIDATOR_CRED_* lines there.",
        f"3. validator db upgrade --config {d}/validator.yaml   (with validator.env loaded)",
        f"4. cp {d}/systemd/*.service /etc/systemd/system/ && systemctl daemon-reload && "
        "systemctl enable --now validator validator-serve",
        f"5. Give Prometheus {d}/prometheus/validator.rules.yml (promtool test rules "
        f"{d}/prometheus/validator.rules.test.yml checks it).",
    ])
