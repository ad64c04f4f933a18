"""The configuration files that ship inside the package: the model registry
(models.yaml), settings mixes (settings.yaml), prompt banks (prompts/), the demo's
network and settings, benchmark suites (suites/) and calibration tolerances.

A relative path a user gives (on the command line or in a config) is looked up in the
working directory first, then here, with or without a leading `configs/`: so
`configs/prompts/general.yaml` names the shipped bank from any directory, installed or
not, while a file of the same name in the working directory wins.
"""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """A file that ships here, e.g. shipped("prompts/general.yaml")."""
    return DIR / name


def resolve(path: str | Path) -> Path:
    """The file a user means by `path` (see the module docstring). A path found nowhere
    comes back as given, so an error message names what the user wrote."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    candidate = DIR.joinpath(*parts) if parts else DIR
    return candidate if candidate.exists() else p
