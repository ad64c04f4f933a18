"""Prompt banks and settings mixes (YAML under configs/)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from .registry import REPO_ROOT
from .sampling import Settings

SETTINGS_FILE = REPO_ROOT / "configs" / "settings.yaml"


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    messages: list[dict]


def load_bank(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    raw = yaml.safe_load(path.read_text())
    return [Prompt(p["id"], p.get("kind", "question"),
                   [{"role": m["role"], "content": m["content"]} for m in p["messages"]])
            for p in raw["prompts"]]


def load_mix(name: str = "default", path: str | Path = SETTINGS_FILE) -> list[tuple[float, Settings]]:
    raw = yaml.safe_load(Path(path).read_text())["mixes"][name]
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
