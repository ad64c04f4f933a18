"""Benchmark suites: the YAML a researcher writes, and the probes it expands into.

A suite names prompt sets (the built-in banks, inline prompts or JSONL files), one or
more settings grids (temperature x top_k x top_p x max_tokens), repeats, a seed, the
hosts, the claimed model and the metrics. `expand` turns it into a deterministic list
of probes, each with a stable key (host, prompt set, prompt, settings cell, repeat) and
an explicit seed for the reference's re-run, so that the same suite always means the
same probes and an interrupted run can tell which are done.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from validator.scoring.batch import Message
from validator.service.config import ClientConfig
from validator.probing.probes import Prompt, load_bank
from validator.configs import DIR as CONFIGS, resolve
from validator.models.sampling import API_DEFAULTS, Settings, SettingsError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
BANKS = CONFIGS / "prompts"
METRICS = ("verdicts", "gaps", "latency", "determinism", "compliance", "agreement", "similarity")
DEFAULT_METRICS = [m for m in METRICS if m != "similarity"]  # similarity costs a re-run
SCORED_METRICS = {"verdicts", "gaps", "compliance", "similarity"}  # need the reference model
PLACEHOLDER_TOKEN = "bench"  # bearer token sent to a host without token_env (as the daemon does)


class SuiteError(ValueError):
    """A suite (or its options) that cannot run; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostSpec(_Strict):
    name: str = Field(pattern=NAME)
    url: str
    model: str | None = None  # default: the suite's model
    token_env: str | None = None  # environment variable holding the bearer token
    username_env: str | None = None  # or log in with these (Basic auth, as the API does)
    password_env: str | None = None

    @model_validator(mode="after")
    def _login_pair(self) -> "HostSpec":
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("give both username_env and password_env, or neither")
        return self


