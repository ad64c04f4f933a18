"""The simulator's engines answer a seeded request the same way whatever else runs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from validator.network.engines import Request, shared_engine
from validator.models.sampling import Settings

MESSAGES = [{"role": "user", "content": "Write two sentences about the sea."}]
SAMPLED = Settings(temperature=1.0, top_k=0, top_p=1.0, max_tokens=16)


def test_seeded_transformers_answers_do_not_depend_on_other_engines(registry):
    """torch's CPU generator is one per process: two transformers engines sampling in two
    threads (the simulated network runs one thread per engine) drew from each other's
    seeded streams, so a host's answer to a probe changed from run to run."""
    fp32 = shared_engine(registry, "smollm2-135m", "fp32")
    bf16 = shared_engine(registry, "smollm2-135m", "bf16")
    requests = [Request(MESSAGES, SAMPLED, seed) for seed in (1, 2)]
    alone = {e.name: e.generate(requests) for e in (fp32, bf16)}
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(e.generate, requests) for _ in range(2) for e in (fp32, bf16)]
        together = [(e.name, f.result()) for f, e in zip(runs, [fp32, bf16] * 2)]
    assert len(set(alone["transformers-float32"])) == 2  # the seeds do change the answer
    for name, texts in together:
        assert texts == alone[name], name
