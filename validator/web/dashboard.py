"""The dashboard: server-rendered pages (Jinja2), no front-end build. The one script is
static/minichart.js, a small SVG line chart written for this page.

- /hosts: every live host, sortable by score, state and the counts, filterable by state;
- /hosts/{host}: score over time (with availability and latency), current components,
  recent verdicts, state history, feedback;
- /probes/{id}: the host's answer with each token coloured by its gap to the
  reference's best token, beside the reference's own re-run.

Reading needs a token unless `serve.public_reads`: a browser logs in once at /login and
keeps the token in an HttpOnly cookie (honoured for GET only, see auth.py).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from validator.store import STATES
from validator.service import reads
from validator.service.provenance import describe
from validator.web.api import delay_note, probe_visible, sent_before
from validator.web.auth import COOKIE, Principal, bearer, identify, token_hash
from validator.web.limits import RateLimited
from validator.service.scorer import ModelUnavailable

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
ANSWERS_PER_PAGE = 25
HOST_COLUMNS = [("host", "host", False), ("state", "state", False), ("score", "score", True),
                ("probes", "probes", True), ("errors", "errors", True), ("scored", "scored", True),
                ("last_seen", "last answer", False), ("flagged_since", "flagged since", False)]
# Token colours by gap (nats below the reference's best token): upper bounds and classes.
GAP_BANDS = [(0.05, "g0"), (0.5, "g1"), (1.0, "g2"), (2.0, "g3"), (4.0, "g4"), (math.inf, "g5")]
LEGEND = [("g0", "< 0.05"), ("g1", "< 0.5"), ("g2", "< 1"), ("g3", "< 2"), ("g4", "< 4"), ("g5", ">= 4")]
SERIES_COLOURS = {"score": "#1f6feb", "availability": "#16a34a", "latency": "#f59e0b", "feedback": "#9333ea"}


def fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"  # None or missing: "-"


def when(t) -> str:
    if isinstance(t, str):
        t = datetime.fromisoformat(t)
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def pval(p) -> str:
    return f"{p:.2g}" if isinstance(p, (int, float)) else "-"


def gap_class(gap) -> str:
    if gap is None:
        return "g5"
    return next(cls for bound, cls in GAP_BANDS if gap < bound)


templates.env.globals.update(fmt=fmt, when=when, pval=pval, gap_class=gap_class, describe=describe)


def _viewer(request: Request, creds: HTTPAuthorizationCredentials | None) -> Principal | None:
    try:
        who = identify(request, creds)
    except HTTPException:  # a stale cookie: log in again
        return None
    if who is None and request.app.state.web.config.public_reads:
        return Principal("public", "public")
    return who


def _login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)


def _page(request: Request, name: str, who: Principal, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"who": who, **context}, status_code=status_code)


def _not_found(request: Request, who: Principal, message: str) -> HTMLResponse:
    return _page(request, "error.html", who, 404, status=404, message=message)


@router.get("/")
def index():
    return RedirectResponse("/hosts", status_code=303)


@router.get("/hosts", response_class=HTMLResponse)
def hosts_page(request: Request, creds=Depends(bearer), state: str | None = None, sort: str = "score",
               order: str = "desc", offset: int = 0):
    who = _viewer(request, creds)
    if who is None:
        return _login(request)
    state = state if state in STATES else None
    sort = sort if sort in reads.HOST_SORTS else "score"
    order = order if order in ("asc", "desc") else "desc"
    hosts = reads.hosts_page(request.app.state.web.store, state=state, sort=sort, order=order,
                             limit=reads.MAX_PAGE, offset=min(max(0, offset), reads.MAX_OFFSET))
    base = {"state": state} if state else {}

    def sort_query(key: str) -> str:
        flip = "asc" if sort == key and order == "desc" else "desc"
        return urlencode({**base, "sort": key, "order": flip if sort == key else
                          ("desc" if key in ("score", "probes", "errors", "scored") else "asc")})

    def page_query(at: int) -> str:
        return urlencode({**base, "sort": sort, "order": order, "offset": max(0, at)})

    return _page(request, "hosts.html", who, page=hosts, states=STATES, state=state, sort=sort, order=order,
                 columns=HOST_COLUMNS, sort_query=sort_query, page_query=page_query)


@router.get("/hosts/{host}", response_class=HTMLResponse)
def host_page(request: Request, host: str, creds=Depends(bearer), offset: int = 0):
    who = _viewer(request, creds)
    if who is None:
        return _login(request)
    ctx = request.app.state.web
    h = reads.host_detail(ctx.store, host, ctx.service.reputation)
    if h is None:
        return _not_found(request, who, f"No host named {host!r}.")
    points = reads.series(ctx.store, host, ctx.service.reputation)
    chart = {"x": [p["at"].isoformat() for p in points], "ymin": 0, "ymax": 1,
             "series": [{"name": k, "values": [p[k] for p in points], "color": c,
                         "width": 2.5 if k == "score" else 1.5}
                        for k, c in SERIES_COLOURS.items() if any(p[k] is not None for p in points)]}
    answers = reads.history(ctx.store, host, limit=ANSWERS_PER_PAGE, offset=min(max(0, offset), reads.MAX_OFFSET),
                            before=sent_before(request, who))
    return _page(request, "host.html", who, h=h, chart=chart, page=answers,
                 page_query=lambda at: urlencode({"offset": max(0, at)}))


@router.get("/probes/{probe_id}", response_class=HTMLResponse)
def probe_page(request: Request, probe_id: str, creds=Depends(bearer)):
    who = _viewer(request, creds)
    if who is None:
        return _login(request)
    ctx = request.app.state.web
    if not probe_visible(ctx.store, probe_id, sent_before(request, who)):
        return _not_found(request, who, f"No probe {probe_id!r} ({delay_note(request)}).")
    try:
        p = reads.probe_detail(ctx.store, ctx.service.scorer, probe_id, rerun=True,
                               spend=ctx.limits.spender(request, who))
    except ModelUnavailable as exc:
        return _page(request, "error.html", who, 503, status=503, message=str(exc))
    except RateLimited as exc:
        page = _page(request, "error.html", who, 429, status=429, message=exc.detail)
        page.headers.update(exc.headers)
        return page
    if p is None:
        return _not_found(request, who, f"No probe {probe_id!r}.")
    verdict = None
    if p["answer"] and p["answer"]["verdict"]:
        verdict = {**{k: p["answer"][k] for k in ("verdict", "p_value", "reasons")}, "computed": False}
    elif p["computed_score"]:
        verdict = {**p["computed_score"], "computed": True}
    tolerance = (p["metrics"].get("gap") or {}).get("tolerance")
    return _page(request, "probe.html", who, p=p, verdict=verdict, legend=LEGEND, tolerance=tolerance)


# ------------------------------------------------------------------------------- login

def _safe_next(target: str | None) -> str:
    """Only paths on this site (no open redirect)."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/hosts"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/hosts"):
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request):
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    secret = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or [None])[0])
    store = request.app.state.web.store
    if not secret or await run_in_threadpool(store.api_token, token_hash(secret)) is None:
        return _page(request, "login.html", None, 401, next=target, error="Unknown or revoked token.")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, secret, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=30 * 24 * 3600)
    return response


@router.get("/logout")
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