class InlinePrompt(_Strict):
    id: str | None = None
    prompt: str | None = None  # one user message
    system: str | None = None  # optional system message before `prompt`
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "InlinePrompt":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either `prompt` (with optional `system`) or `messages`")
        if self.messages is not None and self.system is not None:
            raise ValueError("`system` goes with `prompt`; put it in `messages` instead")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` must not be empty")
        return self

    def to_messages(self) -> list[dict]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.prompt or ""}]


class PromptSet(_Strict):
    """One prompt set: exactly one of `bank`, `inline`, `jsonl`."""
    name: str = Field(pattern=NAME)
    bank: str | None = None  # a built-in bank (`general`) or a bank YAML file
    inline: list[str | InlinePrompt] | None = None
    jsonl: str | None = None  # one {"id"?, "prompt"|"messages", "system"?} per line
    ids: list[str] | None = None  # keep only these prompt ids (in this order)
    kinds: list[str] | None = None  # keep only these kinds (bank prompts)
    limit: int | None = Field(None, ge=1)  # at most this many prompts
    context_words: int = Field(0, ge=0, le=20_000)  # filler words before the last user turn

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSet":
        given = [k for k in ("bank", "inline", "jsonl") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of bank, inline, jsonl"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


def _listify(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class Grid(_Strict):
    """A settings grid: every combination of the listed values (a scalar is a list of one).
    Keys left out take the API's defaults."""
    temperature: list[float] = Field(default_factory=lambda: [API_DEFAULTS["temperature"]], min_length=1)
    top_k: list[int] = Field(default_factory=lambda: [API_DEFAULTS["top_k"]], min_length=1)
    top_p: list[float] = Field(default_factory=lambda: [API_DEFAULTS["top_p"]], min_length=1)
    max_tokens: list[int] = Field(default_factory=lambda: [API_DEFAULTS["max_tokens"]], min_length=1)

    @field_validator("temperature", "top_k", "top_p", "max_tokens", mode="before")
    @classmethod
    def _wrap(cls, value: Any) -> Any:
        return _listify(value)

    @model_validator(mode="after")
    def _valid(self) -> "Grid":
        try:
            self.settings()
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        return self

    def settings(self) -> list[Settings]:
        out = []
        for t, k, p, m in itertools.product(self.temperature, self.top_k, self.top_p, self.max_tokens):
            out.append(Settings.from_configs({"temperature": t, "top_k": k, "top_p": p,
                                              "max_tokens": m}))
        return out


class Suite(_Strict):
    name: str = Field(pattern=NAME)
    description: str = ""
    model: str = "smollm2-135m"  # the model every host claims (a models.yaml name)
    hosts: list[HostSpec] = Field(default_factory=list)  # --hosts replaces them
    prompts: list[PromptSet] = Field(min_length=1)
    settings: list[Grid] = Field(min_length=1)  # one grid or a list of grids
    repeats: int = Field(1, ge=1, le=1000)  # each (prompt, cell) this many times per host
    seed: int = Field(0, ge=0)  # every per-probe seed derives from it
    stream: bool | Literal["mixed"] = "mixed"  # mixed: half streamed, chosen by the seed
    concurrency: int = Field(4, ge=1, le=1000)  # probes in flight at once, over all hosts
    client: ClientConfig = ClientConfig()
    metrics: list[Literal[METRICS]] = Field(default_factory=lambda: list(DEFAULT_METRICS),  # type: ignore[valid-type]
                                            min_length=1)
    alpha: float = Field(1e-4, gt=0, lt=1)  # per-host false-alarm level (Fisher's method)

    @field_validator("settings", mode="before")
    @classmethod
    def _wrap(cls, value: Any) -> Any:
        return _listify(value)

    @model_validator(mode="after")
    def _unique(self) -> "Suite":
        for what, names in (("host", [h.name for h in self.hosts]),
                            ("prompt set", [p.name for p in self.prompts])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what} names must be unique: {', '.join(dup)} repeated")
        return self

    @property
    def scored(self) -> bool:
        return bool(SCORED_METRICS & set(self.metrics))


# --------------------------------------------------------------------------- loading

def _pydantic_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "suite"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def load_suite(path: str | Path) -> tuple[Suite, str]:
    """The suite and its exact text; SuiteError says what is wrong in one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read suite {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SuiteError(f"suite {path}: not valid YAML{where}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"suite {path}: expected a mapping of keys (name, prompts, settings, ...)")
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise SuiteError(f"suite {path}: {_pydantic_message(exc)}") from None
    return suite, text


def parse_hosts(spec: str) -> list[tuple[str, str]]:
    """`NAME=URL,NAME=URL` (the --hosts option)."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise SuiteError(f"--hosts: expected NAME=URL, got {part!r}")
        out.append((name.strip(), url.strip()))
    if not out:
        raise SuiteError("--hosts: no hosts given")
    return out


def with_hosts(suite: Suite, spec: str) -> Suite:
    """The suite with its hosts replaced by --hosts; a host keeping a suite host's name
    keeps its model and credentials' environment variables."""
    known = {h.name: h for h in suite.hosts}
    try:
        hosts = [known[name].model_copy(update={"url": url}) if name in known
                 else HostSpec(name=name, url=url) for name, url in parse_hosts(spec)]
        return Suite.model_validate({**suite.model_dump(), "hosts": [h.model_dump() for h in hosts]})
    except ValidationError as exc:
        raise SuiteError(f"--hosts: {_pydantic_message(exc)}") from None


@dataclass(frozen=True)
class Credentials:
    token: str | None
    username: str | None = None
    password: str | None = None


def credentials(host: HostSpec) -> Credentials:
    """A host's credentials from the environment; a variable the suite names must be set."""
    def env(var: str) -> str:
        value = os.environ.get(var)
        if not value:
            raise SuiteError(f"host {host.name}: environment variable {var} is not set")
        return value

    if host.username_env:
        return Credentials(env(host.token_env) if host.token_env else None,
                           env(host.username_env), env(host.password_env or ""))
    return Credentials(env(host.token_env) if host.token_env else PLACEHOLDER_TOKEN)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if (base / p).exists():
        return base / p
    found = resolve(p)
    return found if found.exists() else base / p


def _bank_path(name: str, base: Path) -> Path:
    if "/" not in name and not name.endswith((".yaml", ".yml")):
        return BANKS / f"{name}.yaml"
    return _resolve(name, base)


def _read_jsonl(path: Path, set_name: str) -> list[Prompt]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"prompt set {set_name}: cannot read {path}: {exc}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            item = InlinePrompt.model_validate({k: v for k, v in raw.items() if k != "kind"}
                                               if isinstance(raw, dict) else raw)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"prompt set {set_name}: {path} line {n}: not JSON: {exc.msg}") from None
        except ValidationError as exc:
            raise SuiteError(f"prompt set {set_name}: {path} line {n}: {_pydantic_message(exc)}") from None
        kind = raw.get("kind", "question") if isinstance(raw, dict) else "question"
        out.append(Prompt(item.id or f"{set_name}-{n}", kind, item.to_messages()))
    return out


def _filler_words() -> list[str]:
    """Neutral filler for long-context sets: the general bank's own texts, in order."""
    words = []
    for p in load_bank(BANKS / "general.yaml"):
        for m in p.messages:
            words += m["content"].split()
    return words


def _with_context(prompt: Prompt, words: int, seed: int, filler: list[str]) -> Prompt:
    start = derive(seed, "context", prompt.id) % len(filler)
    picked = [filler[(start + i) % len(filler)] for i in range(words)]
    messages = [dict(m) for m in prompt.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last]["content"] = ("Some background notes (not all of them are relevant):\n\n"
                                 + " ".join(picked) + "\n\n" + messages[last]["content"])
    return Prompt(prompt.id, prompt.kind, messages)


def resolve_prompts(suite: Suite, base: Path, limit: int | None = None,
                    context_scale: float = 1.0) -> dict[str, list[Prompt]]:
    """Each prompt set's prompts, after its filters and `limit` (a cap on every set);
    `context_scale` multiplies every set's context_words (quick runs of long suites)."""
    out: dict[str, list[Prompt]] = {}
    filler: list[str] | None = None
    for ps in suite.prompts:
        if ps.bank is not None:
            path = _bank_path(ps.bank, base)
            try:
                prompts = load_bank(path)
            except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as exc:
                raise SuiteError(f"prompt set {ps.name}: cannot load bank {path}: {exc}") from None
        elif ps.jsonl is not None:
            prompts = _read_jsonl(_resolve(ps.jsonl, base), ps.name)
        else:
            prompts = []
            for n, item in enumerate(ps.inline or [], start=1):
                item = InlinePrompt(prompt=item) if isinstance(item, str) else item
                prompts.append(Prompt(item.id or f"{ps.name}-{n}", "inline", item.to_messages()))
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            raise SuiteError(f"prompt set {ps.name}: prompt ids repeat")
        if ps.ids is not None:
            by_id = {p.id: p for p in prompts}
            missing = [i for i in ps.ids if i not in by_id]
            if missing:
                raise SuiteError(f"prompt set {ps.name}: no prompt with id {', '.join(missing)}")
            prompts = [by_id[i] for i in ps.ids]
        if ps.kinds is not None:
            prompts = [p for p in prompts if p.kind in ps.kinds]
        for cap in (ps.limit, limit):
            if cap is not None:
                prompts = prompts[:cap]
        if not prompts:
            raise SuiteError(f"prompt set {ps.name}: no prompts left after its filters")
        words = round(ps.context_words * context_scale)
        if words:
            filler = filler or _filler_words()
            prompts = [_with_context(p, words, suite.seed, filler) for p in prompts]
        out[ps.name] = prompts
    return out


def cells(suite: Suite, max_tokens: int | None = None) -> list[Settings]:
    """The distinct settings cells of every grid, in order; `max_tokens` caps each."""
    out: list[Settings] = []
    for grid in suite.settings:
        for s in grid.settings():
            if max_tokens is not None:
                s = replace(s, max_tokens=min(s.max_tokens, max_tokens))
            if s not in out:
                out.append(s)
    return out


def cell_name(s: Settings) -> str:
    return f"T={s.temperature:g} top_k={s.top_k} top_p={s.top_p:g} max={s.max_tokens}"


# --------------------------------------------------------------------------- probes

def derive(seed: int, *parts: Any) -> int:
    """A 31-bit integer from the suite's seed and the parts (stable across machines)."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


@dataclass(frozen=True)
class BenchProbe:
    key: str  # stable id: host, prompt set, prompt, cell, repeat
    host: str
    set: str
    prompt_id: str
    messages: list[dict]
    cell: str
    settings: Settings  # as sent: no seed (the API has none)
    repeat: int
    seed: int  # the reference re-run's seed: shared by every host and repeat of this probe
    stream: bool

    @property
    def group(self) -> tuple[str, str, str]:
        """Repeats of one probe on one host share (set, prompt, cell)."""
        return (self.set, self.prompt_id, self.cell)

    def scoring_configs(self) -> dict:
        return replace(self.settings, seed=self.seed).as_configs()


def expand(suite: Suite, prompts: dict[str, list[Prompt]], grid: list[Settings]) -> list[BenchProbe]:
    """Every probe, hosts interleaved (an interrupted run has touched every host)."""
    if not suite.hosts:
        raise SuiteError("the suite names no hosts; add `hosts:` or pass --hosts NAME=URL,...")
    out = []
    for set_name, plist in prompts.items():
        for prompt in plist:
            for settings in grid:
                cell = cell_name(settings)
                seed = derive(suite.seed, "rerun", set_name, prompt.id, cell)
                for repeat in range(suite.repeats):
                    for host in suite.hosts:
                        ident = [host.name, set_name, prompt.id, cell, repeat]
                        stream = (suite.stream if isinstance(suite.stream, bool)
                                  else derive(suite.seed, "stream", *ident) % 2 == 1)
                        key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
                        out.append(BenchProbe(key, host.name, set_name, prompt.id, prompt.messages,
                                              cell, settings, repeat, seed, stream))
    return out


def fingerprint(suite: Suite, probes: list[BenchProbe], options: dict) -> tuple[str, dict]:
    """What makes two runs the same run: the suite without host URLs or credentials
    (a host may move), the run options, and every probe as it goes on the wire."""
    dump = suite.model_dump(mode="json")
    dump["hosts"] = [{"name": h["name"], "model": h["model"]} for h in dump["hosts"]]
    wire = hashlib.sha256(json.dumps(
        [[p.key, p.messages, p.settings.as_configs(), p.stream, p.seed] for p in probes],
        sort_keys=True).encode()).hexdigest()
    basis = {"suite": dump, "options": options, "probes": wire}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16], basis


__all__ = ["BenchProbe", "Grid", "HostSpec", "METRICS", "PromptSet", "Suite",
           "SuiteError", "cell_name", "cells", "credentials", "derive", "expand", "fingerprint",
           "load_suite", "parse_hosts", "resolve_prompts", "with_hosts"]


# --------------------------------------------------------------------------- a plan

@dataclass
class Plan:
    """A loaded suite with its options applied, ready to run."""
    suite: Suite
    suite_text: str
    suite_path: Path
    probes: list[BenchProbe]
    options: dict
    fingerprint: str
    basis: dict

    @property
    def by_key(self) -> dict[str, BenchProbe]:
        return {p.key: p for p in self.probes}


def plan(suite_path: Path, *, hosts: str | None = None, limit: int | None = None,
         max_tokens: int | None = None, context_scale: float | None = None) -> Plan:
    suite, text = load_suite(suite_path)
    if hosts:
        suite = with_hosts(suite, hosts)
    if limit is not None and limit < 1:
        raise SuiteError("--limit must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise SuiteError("--max-tokens must be at least 1")
    if context_scale is not None and not 0 <= context_scale <= 10:
        raise SuiteError("--context-scale must be between 0 and 10")
    prompts = resolve_prompts(suite, suite_path.resolve().parent, limit,
                              1.0 if context_scale is None else context_scale)
    probes = expand(suite, prompts, cells(suite, max_tokens))
    options = {"limit": limit, "max_tokens": max_tokens, "context_scale": context_scale}
    fp, basis = fingerprint(suite, probes, options)
    return Plan(suite, text, suite_path, probes, options, fp, basis)
