"""POST /validator/v1/llm: the network's validator API (docs/flexstack-api.md).

Each (prompt, response) pair is scored on components, each in [0, 1]:

- `fidelity`: how surely the response is what the claimed model produces under the
  request's sampling settings: the p-value of `validator audit`'s scorer (teacher-forced
  log-probs of the response given the prompt on the reference model). 1: exactly what an
  honest host of the model produces; near 0: not this model, or not these settings.
- `judge`: an LLM as judge (validator.scoring.judge): a model of the registry
  (`serve.llm.judge_model`, default the reference) grades the response against the prompt
  and the ground truth on a fixed 1-5 rubric, read from the probabilities of the grade
  tokens (no sampling). What a small judge can and cannot do: benchmarks/judge.py.
- `cosine`: cosine similarity (all-MiniLM-L6-v2 sentence embeddings, clipped at 0)
  between the response and the pair's ground truth, when one is given.
- `reference_similarity`: the same cosine between the response and the reference
  model's own fixed-seed answer to the prompt.
- `feedback`: when the request names a `host`, its stored human ratings, as the
  reputation's feedback component (ratings 1-5 as (r-1)/4, recent ones weighted most).

Components are plug-ins: a distribution may register more under the entry-point group
`validator.llm_components` (name = component; the object is a callable taking a `Pairs`
and returning one score in [0, 1] or None per pair); it counts once `serve.llm.weights`
gives it a weight. SAFE (a search-augmented factuality evaluator: split the response into
facts, search the web for each, rate the share supported) is one an operator with a
search engine can add this way; nothing here calls out to the network.

A pair's score is the weighted mean of the components it has (weights from
`serve.llm.weights`; a missing component drops out and the rest are renormalised).
The aggregate holds the mean score, the mean of each component, and the verdict of
`validator audit`'s host rule over the pairs' p-values (Fisher's method).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Callable, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from validator.models.registry import DEFAULT_MODEL, RegistryError
from validator.reputation import components as reputation_components
from validator.models.sampling import MAX_TOKENS_LIMIT, Settings, SettingsError
from validator.web.api import unprocessable
from validator.web.auth import Principal, llm_caller
from validator.scoring.batch import AnswerRecord
from validator.service.audit import audit_records
from validator.service.operations import ratings
from validator.service.reads import finite
from validator.web.limits import RATE_LIMITED

log = logging.getLogger(__name__)
router = APIRouter()
HARD_MAX_PAIRS = 10_000  # schema ceilings; the configured caps (serve.llm) are lower
HARD_MAX_CHARS = 1_000_000
ENTRY_POINT_GROUP = "validator.llm_components"


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
                                                   description="Expected answers (optional; null for none; "
                                                               "an empty list, the network's default, is none).")
    model: str | None = Field(None, max_length=128, description="Registry name of the model the responses "
                                                                "claim (default: serve.llm.model).")
    configs: Configs | None = None
    host: str | None = Field(None, pattern=r"^[^\x00-\x1f\x7f]{1,128}$",
                             description="A host whose stored feedback gives the `feedback` component.")

    @model_validator(mode="after")
    def _pairs(self) -> "LlmRequest":
        if self.ground_truths == []:  # the network's own tooling sends [] for "none"
            self.ground_truths = None
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
    components: dict[str, float] = Field(description="fidelity, judge, cosine, reference_similarity, "
                                                     "feedback and any plug-in's, where present.")
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
    components: dict[str, float]
    verdict: Literal["honest", "dishonest", "inconclusive"] = Field(
        description="Fisher's method over the pairs' p-values (`validator audit`'s host rule).")
    p_value: float
    pairs: int
    errors: int = Field(description="Pairs the reference could not score.")


class LlmResponse(BaseModel):
    model: str
    configs: dict[str, Any] = Field(description="The sampling settings the responses were judged under.")
    weights: dict[str, float]
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


@dataclass
class Pairs:
    """What a component sees: the request's pairs, the reference's output for each (its
    verdict, p-value and metrics, with the re-run when serve.llm.rerun), and the web
    context (store, scorer, registry, config)."""
    prompts: list[str]
    responses: list[str]
    ground_truths: list[str | None]
    model: str
    settings: Settings
    host: str | None
    audit: list[dict]
    ctx: Any = field(repr=False)


def _fidelity(pairs: Pairs) -> list[float | None]:
    return [o.get("p_value") if o["verdict"] != "error" else None for o in pairs.audit]


def _cosine(pairs: Pairs) -> list[float | None]:
    return _cosines(pairs.ctx.service.scorer, pairs.responses, pairs.ground_truths)


def _reference_similarity(pairs: Pairs) -> list[float | None]:
    return _cosines(pairs.ctx.service.scorer, pairs.responses, [(o.get("metrics") or {}).get("rerun") for o in pairs.audit])


def _judge(pairs: Pairs) -> list[float | None]:
    name = pairs.ctx.config.llm.judge_model or pairs.model
    grades = pairs.ctx.service.scorer.judge(name, list(zip(pairs.prompts, pairs.responses, pairs.ground_truths)))
    return [None if g is None else g.score for g in grades]


def _feedback(pairs: Pairs) -> list[float | None]:
    if pairs.host is None:
        return [None] * len(pairs.prompts)
    value = reputation_components([], ratings(pairs.ctx.store, pairs.host),
                                  pairs.ctx.service.reputation).get("feedback")
    return [value] * len(pairs.prompts)


BUILTIN: dict[str, Callable[[Pairs], list[float | None]]] = {
    "fidelity": _fidelity, "judge": _judge, "cosine": _cosine,
    "reference_similarity": _reference_similarity, "feedback": _feedback}


@cache
def components() -> dict[str, Callable[[Pairs], list[float | None]]]:
    """The built-in components and those installed under ENTRY_POINT_GROUP (a plug-in
    cannot replace a built-in)."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            log.warning("llm component %s from %s ignored: the name is taken", ep.name, ep.value)
            continue
        try:
            found[ep.name] = ep.load()
        except Exception:  # noqa: BLE001 - a broken plug-in must not take the endpoint down
            log.warning("llm component %s (%s) cannot be loaded", ep.name, ep.value, exc_info=True)
    return found


