"""Prompt banks, settings mixes, and what a probe is and when it leaves.

Banks: YAML (`prompts: [{id, kind, messages}]`, as the shipped ones in
validator/configs/prompts/), JSONL (one `{"messages": [...]}` object a line, e.g.
exported user requests, `id` optional), or a directory of such files; `load_bank` takes
one or several. The shipped banks are public (demo and tests): a host can match their
prompts, so a deployed validator uses private banks (`validator probes import`).
docs/probes.md says why each choice here is made.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from validator.configs import DIR as SHIPPED, resolve, shipped
from validator.models.sampling import MAX_TOKENS_LIMIT, Settings
from validator.probing.client import ROLES

SETTINGS_FILE = shipped("settings.yaml")
SHIPPED_BANKS = shipped("prompts")
CHECKOUT = SHIPPED.parent.parent  # a source checkout's root (tests/, docs/ ... when present)
BANK_SUFFIXES = (".yaml", ".yml", ".jsonl")

# The API's documented ranges (docs/probes.md): temperature's "common range" 0-1, top_k
# 1-1000, top_p up to 1, max_tokens up to the limit. Nothing outside them leaves as a
# probe: a value no user can send marks the request.
DOCUMENTED = {"temperature": (0.0, 1.0), "top_k": (1, 1000), "top_p": (0.0, 1.0),
              "max_tokens": (1, MAX_TOKENS_LIMIT)}


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    messages: list[dict]


# ------------------------------------------------------------------------------ banks

def message_problem(messages: object) -> str | None:
    """Why `messages` is not a request a user could send (None: it is one): a list of
    {role, content} with roles as the API allows, a system message only first, the
    user's turn last, no empty content."""
    if not isinstance(messages, list) or not messages:
        return "no messages list"
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and set(m) == {"role", "content"} and isinstance(m["content"], str)):
            return "bad message (needs exactly role and string content)"
        if m["role"] not in ROLES:
            return f"bad role {str(m['role'])[:40]!r}"
        if m["role"] == "system" and i:
            return "system message not first"
        if not m["content"].strip():
            return "empty content"
    if messages[-1]["role"] != "user":
        return "last message not from the user"
    return None


