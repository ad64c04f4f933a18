"""Gemma-3 270M as a reference (SentencePiece vocabulary of 262k, registry-supplied chat
template). Slow on CPU (about a minute to convert the GGUF once), so `make test-slow`."""

from __future__ import annotations

import json

import pytest

from validator.network.catalogue import CATALOGUE, OfflineNetwork
from validator.service.audit import run_audit
from validator.service.scorer import Scorer
from validator.probing.probes import greedy_and_sampled, load_bank, load_mix
from validator.scoring.reference import ReferenceModel

from .test_align import assert_canonical_ids_match_the_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma(registry):
    return ReferenceModel.load(registry.get("gemma-3-270m"))


def test_gemma_prompt_and_token_bytes(gemma):
    ids = gemma.prompt_ids([{"role": "user", "content": "Hi"}])
    assert gemma.tokenizer.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    for text in ["Hello  world\n\nhi é 😀", "def f(x):\n    return x ** 2", "  leading and trailing  "]:
        toks = gemma.canonical_ids(text)
        assert b"".join(gemma.table.bytes[t] for t in toks) == text.encode()
    assert gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>") in gemma.eos_ids
    assert_canonical_ids_match_the_tokenizer(gemma, [p.messages[-1]["content"] for p in load_bank("configs/prompts/general.yaml")])


def test_gemma_honest_llama_cpp_answers_pass(gemma, registry):
    probes = greedy_and_sampled(load_bank("configs/prompts/general.yaml")[:8], load_mix("calibration"), seed=3)
    hosts = OfflineNetwork.of({"gemma-llama.cpp": CATALOGUE["honest-llama.cpp"]}, "gemma-3-270m", registry)
    records = hosts.records("gemma-llama.cpp", probes)
    lines, hosts = run_audit((json.dumps(r) for r in records), Scorer(registry, models={"gemma-3-270m": gemma}))
    assert [line["verdict"] for line in lines if line["verdict"] == "fail"] == []
    assert hosts["gemma-llama.cpp"]["verdict"] != "dishonest"
