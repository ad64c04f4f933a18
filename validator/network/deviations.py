"""Hosts that bend the requested sampling settings a little: the model is the claimed one,
the engine honest, only the settings it samples with differ (an API wrapper that clamps
the temperature, or that does not pass top-k/top-p through). Each is a strategy plug-in
of validator.network.simulator with its size as an option; importing this module
registers them (validator.network does on import).

Greedy requests are answered honestly by every one of them: the deviations are in how a
host samples, and a temperature of 0 leaves nothing to bend.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from validator.models.sampling import GREEDY_BELOW, Settings
from validator.network.simulator import Strategy, strategy

Engine = Literal["fp32", "bf16", "llama.cpp"]


class Deviation(Strategy):
    """The request's settings, bent by `bend`, on an honest engine (`engine`)."""

    class Options(Strategy.Options):
        engine: Engine = "fp32"

    @property
    def engines(self):  # type: ignore[override]
        return (self.options.engine,)

    def bend(self, settings: Settings) -> Settings:
        raise NotImplementedError

    async def answer(self, call):
        settings = call.settings if call.settings.greedy else self.bend(call.settings)
        return await self.generate(call, self.options.engine, settings)


@strategy
class TemperatureOffset(Deviation):
    """Samples at the requested temperature plus `offset` (negative: colder), never at or
    below greedy decoding's threshold."""
    name = "temperature-offset"

    class Options(Deviation.Options):
        offset: float = Field(-0.25, ge=-10.0, le=10.0)

    def bend(self, settings):
        return replace(settings, temperature=max(2 * GREEDY_BELOW, settings.temperature + self.options.offset))


@strategy
class TemperatureClamped(Deviation):
    """Clamps the requested temperature into [low, high] (a wrapper's "safe range")."""
    name = "temperature-clamped"

    class Options(Deviation.Options):
        low: float = Field(0.0, ge=0.0)
        high: float = Field(0.5, gt=0.0)

    def bend(self, settings):
        o = self.options
        return replace(settings, temperature=max(2 * GREEDY_BELOW, min(o.high, max(o.low, settings.temperature))))


@strategy
class TopPWidened(Deviation):
    """Samples with top-p raised by `widen` (at most 1: no top-p cut)."""
    name = "top-p-widened"

    class Options(Deviation.Options):
        widen: float = Field(0.1, gt=0.0, le=1.0)

    def bend(self, settings):
        return replace(settings, top_p=min(1.0, settings.top_p + self.options.widen))


@strategy
class TopKIgnored(Deviation):
    """Samples with its own top-k (`top_k`, 0: none) whatever the request asks; top-p and
    the temperature as asked."""
    name = "top-k-ignored"

    class Options(Deviation.Options):
        top_k: int = Field(0, ge=0)

    def bend(self, settings):
        return replace(settings, top_k=self.options.top_k)


@strategy
class FiltersIgnored(Deviation):
    """Keeps the requested temperature but passes neither top-k nor top-p through: the
    engine's own `top_k`/`top_p` (default: none) apply."""
    name = "filters-ignored"

    class Options(Deviation.Options):
        top_k: int = Field(0, ge=0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)

    def bend(self, settings):
        return replace(settings, top_k=self.options.top_k, top_p=self.options.top_p)


DEVIATIONS = ("temperature-offset", "temperature-clamped", "top-p-widened", "top-k-ignored", "filters-ignored")