def messages_key(messages: list[dict]) -> str:
    """Identity of a conversation (for de-duplication and ids)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def content_id(messages: list[dict]) -> str:
    return "p-" + hashlib.sha256(messages_key(messages).encode()).hexdigest()[:12]


def bank_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The bank files `paths` names: files as given, directories' bank files (sorted,
    recursively)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no prompt bank configured")
    out = []
    for given in paths:
        path = resolve(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in BANK_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"prompt bank directory {path} holds no {'/'.join(BANK_SUFFIXES)} file")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ValueError(f"no prompt bank at {path}")
    return out


def _read_bank_file(path: Path) -> list[Prompt]:
    def checked(where: str, pid: object, kind: object, messages: object) -> Prompt:
        problem = message_problem(messages)
        if problem:
            raise ValueError(f"{where}: {problem}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        return Prompt(str(pid) if pid is not None else content_id(msgs), str(kind), msgs)

    if path.suffix == ".jsonl":
        out = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{n}: not a JSON object")
                out.append(checked(f"{path}:{n}", obj.get("id"), obj.get("kind", "request"),
                                   obj.get("messages")))
        return out
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompts"), list):
        raise ValueError(f"{path}: a YAML bank needs a `prompts:` list")
    return [checked(f"{path}: prompt {i}", p.get("id") if isinstance(p, dict) else None,
                    p.get("kind", "question") if isinstance(p, dict) else None,
                    p.get("messages") if isinstance(p, dict) else None)
            for i, p in enumerate(raw["prompts"])]


def load_bank(paths: str | Path | Sequence[str | Path]) -> list[Prompt]:
    """Every prompt of the banks `paths` names, in order; a conversation given twice is
    kept once, an id given to two different conversations is an error."""
    prompts: list[Prompt] = []
    ids: dict[str, str] = {}
    seen: set[str] = set()
    for path in bank_files(paths):
        for p in _read_bank_file(path):
            key = messages_key(p.messages)
            if key in seen:
                continue
            if p.id in ids:
                raise ValueError(f"{path}: prompt id {p.id!r} is used twice ({ids[p.id]})")
            seen.add(key)
            ids[p.id] = str(path)
            prompts.append(p)
    if not prompts:
        raise ValueError(f"no prompts in {', '.join(map(str, bank_files(paths)))}")
    return prompts


@dataclass
class ImportReport:
    """What `import_requests` kept and dropped (reason -> count, with the first line
    number of each reason)."""
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_line: dict[str, int] = field(default_factory=dict)
    settings: Counter = field(default_factory=Counter)  # Settings -> requests that sent them

    def drop(self, reason: str, line: int) -> None:
        self.dropped[reason] += 1
        self.first_line.setdefault(reason, line)

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped.most_common()),
                "first_line": self.first_line, "settings_seen": sum(self.settings.values())}


def import_requests(lines: Iterable[str], *, min_chars: int = 1, max_chars: int = 8000,
                    max_messages: int = 32) -> tuple[list[Prompt], ImportReport]:
    """A bank from recorded user requests: one JSON object a line with the request's
    `messages` (other keys, such as `configs`, are ignored). Lines that are not a request
    a user could send, that are too short or too long (characters over all messages), or
    that repeat an earlier conversation are dropped and counted by reason. The settings
    of every well-formed request with `configs` within the documented ranges are counted
    (`report.settings`, for `write_mix`)."""
    report = ImportReport()
    kept: list[Prompt] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        report.read += 1
        try:
            obj = json.loads(line)
        except ValueError:
            report.drop("not JSON", n)
            continue
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(obj.get("configs"), dict):
            try:
                settings = Settings.from_configs({k: v for k, v in obj["configs"].items() if k != "seed"})
                if not outside_documented(settings):
                    report.settings[settings] += 1
            except ValueError:
                pass
        problem = message_problem(messages)
        if problem:
            report.drop(problem.split(" (")[0] if problem.startswith("bad message") else
                        "bad role" if problem.startswith("bad role") else problem, n)
            continue
        chars = sum(len(m["content"]) for m in messages)
        if len(messages) > max_messages:
            report.drop(f"more than {max_messages} messages", n)
        elif chars < min_chars:
            report.drop(f"shorter than {min_chars} characters", n)
        elif chars > max_chars:
            report.drop(f"longer than {max_chars} characters", n)
        else:
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
            key = messages_key(msgs)
            if key in seen:
                report.drop("duplicate", n)
                continue
            seen.add(key)
            kept.append(Prompt(content_id(msgs), "request", msgs))
    report.kept = len(kept)
    return kept, report


def write_bank(prompts: Sequence[Prompt], path: str | Path) -> None:
    """A bank file: JSONL for a .jsonl name, else YAML (load_bank reads both)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for p in prompts:
                fh.write(json.dumps({"id": p.id, "kind": p.kind, "messages": p.messages},
                                    ensure_ascii=False) + "\n")
        else:
            yaml.safe_dump({"name": path.stem, "prompts": [
                {"id": p.id, "kind": p.kind, "messages": p.messages} for p in prompts]},
                fh, allow_unicode=True, sort_keys=False, width=100)
    tmp.replace(path)


def write_mix(settings: Counter, path: str | Path, name: str = "imported", most: int = 50) -> int:
    """A settings file with one mix, `name`: the `most` most common settings users sent,
    weighted by how often (what `settings_file:` and `settings_mix:` can name). Returns
    the entries written."""
    entries = [{"weight": n, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                "max_tokens": s.max_tokens} for s, n in settings.most_common(most)]
    if not entries:
        raise ValueError("no request carried settings within the documented ranges")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Settings users sent (validator probes import --mix-out).\n"
                    + yaml.safe_dump({"mixes": {name: entries}}, sort_keys=False))
    return len(entries)


