"""The one catalogue of host behaviours: the simulator's strategies, answering offline
(tests' recorded answers, calibration, benchmarks) exactly as they answer over HTTP."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from validator.network.catalogue import CATALOGUE, CHEATS, HONEST, OfflineNetwork, catalogue_network
from validator.network.simulator import STRATEGIES, NetworkConfig, SimulatedNetwork
from validator.probing.client import FlexstackClient, Timeouts
from validator.models.sampling import Settings
from validator.probing.probes import Prompt, greedy_and_sampled, load_bank, load_mix
from validator.service import calibration

from .conftest import MODEL

# Models generate on a shared 2-core CPU here, one request at a time per engine.
PATIENT = Timeouts(first_byte=600, total=900)
# llama.cpp hosts only: llama.cpp answers each request of a batch on its own, so a batch
# offline and single requests over HTTP must give the same text. (Transformers seeds a
# sampled batch once, so its batched answers differ from its single ones.)
LLAMA_HOSTS = ("cheat-truncated", "cheat-replayed")


@pytest.fixture(scope="module")
def few_probes():
    """Two prompts asked greedily and sampled, answers kept short but over the 60
    characters below which the truncating host leaves an answer whole."""
    probes = greedy_and_sampled(load_bank("configs/prompts/general.yaml")[:2], load_mix(), seed=5)
    return [(p, replace(s, max_tokens=24)) for p, s in probes]


def test_every_entry_is_a_valid_strategy_configuration(registry):
    assert set(HONEST) | set(CHEATS) == set(CATALOGUE) and not set(HONEST) & set(CHEATS)
    hosts = catalogue_network(MODEL, registry=registry)  # validates every entry's options
    assert {h.name for h in hosts.hosts.values()} <= set(STRATEGIES)
    assert "cheat-requantised" in CHEATS
    with pytest.raises(KeyError, match="unknown hosts"):
        catalogue_network(MODEL, ["honest-nope"], registry)
    with pytest.raises(ValueError, match="strip"):
        OfflineNetwork.of({"h": {"strategy": "honest-llama.cpp", "strip": "all"}}, MODEL, registry)


def test_a_fault_strategy_has_no_offline_answer(registry, few_probes):
    hosts = OfflineNetwork.of({"slow": {"strategy": "slow-first-byte"}, "static": {"strategy": "static"}},
                              MODEL, registry)
    with pytest.raises(ValueError, match="respond"):
        hosts.answers("slow", few_probes)
    assert hosts.answers("static", few_probes) == [STRATEGIES["static"].Options().text] * len(few_probes)
    with pytest.raises(KeyError, match="no host"):
        hosts.answers("nobody", few_probes)


def test_offline_answers_are_the_simulated_hosts_answers(registry, few_probes):
    """The same catalogue hosts answer the same probes over HTTP (one request at a
    time, in probe order) and offline (batched): the same texts."""
    config = NetworkConfig(model=MODEL, hosts=[{"name": n, **CATALOGUE[n]} for n in LLAMA_HOSTS])

    async def live():
        out = {}
        with SimulatedNetwork(config, registry) as net:
            for name in LLAMA_HOSTS:
                async with FlexstackClient(net.urls[name], token="t", timeouts=PATIENT) as client:
                    out[name] = []
                    for prompt, settings in few_probes:
                        rec = await client.complete(prompt.messages, settings, model=MODEL)
                        assert rec.ok, (name, rec)
                        out[name].append(rec.text)
        return out

    over_http = asyncio.run(live())
    offline = catalogue_network(MODEL, ("honest-llama.cpp", *LLAMA_HOSTS), registry)
    honest = offline.answers("honest-llama.cpp", few_probes)
    for name in LLAMA_HOSTS:
        assert offline.answers(name, few_probes) == over_http[name], name
    # One engine batch of every probe (the truncating host reuses it), and the replaying
    # host, whose answers depend on earlier calls, one call at a time: it generates only
    # for the first prompt (twice: greedy, then sampled) and replays.
    assert offline.batches == [("llama.cpp", len(few_probes)), ("llama.cpp", 1), ("llama.cpp", 1)]
    truncated = over_http["cheat-truncated"]
    assert any(len(t) < len(h) for t, h in zip(truncated, honest))
    assert all(h.startswith(t) for t, h in zip(truncated, honest))
    replayed = over_http["cheat-replayed"]
    assert replayed[:2] == honest[:2] and replayed[2:] == [honest[1]] * (len(honest) - 2)


def test_whitespace_stripping_options(registry):
    """Four APIs in front of one llama.cpp host. Greedy answers to a list prompt cut
    where they end in blank lines (SmolLM2 writes "...of three:\n\n* Banana\n* Apple\n\n")."""
    kinds = ("none", "both", "leading", "either")
    hosts = OfflineNetwork.of({k: {"strategy": "honest-llama.cpp", "strip": k} for k in kinds}, MODEL, registry)
    prompt = Prompt("list", "general", [{"role": "user", "content":
                    "List three fruits as a bulleted list, then add one sentence after a blank line."}])
    probes = [(prompt, Settings(temperature=0.0, max_tokens=n)) for n in (11, 19)]
    raw, both, leading, either = (hosts.answers(k, probes) for k in kinds)
    assert len(hosts.batches) == 1  # one generation for the four hosts
    assert all(t.endswith("\n") for t in raw), raw
    assert both == [t.strip() for t in raw] != raw and leading == [t.lstrip() for t in raw]
    assert all(e in (b, lead) for e, b, lead in zip(either, both, leading))


def test_calibration_answers_come_from_the_honest_strategies(spec):
    """Calibration's honest hosts are the strategies: its stripped llama.cpp host is the
    same llama.cpp answers behind an API stripping both ends or the leading one."""
    probes = greedy_and_sampled(load_bank("configs/prompts/calibration.yaml")[:1],
                                load_mix("calibration"), calibration.SEED)
    records, failed = calibration._answer(spec, "configs/prompts/calibration.yaml", ["llama.cpp"], 1,
                                          log=lambda _: None)
    assert failed == {}
    assert list(records) == ["llama.cpp", "llama.cpp-stripped"]
    assert [r["configs"] for r in records["llama.cpp"]] == [s.as_configs() for _, s in probes]
    assert all(r["response"] for r in records["llama.cpp"])
    for r, honest in zip(records["llama.cpp-stripped"], records["llama.cpp"]):
        assert r["response"] in (honest["response"].strip(), honest["response"].lstrip())
        assert r["id"].startswith("llama.cpp-stripped/") and r["host"] == "llama.cpp-stripped"
    assert calibration.honest_hosts("transformers-bfloat16") == {
        "transformers-bfloat16": {"strategy": "honest-transformers", "dtype": "bfloat16"}}
    assert calibration.honest_hosts("transformers-float16-eager-batch8") == {
        "transformers-float16-eager-batch8": {"strategy": "honest-transformers", "dtype": "float16",
                                              "attention": "eager", "batch": 8}}
    for unknown in ("vllm", "transformers-float64", "transformers-float32-batch0", "transformers-float32-flash"):
        with pytest.raises(ValueError, match="unknown engine"):
            calibration.honest_hosts(unknown)


def test_the_recorded_answers_follow_the_catalogue(registry, probes):
    """tests/data/answers.jsonl is regenerated when a strategy, the catalogue or a host's
    options change."""
    from .answers import SOURCES, fingerprint

    assert {"simulator.py", "catalogue.py", "engines.py"} <= {p.rsplit("/", 1)[-1] for p in SOURCES}
    plan = {"honest": HONEST, "cheats": CHEATS}
    changed = {**CATALOGUE, "honest-llama.cpp-stripped": {"strategy": "honest-llama.cpp", "strip": "leading"}}
    assert (fingerprint(OfflineNetwork.of(changed, MODEL, registry), probes, plan)
            != fingerprint(catalogue_network(MODEL, registry=registry), probes, plan))
