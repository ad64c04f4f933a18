"""The statistics behind the verdicts, checked on the reference's own exact sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from validator.scoring.align import AlignItem, Aligner
from validator.reputation import HostRule, fisher, host_verdict
from validator.probing.probes import load_bank
from validator.models.sampling import Settings
from validator.scoring.verdict import Tolerances, score_answer
from validator.scoring.similarity import similarity

from .answers import reference_generations


@pytest.fixture(scope="module")
def own_samples(ref):
    """Answers sampled by the reference itself (transformers' order, per-probe seeds):
    exactly the distribution the statistic assumes (recorded: tests/answers.py)."""
    bank = load_bank("configs/prompts/general.yaml")[:20]
    prompts = [ref.prompt_ids(p.messages) for p in bank]
    out = {}
    for settings in (Settings(temperature=0.7, top_k=50, top_p=0.5, max_tokens=48),
                     Settings(temperature=1.0, top_k=0, top_p=0.95, max_tokens=48)):
        toks = reference_generations(ref, f"test_scoring own t={settings.temperature}", prompts,
                                     [settings] * len(prompts), list(range(100, 100 + len(prompts))))
        texts = [ref.tokenizer.decode(t) for t in toks]
        out[settings] = (prompts, texts)
    return out


def _scores(ref, tolerances, prompts, texts, settings):
    als = Aligner(ref).align([AlignItem(p, t, settings, support_tolerance=tolerances.support_gap)
                              for p, t in zip(prompts, texts)])
    return [score_answer(al, settings, ref.table, tolerances) for al in als]


def test_statistic_is_centred_for_honest_sampling(ref, tolerances, own_samples):
    for settings, (prompts, texts) in own_samples.items():
        scores = _scores(ref, tolerances, prompts, texts, settings)
        assert all(s.verdict != "fail" for s in scores)
        z = np.array([s.metrics["sampled"]["z"]["transformers"] for s in scores])
        assert abs(z.mean()) < 1.0, (settings, z)
        p = np.array([s.metrics["components"]["statistic"] for s in scores])
        assert (p < 1e-3).sum() == 0


def test_statistic_flags_greedy_answers_to_sampled_requests(ref, tolerances, own_samples):
    # At temperature 1 and top-p 0.95 sampling has entropy to lose. (At the API's default
    # top-p 0.5 many steps keep one token and greedy decoding is nearly honest sampling.)
    settings, (prompts, _) = list(own_samples.items())[1]
    greedy = Settings(temperature=0.0, max_tokens=settings.max_tokens)
    texts = [ref.tokenizer.decode(t) for t in reference_generations(
        ref, "test_scoring greedy", prompts, [greedy] * len(prompts), [0] * len(prompts))]
    scores = _scores(ref, tolerances, prompts, texts, settings)
    z = np.array([s.metrics["sampled"]["z"]["transformers"] for s in scores])
    assert z.mean() > 1.0
    summary = host_verdict([s.p_value for s in scores], [s.verdict for s in scores])
    assert summary["verdict"] == "dishonest"
    assert any("look ignored" in r for s in scores for r in s.reasons)


def test_tolerances_come_from_the_committed_calibration(spec, tolerances):
    raw = json.loads(spec.calibration.read_text())
    assert tolerances.greedy_gap == raw["tolerances"]["greedy_gap"]
    # the pooled evidence's tolerances are calibrated too, not the built-in defaults
    for key in ("statistic_slack", "edge_rate", "argmax_rate", "eos_rate"):
        value = raw["tolerances"][key]
        expected = tuple(value) if isinstance(value, list) else value  # edge_rate: one rate per gap
        assert getattr(tolerances, key) == expected != getattr(Tolerances(), key), key
    assert "honest answers" in raw["summary"] and raw["command"].startswith("validator calibrate")
    assert "cheat" not in json.dumps(raw["engines"])  # calibrated on honest engines only
    assert Tolerances.from_file(None).source.startswith("built-in")


def test_early_stop_rate_is_bounded_by_the_answers_when_honest_answers_never_stop_early():
    """A base model's honest answers run to max_tokens: with no early stop to go by, the
    rate per answer is bounded by how rarely answers stop early at all (about 3 / answers),
    not 3 / 3 = 1, which made a truncated answer no evidence."""
    from validator.service.calibration import early_stop_violation_rate

    assert early_stop_violation_rate(0, 140) == pytest.approx(1 - 0.05 ** (1 / 140))  # ~ 3 / 140
    assert early_stop_violation_rate(0, 3) == pytest.approx(1 - 0.05 ** (1 / 3))
    assert early_stop_violation_rate(205, 480) == pytest.approx(3 / 205)  # many stops: per stop
    one = early_stop_violation_rate(1, 1000)
    assert 1 / 1000 < one < 3 / 1000 * 2
    assert early_stop_violation_rate(5, 5) == pytest.approx(3 / 5)  # every answer stopped early


def test_pooled_tolerances_from_the_honest_engines_measures():
    from validator.service.calibration import pooled_tolerances

    engines = {
        # fits its second order (-0.001): two standard errors (0.02) is all it resolves
        "a": {"statistic_per_sd": [0.03, -0.001], "statistic_per_sd_se": [0.01, 0.01],
              "edge": {"0.7/50/0.5": {"tokens": 1000, "beyond": [6, 3, 1, 0, 0]},
                       "1/0/0.95": {"tokens": 1000, "beyond": [0, 0, 0, 0, 0]}},
              "greedy_off_argmax": {"tokens": 1000, "off": 20}},
        # fits its first order (0.02, well resolved): 2 x 0.02
        "b": {"statistic_per_sd": [0.02, 0.04], "statistic_per_sd_se": [0.004, 0.004],
              "edge": {"0.7/50/0.5": {"tokens": 500, "beyond": [1, 1, 1, 0, 0]}},
              "greedy_off_argmax": {"tokens": 1000, "off": 0}},
    }
    tol = pooled_tolerances(engines, 2500, 2000)
    # per gap, the largest share of any engine at any settings: "a" at the edge and beyond
    # 0.1 nats, "b" beyond 0.25 (1 of 500), nobody beyond 0.5: the rule of three over all tokens
    assert tol == {"statistic_slack": 0.04, "argmax_rate": pytest.approx(2 * 20 / 1000),
                   "edge_rate": pytest.approx([2 * 6 / 1000, 2 * 3 / 1000, 2 / 500, 3 / 2500, 3 / 2500])}
    # nothing beyond the edge, nothing off the argmax: the rule of three over the tokens
    quiet = {"c": {"edge": {"1/0/0.95": {"tokens": 3000, "beyond": [0] * 5}}, "greedy_off_argmax": {"tokens": 1500, "off": 0}}}
    assert pooled_tolerances(quiet, 3000, 1500) == {"edge_rate": [1e-3] * 5, "argmax_rate": 2e-3}


def test_fisher_and_host_rule():
    assert fisher([]) == 1.0 and fisher([1.0] * 10) == pytest.approx(1.0)
    assert fisher([0.0, 1.0]) == 0.0
    assert fisher([1e-3] * 5) < 1e-6
    assert host_verdict([1.0, 1.0], ["pass", "pass"])["verdict"] == "inconclusive"  # too few
    assert host_verdict([1.0] * 3, ["pass"] * 3)["verdict"] == "honest"
    flagged = host_verdict([1e-9, 0.5, 1.0], ["fail", "pass", "pass"], HostRule(alpha=1e-4))
    assert flagged == {"verdict": "dishonest", "records": 3, "failed": 1, "p_value": flagged["p_value"]}


def test_similarity_metrics():
    same = similarity("The capital is Paris.", "The capital is Paris.")
    assert same["exact"] and same["rouge_l"] == 1.0 and same["edit_distance"] == 0.0 and same["chrf"] == 1.0
    diff = similarity("The capital is Paris.", "Lyon is a city in France.")
    assert not diff["exact"] and diff["rouge_l"] < 0.3 and diff["edit_distance"] > 0.5
    assert 0.0 <= diff["chrf"] < same["chrf"]
    assert similarity("abc", "abd")["shared_prefix_chars"] == 2


def test_llama_cpp_may_finish_a_character_past_max_tokens(registry, ref, tolerances):
    """llama-cpp-python holds back a character its last allowed token left incomplete
    and generates on until it is whole: this honest answer (a probe of the demo network)
    needs 49 tokens for max_tokens=48. It must pass; text past the character must not."""
    from validator.network.engines import Request, shared_engine

    messages = [{"role": "user", "content": "Write a tweet announcing that our bakery will now open at 7am on weekdays."}]
    settings = Settings(temperature=0.3, top_k=10, top_p=0.9, max_tokens=48)
    text = shared_engine(registry, "smollm2-135m", "llama.cpp").generate([Request(messages, settings, 0)])[0]
    data = text.encode()
    assert ref.table.fewest_tokens(data) == 49  # the engine went past max_tokens
    assert ref.table.fewest_tokens(data, into_last_char=True) <= 48  # ... to finish its emoji
    assert text.endswith("\N{LEMON}")

    prompt = ref.prompt_ids(messages)
    (s,) = _scores(ref, tolerances, [prompt], [text], settings)
    assert s.verdict == "pass", s.reasons
    (over,) = _scores(ref, tolerances, [prompt], [text + " Come"], settings)  # whole tokens past it
    assert over.verdict == "fail" and "more than max_tokens=48" in over.reasons[0]


def test_fewest_tokens_into_last_char(ref):
    table = ref.table
    assert table.fewest_tokens(b"Hello world", into_last_char=True) == table.fewest_tokens(b"Hello world")
    lemon = "Fresh \N{LEMON}".encode()  # four bytes at the end
    reach = [table.fewest_tokens(lemon[:end]) for end in range(len(lemon) - 3, len(lemon) + 1)]
    assert table.fewest_tokens(lemon, into_last_char=True) == min(reach) < table.fewest_tokens(lemon)
    assert table.fewest_tokens(b"", into_last_char=True) == 0
