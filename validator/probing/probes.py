"""Prompt banks and settings mixes (YAML; the shipped ones are in validator/configs/)."""

from __future__ import annotations

import hashlib
import hmac
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from validator.configs import resolve, shipped
from validator.models.sampling import Settings

SETTINGS_FILE = shipped("settings.yaml")


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    messages: list[dict]


def load_bank(path: str | Path) -> list[Prompt]:
    raw = yaml.safe_load(resolve(path).read_text())
    return [Prompt(p["id"], p.get("kind", "question"),
                   [{"role": m["role"], "content": m["content"]} for m in p["messages"]])
            for p in raw["prompts"]]


def load_mix(name: str = "default", path: str | Path = SETTINGS_FILE) -> list[tuple[float, Settings]]:
    raw = yaml.safe_load(resolve(path).read_text())["mixes"][name]
    return [(float(e.get("weight", 1)), Settings.from_configs({k: v for k, v in e.items() if k != "weight"}))
            for e in raw]


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


@dataclass(frozen=True)
class Probe:
    """One probe as the daemon sends it. `configs` is exactly what goes on the wire (no
    seed: the API has none, and a seed would mark the request as a probe). The
    validator's own re-run derives its seed from the content
    (validator.scoring.batch.rerun_seed), so every validator re-runs a probe alike."""
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


def derive_probes(secret: str, round_no: int, host: str, bank: list[Prompt],
                  mix: list[tuple[float, Settings]], count: int) -> list[Probe]:
    """The probes of (secret, round, host): reproducible by whoever holds the secret,
    unpredictable to hosts (HMAC-SHA256 keys the draw), distinct prompts within a round."""
    if not secret:
        raise ValueError("a validator secret is required to derive probes")
    if count < 1 or count > len(bank):
        raise ValueError(f"count must be between 1 and the bank's {len(bank)} prompts")
    digest = hmac.new(secret.encode(), f"probes\0{round_no}\0{host}".encode(), hashlib.sha256)
    rng = random.Random(digest.digest())
    out = []
    for index, prompt in enumerate(rng.sample(bank, count)):
        settings = draw_settings(mix, rng)
        configs = {k: v for k, v in settings.as_configs().items() if k != "seed"}
        probe_id = hmac.new(secret.encode(), f"id\0{round_no}\0{host}\0{index}".encode(),
                            hashlib.sha256).hexdigest()[:16]
        out.append(Probe(probe_id, round_no, host, index, prompt.id, prompt.messages, configs,
                         stream=rng.random() < 0.5))
    return out
