"""The REST API under /api: reads for any token (or nobody, with `serve.public_reads`),
writes (feedback, host administration) for admin tokens only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from validator.models.registry import RegistryError
from validator.reputation import InvalidTransition
from validator.service import reads
from validator.service.config import CREDENTIALS_KEY
from validator.service.operations import StateChanged, UnknownHost, UnknownProbe
from validator.store import STATES, VERDICTS
from validator.web.auth import Principal, admin, reader
from validator.web.limits import RATE_LIMITED

router = APIRouter(prefix="/api")
T = TypeVar("T")
State = Literal[STATES]  # type: ignore[valid-type]
Verdict = Literal[VERDICTS]  # type: ignore[valid-type]

# Path parameters: any name the store can hold, but never control characters (PostgreSQL
# text cannot hold NUL, and no host or probe is named with one).
HostName = Path(pattern=r"^[^\x00-\x1f\x7f]{1,128}$", description="Host name.")
ProbeId = Path(pattern=r"^[^\x00-\x1f\x7f]{1,64}$", description="Probe id.")
LIMIT = Query(reads.PAGE, ge=1, le=reads.MAX_PAGE, description="Page size.")
OFFSET = Query(0, ge=0, le=reads.MAX_OFFSET, description="Items to skip.")
NO_TOKEN = {401: {"description": "No token, or an invalid or revoked one (WWW-Authenticate says which)."}}
ADMIN_ONLY = {**NO_TOKEN, 403: {"description": "The token is not an admin token."}}


def web(request: Request):
    return request.app.state.web


def not_found(what: str) -> HTTPException:
    return HTTPException(404, f"no {what}")


def sent_before(request: Request, who: Principal) -> datetime | None:
    """Readers (and public reads) see only probes sent before this, `serve.probe_delay_s`
    ago, so a host cannot read which of its recent requests were probes; admins see
    every probe (None)."""
    if who.role == "admin":
        return None
    return datetime.now(UTC) - timedelta(seconds=web(request).config.probe_delay_s)


def probe_visible(store, probe_id: str, before: datetime | None) -> bool:
    """Whether a probe may be shown to someone who sees probes sent before `before`
    (one not sent yet: never)."""
    if before is None:
        return True
    found = store.probe_detail(probe_id)
    return bool(found and found["dispatch"] and found["dispatch"]["finished_at"] < before)


def delay_note(request: Request) -> str:
    return f"reader tokens see probes {web(request).config.probe_delay_s / 3600:g} h after they are sent"


def unprocessable(where: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors (what the spec documents)."""
    return HTTPException(422, [{"loc": ["body", where], "msg": message, "type": "value_error"}])


# ------------------------------------------------------------------------------- models

class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="Items matching the filters, over all pages.")
    limit: int
    offset: int


class HostOut(BaseModel):
    host: str
    state: State
    score: float | None = Field(description="0..1: honesty(state) x weighted availability, latency, feedback.")
    probes: int = Field(description="Probes sent and recorded (answered or failed).")
    errors: int = Field(description="Probes that failed (transport or protocol error).")
    scored: int
    url: str
    model: str
    last_seen: datetime | None
    flagged_since: datetime | None


class Event(BaseModel):
    at: datetime
    state_from: str
    state_to: str
    score: float | None
    reason: str
    evidence: dict[str, Any]


class FeedbackOut(BaseModel):
    id: int
    probe_id: str
    rating: float
    note: str
    at: datetime


class HostDetail(HostOut):
    added_at: datetime
    removed_at: datetime | None
    components: dict[str, float] = Field(description="honesty factor and the score's components that have data.")
    evidence: dict[str, Any] = Field(description="Honesty evidence: log e-value against log(1/alpha), verdict counts.")
    events: list[Event] = Field(description="State changes with their reasons, newest first (at most 50).")
    feedback: list[FeedbackOut] = Field(description="Ratings of the host's answers, newest first (at most 50).")


class Answer(BaseModel):
    probe_id: str
    round: int
    index: int
    prompt_id: str
    stream: bool
    finished_at: datetime
    ok: bool
    status: int | None
    error: str | None = Field(description="Error class of a failed call (validator.probing.client).")
    detail: str
    ttfb_s: float | None
    total_s: float
    bytes: int
    attempts: int
    served_by: str | None
    verdict: Verdict | None = Field(description="None: a failed call, or not scored yet.")
    p_value: float | None
    reasons: list[str]
    scored_at: datetime | None


class SeriesPoint(BaseModel):
    at: datetime
    state: str
    score: float
    availability: float | None
    latency: float | None
    feedback: float | None


class Token(BaseModel):
    text: str
    gap: float | None = Field(description="Nats between the reference's best token and this one.")


class AnswerText(Answer):
    text: str | None = Field(description="The answer exactly as received.")