def score_pairs(req: LlmRequest, ctx, spend: Callable[[], None] = lambda: None) -> dict:
    """`spend` is called once the request is known to be valid, before any model work
    (it counts against the caller's rate limit, which may refuse with 429)."""
    model, settings = _check(req, ctx)
    spend()
    cfg = ctx.config.llm
    prompts, responses = req.pair_prompts, req.pair_responses
    host = req.host or "request"
    scorer = ctx.service.scorer
    records = [AnswerRecord(i, host, model, [{"role": "user", "content": p}], settings, r)
               for i, (p, r) in enumerate(zip(prompts, responses))]
    outputs, hosts = audit_records(records, scorer, rerun=cfg.rerun)
    pairs = Pairs(prompts, responses, req.ground_truths or [None] * len(responses), model, settings,
                  req.host, outputs, ctx)
    available = components()
    weights = {k: w for k, w in cfg.weights.items() if k in available}
    # A component is computed when it is weighed, or is one of the built-ins (reported).
    values = {name: fn(pairs) for name, fn in available.items() if weights.get(name) or name in BUILTIN}

    results = []
    for i, out in enumerate(outputs):
        m = out.get("metrics") or {}
        parts = {k: float(v[i]) for k, v in values.items() if v[i] is not None}
        total = sum(weights.get(k, 0.0) for k in parts)
        results.append({
            "index": i, "components": parts,
            "score": sum(weights.get(k, 0.0) * v for k, v in parts.items()) / total if total > 0 else None,
            "verdict": out["verdict"], "p_value": out.get("p_value"), "reasons": out.get("reasons", []),
            "reference_answer": m.get("rerun"), "similarity": m.get("similarity"),
            "metrics": {k: m[k] for k in ("tokens", "mean_logprob", "gap", "mode") if k in m},
        })
    scored = [r["score"] for r in results if r["score"] is not None]
    summary = hosts.get(host, {"verdict": "inconclusive", "p_value": 1.0})
    aggregate = {
        "score": float(np.mean(scored)) if scored else None,
        "components": {k: float(np.mean(v)) for k in values
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