def shipped_in_repository(bank: Sequence[Prompt], secret: str) -> list[str]:
    """Warnings for a deployed validator whose probes anyone can know: prompts that ship
    in this repository's banks, or a probe secret written in the repository (the demo's,
    the tests'). Each says how to fix it."""
    out = []
    public = {messages_key(p.messages) for p in load_bank(SHIPPED_BANKS)}
    shipped = sum(messages_key(p.messages) in public for p in bank)
    if shipped:
        out.append(f"{shipped} of the {len(bank)} probe prompts ship in this repository "
                   f"({SHIPPED_BANKS.relative_to(CHECKOUT)}/), which is public: hosts can "
                   "recognise them and answer those honestly. Build a private bank from your "
                   "users' requests (validator probes import REQUESTS.jsonl --out BANK.jsonl) and "
                   "point `prompts:` in the config at it (docs/probes.md).")
    where = _repository_file_containing(secret)
    if where:
        out.append(f"the probe secret is written in this repository ({where}): anyone can "
                   "derive your probes and their times. Set VALIDATOR_SECRET to a long random "
                   "value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'.")
    return out


def _repository_file_containing(text: str, max_bytes: int = 2 << 20) -> str | None:
    for root in (SHIPPED, *(CHECKOUT / top for top in ("tests", "docs", "benchmarks", "examples", "README.md"))):
        for path in ([root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []):
            if path.is_file() and path.stat().st_size <= max_bytes and path.suffix in (
                    ".yaml", ".yml", ".py", ".md", ".json", ".toml", ".txt"):
                if text in path.read_text(encoding="utf-8", errors="replace"):
                    return str(path.relative_to(CHECKOUT))
    return None


# ------------------------------------------------------------------------------ settings

def load_mix(name: str = "default", path: str | Path = SETTINGS_FILE) -> list[tuple[float, Settings]]:
    """The mix `name` as (weight, settings) pairs. An entry whose values are lists stands
    for every combination of them, sharing its weight equally (a value listed twice
    counts twice): a spread of settings, as users' own are, rather than a few fixed
    combinations a host could learn."""
    raw = yaml.safe_load(resolve(path).read_text())["mixes"]
    if name not in raw:
        raise ValueError(f"no settings mix {name!r} in {path} (there: {', '.join(raw)})")
    out = []
    for entry in raw[name]:
        weight = float(entry.get("weight", 1))
        choices = [[(k, x) for x in (v if isinstance(v, list) else [v])]
                   for k, v in entry.items() if k != "weight"]
        if any(not c for c in choices):
            raise ValueError(f"settings mix {name!r}: an empty list of values in {entry}")
        combos = list(itertools.product(*choices))
        out += [(weight / len(combos), Settings.from_configs(dict(c))) for c in combos]
    return out


def outside_documented(settings: Settings) -> list[str]:
    """The settings that lie outside the API's documented ranges (empty: none)."""
    out = []
    for key, (lo, hi) in DOCUMENTED.items():
        value = getattr(settings, key)
        if not lo <= value <= hi:
            out.append(f"{key}={value} (documented {lo}-{hi})")
    if settings.top_p <= 0:
        out.append(f"top_p={settings.top_p} (documented above 0)")
    return out


def load_probe_mix(name: str, path: str | Path = SETTINGS_FILE) -> list[tuple[float, Settings]]:
    """A mix the daemon may send: every entry within the documented ranges."""
    mix = load_mix(name, path)
    for i, (_, s) in enumerate(mix):
        bad = outside_documented(s)
        if bad:
            raise ValueError(f"settings mix {name!r} entry {i}: {', '.join(bad)}; probes must "
                             "carry settings a user can send")
    return mix


def draw_settings(mix: list[tuple[float, Settings]], rng: random.Random) -> Settings:
    weights, settings = zip(*mix)
    return rng.choices(settings, weights=weights, k=1)[0]


def greedy_and_sampled(prompts: list[Prompt], mix: list[tuple[float, Settings]],
                       seed: int) -> list[tuple[Prompt, Settings]]:
    """Each prompt once with a greedy setting and once with a sampled one, drawn from the
    mix with a fixed seed (sampled settings carry their own seed)."""
    rng = random.Random(seed)
    greedy = [(w, s) for w, s in mix if s.greedy]
    sampled = [(w, s) for w, s in mix if not s.greedy]
    out = []
    for p in prompts:
        out.append((p, draw_settings(greedy, rng)))
        s = draw_settings(sampled, rng)
        out.append((p, Settings(**{**s.__dict__, "seed": rng.randrange(2**31)})))
    return out


# ------------------------------------------------------------------------------ probes

@dataclass(frozen=True)
class Probe:
    """One probe as the daemon sends it. `configs` are the settings sent (no seed: the
    API has none, and a seed would mark the request as a probe; the client lays them
    out as the network's own client does). The validator's own re-run derives its seed
    from the content (validator.scoring.batch.rerun_seed), so every validator re-runs a
    probe alike."""
    id: str
    round: int
    host: str
    index: int
    prompt_id: str
    messages: list[dict]
    configs: dict
    stream: bool

    @property
    def wire_settings(self) -> Settings:
        """The settings as sent (no seed)."""
        return Settings.from_configs(self.configs)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _keyed_rng(secret: str, *parts: object) -> random.Random:
    """A generator only the secret's holder can predict (HMAC-SHA256 keys it)."""
    if not secret:
        raise ValueError("a validator secret is required to derive probes")
    message = "\0".join(map(str, parts)).encode()
    return random.Random(hmac.new(secret.encode(), message, hashlib.sha256).digest())


def derive_probes(secret: str, round_no: int, host: str, bank: list[Prompt],
                  mix: list[tuple[float, Settings]], count: int) -> list[Probe]:
    """The probes of (secret, round, host): reproducible by whoever holds the secret,
    unpredictable to hosts (HMAC-SHA256 keys the draw), distinct prompts within a round."""
    if count < 1 or count > len(bank):
        raise ValueError(f"count must be between 1 and the bank's {len(bank)} prompts")
    rng = _keyed_rng(secret, "probes", round_no, host)
    out = []
    for index, prompt in enumerate(rng.sample(bank, count)):
        settings = draw_settings(mix, rng)
        configs = {k: v for k, v in settings.as_configs().items() if k != "seed"}
        probe_id = hmac.new(secret.encode(), f"id\0{round_no}\0{host}\0{index}".encode(),
                            hashlib.sha256).hexdigest()[:16]
        out.append(Probe(probe_id, round_no, host, index, prompt.id, prompt.messages, configs,
                         stream=rng.random() < 0.5))
    return out


def account_index(secret: str, probe_id: str, accounts: int) -> int:
    """Which of `accounts` accounts probe `probe_id` goes out under: keyed, so a host
    cannot tell which of its callers' accounts are the validator's by when each is
    used, and fixed per probe, so a probe resent after a restart keeps its account."""
    return _keyed_rng(secret, "account", probe_id).randrange(accounts) if accounts > 1 else 0


# ------------------------------------------------------------------------------ timing

def schedule_phase(secret: str, interval_s: float) -> float:
    """Where this validator's rounds start within the clock's intervals, in [0,
    interval_s): keyed by the secret, so validators' rounds are not aligned on a public
    clock (round r starts at r * interval_s + phase)."""
    return _keyed_rng(secret, "phase").random() * interval_s


def arrival_offsets(secret: str, round_no: int, host: str, count: int, window_s: float) -> list[float]:
    """Seconds after its round's start at which each of a host's `count` probes leaves
    (by probe index): independent uniform times in [0, window_s), which is a Poisson
    process of rate count / window_s given its count, so no two probes leave together
    and no boundary is visible in their times."""
    rng = _keyed_rng(secret, "times", round_no, host)
    return sorted(rng.uniform(0.0, window_s) for _ in range(count)) if window_s > 0 else [0.0] * count


def catch_up(due: Sequence[float], now: float, mean_gap_s: float, rng: random.Random) -> list[float]:
    """Departure times for probes whose time has passed (a restart, a late claim): from
    `now` on, exponential gaps of `mean_gap_s` between them (the configured rate),
    never a burst. Times still ahead stay as they are."""
    out, t = [], now
    for d in due:
        if d >= now:
            out.append(d)
        else:
            t += rng.expovariate(1.0 / mean_gap_s) if mean_gap_s > 0 and math.isfinite(mean_gap_s) else 0.0
            out.append(t)
    return out
