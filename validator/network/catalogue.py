"""The named host behaviours the tests, calibration and benchmarks use, and their answers
without HTTP.

A catalogue entry is a host configuration of the simulator (a strategy and its options,
as in a network file): the behaviour itself is the strategy's code in
validator.network.simulator, so a recorded answer, a calibration answer and a simulated
host's answer over HTTP come from one implementation.

OfflineNetwork runs strategies in-process over (prompt, settings) probes. Each host's
calls run concurrently and every engine generation they ask for in one event-loop tick
goes to the engine as one batch, as the batched engines need to be fast (transformers
answers 32 requests in about the time of a few). A strategy marked `ordered` (its answer
depends on earlier calls) gets its calls one at a time, in probe order.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Sequence

from validator.models.registry import Registry
from validator.models.sampling import Settings
from validator.network.engines import Engine, load_engine
from validator.network.engines import Request as EngineRequest
from validator.network.simulator import STRATEGIES, Call, Network, NetworkConfig, Strategy

# name -> host configuration (strategy and options). Honest hosts run the claimed model
# on another stack or precision; cheats serve something cheaper or ignore the request.
CATALOGUE: dict[str, dict] = {
    "honest-transformers-fp32": {"strategy": "honest-transformers", "dtype": "float32"},
    "honest-transformers-bf16": {"strategy": "honest-transformers", "dtype": "bfloat16"},
    "honest-llama.cpp": {"strategy": "honest-llama.cpp"},
    "honest-llama.cpp-stripped": {"strategy": "honest-llama.cpp", "strip": "both"},
    "cheat-other-model": {"strategy": "other-model"},
    "cheat-layers-removed": {"strategy": "layers-removed"},
    "cheat-requantised": {"strategy": "requantised"},
    "cheat-settings-ignored": {"strategy": "settings-ignored"},
    "cheat-hotter": {"strategy": "hotter"},
    "cheat-greedy-when-sampling": {"strategy": "greedy-when-sampling"},
    "cheat-truncated": {"strategy": "truncated"},
    "cheat-replayed": {"strategy": "replayed"},
}
HONEST = tuple(name for name in CATALOGUE if name.startswith("honest-"))
CHEATS = tuple(name for name in CATALOGUE if name.startswith("cheat-"))

Probe = tuple[object, Settings]  # (a prompt with `messages` and `id`, its settings)


def as_received(model: str, settings: Settings) -> dict:
    """The configs a host receives from the validator's client (its default wire shape,
    validator.probing.client.Wire): the model and the settings, never a seed. Offline
    answers are the answers to exactly this, as over HTTP."""
    return {"model": model, "temperature": settings.temperature, "top_k": settings.top_k,
            "top_p": settings.top_p, "max_new_tokens": settings.max_tokens}


class OfflineNetwork(Network):
    """The hosts of a network config answering probes in-process, engine calls batched.

    `shared_engines`: take engines from the process-wide cache (the simulated network's
    and the tests'), or load this network's own and let them go with it (calibration,
    where each may be a large model)."""

    def __init__(self, config: NetworkConfig, registry: Registry | None = None, *,
                 shared_engines: bool = True):
        super().__init__(config, registry)
        self.shared_engines = shared_engines
        self._own: dict[tuple[str, str], Engine] = {}
        self._pending: dict[tuple[str, str], list[tuple[EngineRequest, asyncio.Future]]] = {}
        # Engine answers by batch: an engine given the same batch answers the same, so a
        # host whose calls repeat another's (stripped, truncated) costs no generation.
        self._memo: dict[tuple[str, str, str], list[str]] = {}
        self.batches: list[tuple[str, int]] = []  # (engine, requests) per engine.generate call

    @classmethod
    def of(cls, hosts: dict[str, dict], model: str, registry: Registry | None = None,
           **kwargs) -> "OfflineNetwork":
        """A network of `hosts` (name -> configuration, e.g. from CATALOGUE) claiming `model`."""
        config = NetworkConfig(model=model, hosts=[{"name": n, **h} for n, h in hosts.items()])
        return cls(config, registry, **kwargs)

    def engine(self, model: str, name: str):
        if self.shared_engines:
            return super().engine(model, name)
        if (model, name) not in self._own:
            self._own[(model, name)] = load_engine(self.registry, model, name)
        return self._own[(model, name)]

    def close(self) -> None:
        """Let go of this network's own engines and its remembered answers."""
        self._own.clear()
        self._memo.clear()

    async def generate(self, model: str, engine_name: str, messages: list[dict],
                       settings: Settings) -> str:
        loop = asyncio.get_running_loop()
        key = (model, engine_name)
        pending = self._pending.setdefault(key, [])
        if not pending:
            loop.call_soon(self._flush, key, 0)
        future = loop.create_future()
        pending.append((EngineRequest(messages, settings, settings.seed or 0), future))
        return await future

    def _flush(self, key: tuple[str, str], seen: int) -> None:
        """Run the engine on the requests pending for it once a tick brought no more."""
        pending = self._pending[key]
        if len(pending) > seen:
            asyncio.get_running_loop().call_soon(self._flush, key, len(pending))
            return
        del self._pending[key]
        requests = [r for r, _ in pending]
        try:
            texts = self._generate(key, requests)
        except Exception as exc:  # every waiting call fails with it
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), text in zip(pending, texts):
            if not future.done():
                future.set_result(text)

    def _generate(self, key: tuple[str, str], requests: list[EngineRequest]) -> list[str]:
        batch = hashlib.sha256(json.dumps(
            [[r.messages, r.settings.as_configs(), r.seed] for r in requests]).encode()).hexdigest()
        memo = (*key, batch)
        if memo not in self._memo:
            self._memo[memo] = self.engine(*key).generate(requests)
            self.batches.append((key[1], len(requests)))
        return list(self._memo[memo])

    def answers(self, host: str, probes: Sequence[Probe]) -> list[str]:
        """The texts a new host `host` of this network returns to the probes, in order."""
        config = next((h for h in self.config.hosts if h.name == host), None)
        if config is None:
            raise KeyError(f"no host {host!r}; known: {', '.join(self.hosts)}")
        strategy: Strategy = STRATEGIES[config.strategy](self, config)
        if type(strategy).respond is not Strategy.respond:
            raise ValueError(f"host {host!r}: strategy {config.strategy} is defined by its HTTP "
                             "response (respond), which has no offline answer")
        calls = [Call(host, p.messages, configs, Settings.from_configs(configs), stream=False,
                      started=time.time(), client="127.0.0.1")
                 for p, configs in ((p, as_received(strategy.model, s)) for p, s in probes)]

        async def run() -> list[str]:
            if strategy.ordered:
                return [await strategy.answer(call) for call in calls]
            return list(await asyncio.gather(*(strategy.answer(call) for call in calls)))

        return asyncio.run(run())

    def records(self, host: str, probes: Sequence[Probe]) -> list[dict]:
        """Audit records (the format `validator audit` reads) of `host`'s answers."""
        model = self.hosts[host].model
        return [{"id": f"{host}/{p.id}/{i}", "host": host, "model": model, "messages": p.messages,
                 "configs": s.as_configs(), "response": text}
                for i, ((p, s), text) in enumerate(zip(probes, self.answers(host, probes)))]


def catalogue_network(model: str, names: Sequence[str] | None = None,
                      registry: Registry | None = None) -> OfflineNetwork:
    """The catalogue's hosts (all, or `names`) claiming `model`, answering offline."""
    unknown = sorted(set(names or ()) - set(CATALOGUE))
    if unknown:
        raise KeyError(f"unknown hosts {unknown}; the catalogue has: {', '.join(CATALOGUE)}")
    return OfflineNetwork.of({n: CATALOGUE[n] for n in names or CATALOGUE}, model, registry)
