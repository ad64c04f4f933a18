"""The demo network claiming Gemma-3 270M (validator/configs/network.gemma.yaml), refereed
by the real daemon with the reference as a `dir:` checkpoint: the gemma-3-270m package's
GGUF assembled into a transformers directory, loaded exactly as an operator's local
gemma-7b directory is, with the committed calibration. The hosts run the shipped
registry (llama.cpp needs the GGUF itself, the transformers hosts the same weights).

The hosts' engine answers are recorded per request in tests/data/gemma-demo.jsonl
(tests/answers.py, RecordedEngines): the daemon derives the same probes on every run
(first_round 1, the demo's secret), so the default run generates none; the reference
scores every answer live."""

from __future__ import annotations

import asyncio
import time

import pytest
import yaml
from sqlalchemy import text

from validator.configs import shipped
from validator.models.registry import Registry
from validator.network.simulator import NetworkConfig, SimulatedNetwork
from validator.scoring.reference import ReferenceModel

from .answers import RecordedEngines

# About two minutes on 2 CPU cores (the reference's 262k-token head on every scored
# step): in `make test-slow`, not the default run.
pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
# One round of twelve probes a host. An honest host needs trust_after (5, the demo's)
# passes in a row to be trusted. The other-model and settings-ignored cheats fail
# nearly every answer and are flagged at their second probe; the re-quantised cheat
# fails few answers, and the truncating cheat none: a truncated answer is one early stop
# where the reference does not end, weak evidence on its own (p = the calibrated
# eos_rate, 0.007: gemma-3-270m's honest answers never stop early), which the pooled
# termination process multiplies over the host's answers (the test prints each host's
# verdicts and the reason it was flagged).
PROBES_PER_HOST = 12


class RecordedNetwork(SimulatedNetwork):
    """The simulated network, its engines answering from recorded answers."""

    def __init__(self, config: NetworkConfig):
        super().__init__(config)
        self.recorded = RecordedEngines(self)

    def engine(self, model: str, name: str):
        return self.recorded.engine(model, name, lambda: super(RecordedNetwork, self).engine(model, name))


def dir_registry(tmp) -> Registry:
    """A registry whose gemma-3-270m is a `dir:` checkpoint on the CPU, read with the
    committed calibration."""
    shipped_registry = Registry.load()
    spec = shipped_registry.get(MODEL)
    raw = yaml.safe_load(shipped_registry.path.read_text())
    raw["models"] = {MODEL: {**raw["models"][MODEL], "checkpoint": {"dir": spec.load_source()},
                             "device": "cpu", "calibration": str(spec.calibration)}}
    path = tmp / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return Registry.load(path)


@pytest.fixture(scope="module")
def gemma_demo(tmp_path_factory):
    from validator.daemon import Daemon
    from validator.service.config import HostEntry, ValidatorConfig
    from validator.service.reads import host_rows
    from validator.store import Store

    tmp = tmp_path_factory.mktemp("gemma-demo")
    registry = dir_registry(tmp)
    spec = registry.get(MODEL)
    assert next(iter(spec.checkpoint)) == "dir" and spec.calibration.exists()
    ref = ReferenceModel.load(spec)
    net = RecordedNetwork(NetworkConfig.load("configs/network.gemma.yaml"))
    net.load()
    net.start()
    t0 = time.perf_counter()
    try:
        demo = yaml.safe_load(shipped("demo.yaml").read_text())["validator"]
        demo["rounds"].update(probes_per_host=PROBES_PER_HOST)
        # Recorded answers come at once; generating them live on a busy 2-core machine
        # (a changed fingerprint) queues every host's probes behind the same CPUs.
        demo["client"].update(first_byte_s=900, total_s=1200)
        cfg = ValidatorConfig.model_validate({
            **demo, "database": f"sqlite:///{tmp / 'demo.db'}", "models": str(registry.path),
            "hosts": [HostEntry(name=n, url=net.urls[n], model=s.model).model_dump() for n, s in net.hosts.items()]})
        progress = asyncio.run(Daemon(cfg, models={MODEL: ref}).run(max_rounds=1, first_round=1))
    finally:
        net.stop()
        net.recorded.save()
    seconds = time.perf_counter() - t0
    store = Store(cfg.database_url)
    with store.engine.connect() as c:
        verdicts = c.execute(text(
            "select hosts.name, scores.verdict from scores join probes on probes.id = scores.probe_id "
            "join hosts on hosts.id = probes.host_id order by probes.id")).fetchall()
    by_host: dict[str, list[str]] = {}
    for host, verdict in verdicts:
        by_host.setdefault(host, []).append(verdict)
    rows = {r["host"]: r for r in host_rows(store)}
    flagged = {name: store.reputation_events(name) for name in rows}
    print(f"\ngemma demo: {progress.sent} probes, {progress.scored} scored, {net.recorded.generated} "
          f"answers generated live, {seconds:.0f} s")
    for name, row in rows.items():
        print(f"  {name}: {row['state']} score {row['score']:.2f} verdicts {by_host.get(name)} "
              f"{[e['reason'] for e in flagged[name]][:1]}")
    return {"rows": rows, "verdicts": by_host, "progress": progress, "network": net, "events": flagged}


def test_gemma_demo_trusts_the_honest_and_flags_the_cheats(gemma_demo):
    rows, verdicts = gemma_demo["rows"], gemma_demo["verdicts"]
    assert set(rows) == {h.name for h in gemma_demo["network"].config.hosts}
    assert gemma_demo["progress"].scored == len(rows) * PROBES_PER_HOST
    for name, row in rows.items():
        assert row["errors"] == 0 and row["scored"] == PROBES_PER_HOST, row
        if name.startswith("honest-"):
            assert row["state"] == "trusted", (row, verdicts[name])
            assert "fail" not in verdicts[name], verdicts[name]
        else:
            assert row["state"] == "flagged" and row["score"] == 0.0, (row, verdicts[name])


def test_gemma_demo_flags_the_truncating_cheat_on_its_early_stops(gemma_demo):
    """Gemma-3 270M is a base model: its honest calibration answers never stopped early
    (0 of 420), so the early-stop rate comes from the answers (about 3 / 420), not from
    early stops (3 / 3 = 1, which made a cut-short answer no evidence and this cheat
    trusted). No single truncated answer fails; their early stops, pooled, flag it."""
    row = gemma_demo["rows"]["cheat-truncated"]
    assert row["state"] == "flagged", (row, gemma_demo["verdicts"]["cheat-truncated"])
    assert "fail" not in gemma_demo["verdicts"]["cheat-truncated"]
    assert "ending where the reference does not end" in gemma_demo["events"]["cheat-truncated"][0]["reason"]


def test_gemma_demo_answers_came_from_the_recording(gemma_demo):
    """Nothing generated live: the recorded answers cover every probe the daemon sent (a
    changed strategy, engine, registry entry or package changes the fingerprint, and a
    changed probe is a request not recorded: both are generated live and the file is
    rewritten, to be committed with the change)."""
    assert gemma_demo["network"].recorded.generated == 0
