"""The credentials the validator presents to hosts.

They come only from two places the operator controls, never from a name an API caller
chooses (an admin token must not make the daemon send `VALIDATOR_SECRET`, or any other
variable, to a URL of its choosing):

- environment variables with a fixed prefix, per credentials key KEY (a host's
  `credentials`, default its name; upper-cased, every character other than A-Z and 0-9
  written as `_`): VALIDATOR_CRED_<KEY>_TOKEN, _REFRESH_TOKEN, _USERNAME, _PASSWORD;
- a secrets file (`credentials_file`, YAML, readable by its owner only): a mapping of
  KEY to {token, refresh_token, username, password}, or to a list of them: a pool of
  accounts, one of which each probe goes out under (`accounts_for`), so that no one
  account carries every probe a host receives.

The environment wins over the file, field by field; a pool lives in the file alone. A
host without credentials gets requests without an Authorization header.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

PREFIX = "VALIDATOR_CRED_"
FIELDS = ("token", "refresh_token", "username", "password")


class CredentialsError(ValueError):
    """An unusable secrets file or credential set; the message names what to fix."""


@dataclass(frozen=True)
class HostCredentials:
    token: str | None = None
    refresh_token: str | None = None
    username: str | None = None
    password: str | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in FIELDS)


def env_name(key: str, field: str) -> str:
    """The environment variable of one field of credentials key `key`."""
    return PREFIX + re.sub(r"[^A-Z0-9]", "_", key.upper()) + "_" + field.upper()


def read_secrets_file(path: str | Path) -> dict[str, dict[str, str] | list[dict[str, str]]]:
    """KEY -> {field: value}, or KEY -> a pool [{field: value}, ...]. The file must map
    keys to credentials with known fields, and not be readable by group or others."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"credentials file {path} is readable by others (mode "
                               f"{stat.S_IMODE(mode):o}): chmod 600 it")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CredentialsError(f"credentials file {path}: expected a mapping of keys to credentials")
    out = {}
    for key, entry in raw.items():
        accounts = entry if isinstance(entry, list) else [entry]
        if not accounts or not all(isinstance(a, dict) and not set(a) - set(FIELDS) for a in accounts):
            raise CredentialsError(f"credentials file {path}: {key!r} must map to some of "
                                   f"{', '.join(FIELDS)}, or to a non-empty list of such accounts")
        if not all(isinstance(v, str) for a in accounts for v in a.values()):
            raise CredentialsError(f"credentials file {path}: the values of {key!r} must be strings")
        out[str(key)] = entry
    return out


def credentials_for(key: str, secrets: Mapping[str, Mapping[str, str]] | None = None,
                    environ: Mapping[str, str] | None = None) -> HostCredentials:
    """The credentials of key `key`: the environment over the secrets file."""
    environ = os.environ if environ is None else environ
    entry = (secrets or {}).get(key, {})
    if isinstance(entry, list):
        raise CredentialsError(f"credentials {key!r} are a pool of {len(entry)} accounts: read them "
                               "with accounts_for")
    values = {f: environ.get(env_name(key, f)) or entry.get(f) or None for f in FIELDS}
    return _checked(repr(key), HostCredentials(**values),
                    f" ({env_name(key, 'username')}, {env_name(key, 'password')})")


def accounts_for(key: str, secrets: Mapping[str, object] | None = None,
                 environ: Mapping[str, str] | None = None) -> list[HostCredentials]:
    """The accounts of key `key`: its pool from the secrets file, or its one set of
    credentials (environment over file; empty credentials when there are none)."""
    environ = os.environ if environ is None else environ
    entry = (secrets or {}).get(key)
    if not isinstance(entry, list):
        return [credentials_for(key, secrets, environ)]
    overridden = [env_name(key, f) for f in FIELDS if environ.get(env_name(key, f))]
    if overridden:
        raise CredentialsError(f"credentials {key!r} are a pool of {len(entry)} accounts in the "
                               f"secrets file: set its accounts there, not {', '.join(overridden)}")
    return [_checked(f"{key!r} account {i + 1}", HostCredentials(**{f: a.get(f) or None for f in FIELDS}))
            for i, a in enumerate(entry)]


def _checked(name: str, creds: HostCredentials, where: str = "") -> HostCredentials:
    if (creds.username is None) != (creds.password is None):
        raise CredentialsError(f"credentials {name}: give both username and password{where}, or neither")
    return creds