class ProbeDetail(BaseModel):
    probe_id: str
    host: str
    model: str
    round: int
    index: int
    prompt_id: str
    messages: list[dict[str, Any]]
    configs: dict[str, Any]
    stream: bool
    created_at: datetime
    answer: AnswerText | None = Field(description="None: not sent yet.")
    metrics: dict[str, Any] = Field(description="The scorer's metrics (docs/methodology.md, 'Metrics'), without the three below.")
    tokens: list[Token] | None = Field(description="The answer aligned to the reference's tokens, each with its gap.")
    rerun: str | None = Field(description="The reference's own fixed-seed answer to the probe.")
    similarity: dict[str, Any] | None = Field(description="The answer against the re-run (reported, never decisive).")
    sources: dict[str, str | None] = Field(description="tokens / rerun: 'stored' (by the daemon), 'computed' "
                                                       "(here, now, not stored) or None.")
    computed_score: dict[str, Any] | None = Field(description="For an answer not scored yet: the score computed "
                                                              "here (not stored).")
    provenance: dict[str, Any] | None = Field(description="What produced the verdict: the reference checkpoint's "
                                                          "identity, the calibration file's hash, the verdict rule "
                                                          "and the validator's version. None: not recorded.")
    feedback: list[FeedbackOut]


class HostIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "host-7", "url": "http://10.0.0.7:8000/v1", "model": "smollm2-135m", "credentials": "network"}]})
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    url: str = Field(pattern=r"^https?://[^\s\x00-\x1f\x7f]+$", max_length=2048,
                     description="The host's API base, e.g. http://10.0.0.5:8000/v1.")
    model: str = Field(min_length=1, max_length=128, description="Registry name of the model it claims.")
    # Never the name of a variable: the daemon reads only VALIDATOR_CRED_<KEY>_* variables
    # and the operator's secrets file (validator.service.credentials).
    credentials: str | None = Field(None, pattern=CREDENTIALS_KEY, description=(
        "Credentials key KEY (default: the host's name): the validator authenticates with "
        "VALIDATOR_CRED_<KEY>_TOKEN / _REFRESH_TOKEN / _USERNAME and _PASSWORD, or the "
        "secrets file's entry KEY."))


class AdminNote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field("", max_length=10_000, description="Why (stored with the change).")


class TransitionOut(BaseModel):
    host: str
    state_from: str
    state_to: str
    reason: str


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"rating": 2, "note": "correct but rambles"}]})
    rating: float = Field(ge=1, le=5, description="1 (bad) to 5 (good).")
    note: str = Field("", max_length=10_000)


class FeedbackStored(BaseModel):
    id: int
    probe_id: str
    host: str
    score: float | None = Field(description="The host's score after the rating.")


# ------------------------------------------------------------------------------- reads

@router.get("/hosts", response_model=Page[HostOut], tags=["hosts"], responses=NO_TOKEN)
def list_hosts(request: Request, _: Principal = Depends(reader),
               state: State | None = Query(None, description="Only hosts in this state."),
               model: str | None = Query(None, max_length=128, description="Only hosts claiming this model."),
               q: str | None = Query(None, max_length=128, description="Host name contains this (any case)."),
               sort: Literal[reads.HOST_SORTS] = "host",  # type: ignore[valid-type]
               order: Literal["asc", "desc"] = "asc",
               limit: int = LIMIT, offset: int = OFFSET):
    """Live hosts with state, score and counts; filtered, sorted (hosts without a value
    sort last) and paginated."""
    return reads.hosts_page(web(request).store, state=state, model=model, q=q, sort=sort, order=order,
                      limit=limit, offset=offset)


@router.get("/hosts/{host}", response_model=HostDetail, tags=["hosts"],
            responses={**NO_TOKEN, 404: {"description": "No such host."}})
def get_host(request: Request, host: str = HostName, _: Principal = Depends(reader)):
    """One host (removed ones too): standing, components, honesty evidence, state
    history with reasons, feedback."""
    ctx = web(request)
    found = reads.host_detail(ctx.store, host, ctx.service.reputation)
    if found is None:
        raise not_found(f"host named {host!r}")
    return found


@router.get("/hosts/{host}/history", response_model=Page[Answer], tags=["hosts"],
            responses={**NO_TOKEN, 404: {"description": "No such host."}})
def host_history(request: Request, host: str = HostName, who: Principal = Depends(reader),
                 verdict: Literal[(*VERDICTS, "unscored")] | None = Query(  # type: ignore[valid-type]
                     None, description="Only answers with this verdict ('unscored': answered, not scored yet)."),
                 failed: bool | None = Query(None, description="true: only failed calls; false: only answered."),
                 limit: int = LIMIT, offset: int = OFFSET):
    """The host's probes, newest first: timings, error class, verdict, p-value, reasons.
    Reader tokens see probes `serve.probe_delay_s` after they were sent; admins at once."""
    ctx = web(request)
    if ctx.store.get_host(host) is None:
        raise not_found(f"host named {host!r}")
    return reads.history(ctx.store, host, limit=limit, offset=offset, verdict=verdict, failed=failed,
                         before=sent_before(request, who))


