"""Sampling settings as the API defines them, and the distributions they induce.

Honest engines apply the same settings in different orders: transformers scales by the
temperature and then cuts top-k and top-p; llama.cpp cuts top-k and top-p on the
unscaled distribution and applies the temperature last. Both keep a prefix of the
tokens sorted by logit (temperature does not change the order), so the scorer computes
both prefixes and tolerates either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

# The API's documented defaults (docs/flexstack-api.md).
API_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.5, "max_tokens": 512}
MAX_TOKENS_LIMIT = 4096
GREEDY_BELOW = 1e-5  # a temperature this small is argmax decoding in every engine

ORDERS = ("transformers", "llama.cpp")


class SettingsError(ValueError):
    """A request's sampling settings are malformed."""


@dataclass(frozen=True)
class Settings:
    temperature: float = API_DEFAULTS["temperature"]
    top_k: int = API_DEFAULTS["top_k"]
    top_p: float = API_DEFAULTS["top_p"]
    max_tokens: int = API_DEFAULTS["max_tokens"]
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_configs(cls, configs: Mapping[str, Any] | None) -> "Settings":
        """Read the API's `configs` object; accepts `max_tokens` or `max_new_tokens`."""
        configs = dict(configs or {})
        if "max_tokens" not in configs and "max_new_tokens" in configs:
            configs["max_tokens"] = configs["max_new_tokens"]

        def number(key: str, kind: type, lo: float, hi: float):
            value = configs.get(key, API_DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingsError(f"configs.{key} must be a number, got {value!r}")
            if kind is int and float(value) != int(value):
                raise SettingsError(f"configs.{key} must be an integer, got {value!r}")
            value = kind(value)
            if not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
                raise SettingsError(f"configs.{key}={value} is outside [{lo}, {hi}]")
            return value

        seed = configs.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SettingsError(f"configs.seed must be an integer, got {seed!r}")
        return cls(
            temperature=number("temperature", float, 0.0, 100.0),
            top_k=number("top_k", int, 0, 1_000_000),
            top_p=number("top_p", float, 0.0, 1.0),
            max_tokens=number("max_tokens", int, 1, MAX_TOKENS_LIMIT),
            seed=seed,
        )

    def length_stop(self, tokens: int, slack: float = 0.05) -> bool:
        """Whether an answer of this many tokens counts as stopped by max_tokens rather
        than by end of sequence (a few tokens of slack: a segmentation may differ)."""
        return tokens >= self.max_tokens - max(2, math.ceil(slack * self.max_tokens))

    def as_configs(self) -> dict[str, Any]:
        out = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
               "max_tokens": self.max_tokens, "max_new_tokens": self.max_tokens}
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def kept_prefix_sizes(sorted_logp: torch.Tensor, log_norm: torch.Tensor, settings: Settings) -> torch.Tensor:
    """How many of the best tokens each order keeps, per row of `sorted_logp`.

    `sorted_logp` [rows, k]: log-probabilities (temperature 1), descending.
    `log_norm` [rows, 2]: per order, logsumexp of logp * scale over the tokens top-k
    leaves (scale 1/T for transformers, 1 for llama.cpp), so that a cut of the sorted
    list still sees the whole distribution's mass. Returns [rows, 2], one column per
    entry of ORDERS. A token is kept while the mass before it is below top_p; at least
    one token always is.
    """
    rows, k = sorted_logp.shape
    if settings.top_p >= 1.0:
        return torch.full((rows, 2), k, dtype=torch.long, device=sorted_logp.device)
    sizes = []
    scales = order_scales(settings)
    for o, scale in enumerate(scales):
        if o and scale == scales[0]:
            sizes.append(sizes[0])  # temperature 1: both orders keep alike
            continue
        probs = torch.exp(sorted_logp * scale - log_norm[:, o : o + 1])
        before = torch.cumsum(probs, dim=-1) - probs
        sizes.append((before < settings.top_p).sum(dim=-1).clamp(min=1))
    return torch.stack(sizes, dim=-1)


def order_scales(settings: Settings) -> tuple[float, float]:
    """The factor on log-probs before top-p, per order: transformers applies the
    temperature first, llama.cpp last."""
    return (1.0 / settings.temperature, 1.0)


def sample_next(logits: torch.Tensor, settings: Settings, generator: torch.Generator | None) -> int:
    """One token from a row of logits, transformers' order (temperature, top-k, top-p)."""
    if settings.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / settings.temperature
    k = settings.top_k if 0 < settings.top_k < logits.shape[-1] else logits.shape[-1]
    values, ids = torch.topk(logits, k)
    if settings.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        n = int((before < settings.top_p).sum().clamp(min=1))
        values, ids = values[:n], ids[:n]
    probs = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(ids[int(choice)])


_TEMPERATURE_OFFSETS = (-0.4, -0.25, -0.15, -0.08, 0.08, 0.15, 0.25, 0.4)
_TOP_P_WIDENED = (0.05, 0.1, 0.2)
_MIN_TEMPERATURE = 0.05


def _grid() -> tuple[tuple[str, str, float], ...]:
    out = []
    for order in ORDERS:
        out += [(order, "temperature", d) for d in _TEMPERATURE_OFFSETS]
        out += [(order, "top_p", w) for w in _TOP_P_WIDENED]
        out.append((order, "top_k", 0))
    out.append((ORDERS[0], "filters", 0))  # top-k and top-p ignored: the orders agree
    return tuple(out)


# Explicit alternatives to the settings asked, for the likelihood-ratio evidence
# (validator.scoring.alternatives): (order, what is bent, by how much).
ALTERNATIVES = _grid()


def alternative_name(alt: tuple[str, str, float]) -> str:
    order, kind, size = alt
    return {"temperature": f"{order} temperature {size:+g}", "top_p": f"{order} top-p +{size:g}",
            "top_k": f"{order} top-k ignored", "filters": "top-k and top-p ignored"}[kind]


def alternative_settings(alt: tuple[str, str, float], asked: Settings) -> Settings | None:
    """The settings the alternative samples with, or None where it would change nothing
    (or cannot be: a temperature at or below zero)."""
    _, kind, size = alt
    if kind == "temperature":
        t = asked.temperature + size
        return None if t < _MIN_TEMPERATURE else Settings(t, asked.top_k, asked.top_p)
    if kind == "top_p":
        return None if asked.top_p >= 1.0 else Settings(asked.temperature, asked.top_k, min(1.0, asked.top_p + size))
    if kind == "top_k":
        return None if asked.top_k <= 0 else Settings(asked.temperature, 0, asked.top_p)
    if asked.top_k <= 0 and asked.top_p >= 1.0:
        return None
    return Settings(asked.temperature, 0, 1.0)
