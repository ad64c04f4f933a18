"""POST /validator/v1/llm: the network's validator API (shared/reference/flexstack.md).

Each (prompt, response) pair is scored on components, each in [0, 1]:

- `judge`: the reference model as the judge, i.e. its own evidence for the response:
  the p-value of `validator audit`'s scorer (teacher-forced log-probs of the response
  given the prompt under the request's sampling settings). 1: exactly what an honest
  host of the model produces; near 0: not this model, or not these settings.
- `cosine`: cosine similarity (all-MiniLM-L6-v2 sentence embeddings, clipped at 0)
  between the response and the pair's ground truth, when one is given.
- `reference_similarity`: the same cosine between the response and the reference
  model's own fixed-seed answer to the prompt.
- `feedback`: when the request names a `host`, its stored human ratings, as the
  reputation's feedback component (ratings 1-5 as (r-1)/4, recent ones weighted most).

A pair's score is the weighted mean of the components it has (weights from
`serve.llm.weights`; a missing component drops out and the rest are renormalised).
The aggregate holds the mean score, the mean of each component, and the verdict of
`validator audit`'s host rule over the pairs' p-values (Fisher's method).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from validator.models.registry import DEFAULT_MODEL, RegistryError
from validator.reputation import components as reputation_components
from validator.models.sampling import MAX_TOKENS_LIMIT, Settings, SettingsError
from validator.web.api import unprocessable
from validator.web.auth import Principal, llm_caller
from validator.web.data import finite
from validator.web.limits import RATE_LIMITED

router = APIRouter()
HARD_MAX_PAIRS = 10_000  # schema ceilings; the configured caps (serve.llm) are lower
HARD_MAX_CHARS = 1_000_000
COMPONENTS = ("cosine", "judge", "feedback", "reference_similarity")


class Configs(BaseModel):
    """The Flexstack API's sampling settings the responses were produced with (its
    defaults: temperature 0.7, top_k 50, top_p 0.5, max_tokens 512). Other keys are
    accepted and ignored."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str | None = Field(None, max_length=128, description="As the API's configs.model.")
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Fixes the reference's own answer.")


Texts = list[str]


class LlmRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "prompts": ["What is the capital of France?"],
        "responses": ["The capital of France is Paris."],
        "ground_truths": ["Paris is the capital of France."],
        "configs": {"temperature": 0.0, "max_tokens": 16}}]})
    prompts: Texts | None = Field(None, max_length=HARD_MAX_PAIRS, description="Prompts (or `questions`).")
    responses: Texts | None = Field(None, max_length=HARD_MAX_PAIRS, description="Answers by hosts (or `answers`).")
    questions: Texts | None = Field(None, max_length=HARD_MAX_PAIRS, description="Same as `prompts`.")
    answers: Texts | None = Field(None, max_length=HARD_MAX_PAIRS, description="Same as `responses`.")
    ground_truths: list[str | None] | None = Field(None, max_length=HARD_MAX_PAIRS,
                                                   description="Expected answers (optional; null for none).")
    model: str | None = Field(None, max_length=128, description="Registry name of the model the responses "
                                                                "claim (default: serve.llm.model).")
    configs: Configs | None = None
    host: str | None = Field(None, pattern=r"^[^\x00-\x1f\x7f]{1,128}$",
                             description="A host whose stored feedback gives the `feedback` component.")

    @model_validator(mode="after")
    def _pairs(self) -> "LlmRequest":
        for a, b in (("prompts", "questions"), ("responses", "answers")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ValueError(f"give `{a}` or `{b}`, not both")
        if self.pair_prompts is None or self.pair_responses is None:
            raise ValueError("`prompts` (or `questions`) and `responses` (or `answers`) are required")
        n = len(self.pair_prompts)
        if n == 0:
            raise ValueError("no pairs: `prompts` is empty")
        if len(self.pair_responses) != n:
            raise ValueError(f"{n} prompts but {len(self.pair_responses)} responses: one response per prompt")
        if self.ground_truths is not None and len(self.ground_truths) != n:
            raise ValueError(f"{n} prompts but {len(self.ground_truths)} ground_truths: one per prompt "
                             "(null where there is none)")
        for name in ("prompts", "responses", "questions", "answers", "ground_truths"):
            for i, text in enumerate(getattr(self, name) or []):
                if text is None:
                    continue
                if len(text) > HARD_MAX_CHARS:
                    raise ValueError(f"{name}[{i}] is longer than {HARD_MAX_CHARS} characters")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{name}[{i}] is not valid Unicode text (a lone surrogate)") from None
        if any(not p.strip() for p in self.pair_prompts):
            raise ValueError("a prompt is empty")
        return self

    @property
    def pair_prompts(self) -> list[str] | None:
        return self.prompts if self.prompts is not None else self.questions

    @property
    def pair_responses(self) -> list[str] | None:
        return self.responses if self.responses is not None else self.answers


class PairResult(BaseModel):
    index: int
    score: float | None = Field(description="Weighted mean of the components present; None if none is.")
    components: dict[Literal[COMPONENTS], float]  # type: ignore[valid-type]
    verdict: Literal["pass", "inconclusive", "fail", "error"] = Field(
        description="The reference's verdict on the response (error: it could not be scored, see reasons).")
    p_value: float | None = Field(description="Chance an honest host of the model produces evidence this strong.")
    reasons: list[str]
    reference_answer: str | None = Field(description="The reference model's own answer (when serve.llm.rerun).")
    similarity: dict[str, Any] | None = Field(description="Response vs the reference's answer: exact, ROUGE-L, "
                                                          "chrF, edit distance (reported).")
    metrics: dict[str, Any] = Field(description="tokens, mean_logprob (nats per token), gap summary, mode.")


class Aggregate(BaseModel):
    score: float | None = Field(description="Mean of the pairs' scores.")
    components: dict[Literal[COMPONENTS], float]  # type: ignore[valid-type]
    verdict: Literal["honest", "dishonest", "inconclusive"] = Field(
        description="Fisher's method over the pairs' p-values (`validator audit`'s host rule).")
    p_value: float
    pairs: int
    errors: int = Field(description="Pairs the reference could not score.")


class LlmResponse(BaseModel):
    model: str
    configs: dict[str, Any] = Field(description="The sampling settings the responses were judged under.")
    weights: dict[Literal[COMPONENTS], float]  # type: ignore[valid-type]
    results: list[PairResult]
    aggregate: Aggregate


def _check(req: LlmRequest, ctx) -> tuple[str, Settings]:
    cfg = ctx.config.llm
    configs = req.configs.model_dump(exclude_none=True) if req.configs else {}
    model = req.model or configs.pop("model", None) or cfg.model or DEFAULT_MODEL
    try:
        ctx.registry.get(model)
    except RegistryError as exc:
        raise unprocessable("model", str(exc)) from None
    if len(req.pair_prompts) > cfg.max_pairs:
        raise unprocessable("prompts", f"{len(req.pair_prompts)} pairs; at most {cfg.max_pairs} per request "
                                       "(serve.llm.max_pairs)")
    for name in ("prompts", "responses", "questions", "answers", "ground_truths"):
        for i, text in enumerate(getattr(req, name) or []):
            if text is not None and len(text) > cfg.max_chars:
                raise unprocessable(name, f"{name}[{i}] has {len(text)} characters; at most {cfg.max_chars} "
                                          "(serve.llm.max_chars)")
    try:
        settings = Settings.from_configs(configs)
    except SettingsError as exc:
        raise unprocessable("configs", str(exc)) from None
    if settings.max_tokens > cfg.max_tokens:
        raise unprocessable("configs", f"max_tokens={settings.max_tokens} is above this validator's limit of "
                                       f"{cfg.max_tokens} (serve.llm.max_tokens)")
    if req.host is not None and ctx.store.get_host(req.host) is None:
        raise unprocessable("host", f"no host named {req.host!r}")
    return model, settings


def _cosines(scorer, responses: list[str], others: list[str | None]) -> list[float | None]:
    """Cosine similarity (clipped at 0) of each response to its counterpart, None where
    there is none."""
    idx = [i for i, o in enumerate(others) if o is not None]
    if not idx:
        return [None] * len(responses)
    emb = scorer.embed([responses[i] for i in idx] + [others[i] for i in idx])
    a, b = emb[: len(idx)], emb[len(idx):]
    sims = np.clip(np.sum(a * b, axis=1), 0.0, 1.0)
    out: list[float | None] = [None] * len(responses)
    for i, s in zip(idx, sims):
        out[i] = float(s)
    return out


def score_pairs(req: LlmRequest, ctx, spend: Callable[[], None] = lambda: None) -> dict:
    """`spend` is called once the request is known to be valid, before any model work
    (it counts against the caller's rate limit, which may refuse with 429)."""
    model, settings = _check(req, ctx)
    spend()
    cfg = ctx.config.llm
    weights = cfg.weights.model_dump()
    prompts, responses = req.pair_prompts, req.pair_responses
    host = req.host or "request"
    records = [{"id": i, "host": host, "model": model, "messages": [{"role": "user", "content": p}],
                "configs": settings.as_configs(), "response": r}
               for i, (p, r) in enumerate(zip(prompts, responses))]
    outputs, hosts = ctx.scorer.audit(records, rerun=cfg.rerun)
    reruns = [(o.get("metrics") or {}).get("rerun") for o in outputs]
    cosine = _cosines(ctx.scorer, responses, req.ground_truths or [None] * len(responses))
    ref_sim = _cosines(ctx.scorer, responses, reruns)
    feedback = None
    if req.host is not None:
        ratings = [f["rating"] for f in reversed(ctx.store.feedback_for(req.host))]
        feedback = reputation_components([], ratings, ctx.reputation).get("feedback")

    results = []
    for i, out in enumerate(outputs):
        m = out.get("metrics") or {}
        found = {"cosine": cosine[i], "judge": out.get("p_value") if out["verdict"] != "error" else None,
                 "feedback": feedback, "reference_similarity": ref_sim[i]}
        parts = {k: v for k, v in found.items() if v is not None}
        total = sum(weights[k] for k in parts)
        results.append({
            "index": i, "components": parts,
            "score": sum(weights[k] * v for k, v in parts.items()) / total if total > 0 else None,
            "verdict": out["verdict"], "p_value": out.get("p_value"), "reasons": out.get("reasons", []),
            "reference_answer": m.get("rerun"), "similarity": m.get("similarity"),
            "metrics": {k: m[k] for k in ("tokens", "mean_logprob", "gap", "mode") if k in m},
        })
    scored = [r["score"] for r in results if r["score"] is not None]
    summary = hosts.get(host, {"verdict": "inconclusive", "p_value": 1.0})
    aggregate = {
        "score": float(np.mean(scored)) if scored else None,
        "components": {k: float(np.mean(v)) for k in COMPONENTS
                       if (v := [r["components"][k] for r in results if k in r["components"]])},
        "verdict": summary["verdict"], "p_value": summary["p_value"], "pairs": len(results),
        "errors": sum(r["verdict"] == "error" for r in results),
    }
    return finite({"model": model, "configs": settings.as_configs(), "weights": weights,
                   "results": results, "aggregate": aggregate})


@router.post("/validator/v1/llm", response_model=LlmResponse, tags=["validator"],
             responses={401: {"description": "No valid token (unless serve.llm.public)."},
                        422: {"description": "Malformed request: lengths differ, a cap is exceeded, "
                                             "unknown model, bad settings."},
                        503: {"description": "The reference model or the embedder cannot be loaded here."},
                        **RATE_LIMITED})
def validate_llm(request: Request, body: LlmRequest, who: Principal = Depends(llm_caller)):
    """Score prompt/response pairs with the reference model (and ground truths with
    sentence embeddings). Accepts the network's `prompts`/`responses`/`ground_truths`
    and its Python helper's `questions`/`answers`."""
    ctx = request.app.state.web
    return score_pairs(body, ctx, spend=ctx.limits.spender(request, who))