@router.get("/hosts/{host}/series", response_model=list[SeriesPoint], tags=["hosts"],
            responses={**NO_TOKEN, 404: {"description": "No such host."}})
def host_series(request: Request, host: str = HostName, _: Principal = Depends(reader),
                points: int = Query(reads.SERIES_POINTS, ge=2, le=1000)):
    """The host's score over time (and its availability, latency and feedback
    components), recomputed from the stored answers at up to `points` of them."""
    ctx = web(request)
    if ctx.store.get_host(host) is None:
        raise not_found(f"host named {host!r}")
    return reads.series(ctx.store, host, ctx.service.reputation, points)


@router.get("/probes/{probe_id}", response_model=ProbeDetail, tags=["probes"],
            responses={**NO_TOKEN, **RATE_LIMITED, 404: {"description": "No such probe."},
                       503: {"description": "The host's reference model cannot be loaded here."}})
def get_probe(request: Request, probe_id: str = ProbeId, who: Principal = Depends(reader),
              rerun: bool = Query(True, description="Include the reference's re-run (generated here when "
                                                    "the daemon did not store one: seconds of model time).")):
    """A probe: prompt, settings, the host's answer, its score, per-token gaps against
    the reference, and the reference's own re-run. Reader tokens see a probe
    `serve.probe_delay_s` after it was sent (404 before); admins at once."""
    ctx = web(request)
    if not probe_visible(ctx.store, probe_id, sent_before(request, who)):
        raise not_found(f"probe {probe_id!r} ({delay_note(request)})")
    found = reads.probe_detail(ctx.store, ctx.service.scorer, probe_id, rerun=rerun,
                               spend=ctx.limits.spender(request, who))
    if found is None:
        raise not_found(f"probe {probe_id!r}")
    return found


@router.get("/status", response_model=dict[str, Any], tags=["status"], responses=NO_TOKEN)
def status(request: Request, _: Principal = Depends(reader)):
    """Last round, scoring queue depth, last answer and score, hosts by state, validators
    holding leases (as `validator status --json`, without heartbeats)."""
    return web(request).store.status()


# ------------------------------------------------------------------------------- writes

@router.post("/hosts", response_model=HostOut, status_code=201, tags=["admin"],
             responses={**ADMIN_ONLY, 409: {"description": "A live host has this name."}})
def add_host(request: Request, body: HostIn, who: Principal = Depends(admin)):
    """Add a host (or bring back a removed one with its history)."""
    ctx = web(request)
    try:
        ctx.service.add_host(body.name, body.url, body.model, token_env=body.credentials)
    except RegistryError as exc:
        raise unprocessable("model", str(exc)) from None
    except (ValueError, IntegrityError) as exc:  # IntegrityError: added concurrently
        raise HTTPException(409, str(exc).splitlines()[0]) from None
    return reads.host_row(ctx.store, body.name)


@router.delete("/hosts/{host}", response_model=HostDetail, tags=["admin"],
               responses={**ADMIN_ONLY, 404: {"description": "No such host."}})
def remove_host(request: Request, host: str = HostName, who: Principal = Depends(admin)):
    """Stop probing a host and hide it from lists; its history stays."""
    ctx = web(request)
    try:
        ctx.service.remove_host(host)
    except UnknownHost:
        raise not_found(f"host named {host!r}") from None
    return reads.host_detail(ctx.store, host, ctx.service.reputation)


@router.post("/hosts/{host}/{action}", response_model=TransitionOut, tags=["admin"],
             responses={**ADMIN_ONLY, 404: {"description": "No such host."},
                        409: {"description": "Not allowed from the host's state (e.g. releasing a host "
                                              "that is not flagged), or the state changed meanwhile."}})
def host_action(request: Request, action: Literal["disable", "enable", "release"], host: str = HostName,
                body: AdminNote | None = None, who: Principal = Depends(admin)):
    """disable: stop probing, score 0, until enable. enable: back as new. release: a
    flagged host to probation (its evidence restarts). Stored with who and why."""
    try:
        t = web(request).service.transition(host, action, by=who.by, note=body.note if body else "")
    except UnknownHost:
        raise not_found(f"host named {host!r}") from None
    except (InvalidTransition, StateChanged) as exc:
        raise HTTPException(409, str(exc)) from None
    return {"host": host, "state_from": t.state_from, "state_to": t.state_to, "reason": t.reason}


@router.post("/probes/{probe_id}/feedback", response_model=FeedbackStored, status_code=201, tags=["admin"],
             responses={**ADMIN_ONLY, 404: {"description": "No such probe."}})
def add_feedback(request: Request, body: FeedbackIn, probe_id: str = ProbeId, who: Principal = Depends(admin)):
    """A person's rating of one answer; folded into the host's score at once."""
    try:
        return web(request).service.add_feedback(probe_id, body.rating, body.note)
    except UnknownProbe:
        raise not_found(f"probe {probe_id!r}") from None
