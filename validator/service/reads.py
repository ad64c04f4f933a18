"""What the front doors show, assembled from the store (and, for a probe whose per-token
gaps or re-run are not stored, from the scorer): host rows and the reasons behind them
(`validator hosts list`, /api/hosts, the dashboard), a host's standing recomputed as the
daemon computes it, its history, score series and probes. Plain dicts; the API's
response models (validator/web/api.py) document their shapes."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from datetime import datetime
from typing import Any, Callable

from validator.reputation import STATES, ReputationConfig, combined_score, components
from validator.scoring.batch import AnswerRecord, InputError, error
from validator.service.operations import assess_host, outcomes, ratings
from validator.service.scorer import Scorer
from validator.store import Store

PAGE = 50  # default page size
MAX_PAGE = 500
MAX_OFFSET = 2**31 - 1  # databases take 64-bit offsets at most; nobody pages this far
HOST_SORTS = ("host", "state", "score", "probes", "errors", "scored", "last_seen", "flagged_since")
SERIES_POINTS = 120  # at most this many points in a host's score-over-time series


def page(items: list, total: int, limit: int, offset: int) -> dict:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


# ------------------------------------------------------------------------------- hosts

def hosts_page(store: Store, *, state: str | None = None, model: str | None = None, q: str | None = None,
          sort: str = "host", order: str = "asc", limit: int = PAGE, offset: int = 0) -> dict:
    """A page of live hosts (the `validator hosts list --json` objects), filtered and
    sorted; hosts without a score sort last either way."""
    rows = host_rows(store)
    if state:
        rows = [r for r in rows if r["state"] == state]
    if model:
        rows = [r for r in rows if r["model"] == model]
    if q:
        rows = [r for r in rows if q.lower() in r["host"].lower()]

    def value(r: dict):
        return STATES.index(r["state"]) if sort == "state" else r[sort]

    present = sorted((r for r in rows if value(r) is not None), key=lambda r: (value(r), r["host"]),
                     reverse=order == "desc")
    rows = present + [r for r in rows if value(r) is None]
    return page(rows[offset:offset + limit], len(rows), limit, offset)


def host_rows(store: Store, include_removed: bool = False) -> list[dict]:
    """`validator hosts list --json` objects (also what `validator demo --json` prints
    and the REST API's /api/hosts serves)."""
    stats = store.host_stats()
    out = []
    for h in store.list_hosts(include_removed=include_removed):
        st = stats.get(h["name"], {})
        out.append({"host": h["name"], "state": h["state"], "score": h["score"],
                    "probes": st.get("answered", 0),  # sent and recorded, answered or not
                    "errors": st.get("failed", 0), "scored": st.get("scored", 0),
                    "url": h["url"], "model": h["model"],
                    "last_seen": h["last_seen"].isoformat() if h["last_seen"] else None,
                    "flagged_since": h["flagged_since"].isoformat() if h["flagged_since"] else None})
    return out


def host_row(store: Store, name: str) -> dict | None:
    """One host's `validator hosts list --json` object (removed hosts too)."""
    return next((r for r in host_rows(store, include_removed=True) if r["host"] == name), None)


def host_reasons(store: Store) -> dict[str, str]:
    """Why each host stands where it does: its last state change, else its answers so far."""
    out = {}
    for h in store.list_hosts():
        events = store.reputation_events(h["name"], limit=1)
        if events and events[0]["reason"]:
            out[h["name"]] = events[0]["reason"]
            continue
        rows = store.host_scores(h["name"])
        errors = Counter(r["dispatch"]["error"] for r in rows if not r["dispatch"]["ok"])
        verdicts = Counter(r["score"]["verdict"] for r in rows if r["score"])
        parts = [f"{n} {v}" for v, n in verdicts.most_common()]
        parts += [f"{n} x {e}" for e, n in errors.most_common()]
        out[h["name"]] = ", ".join(parts) or "no answers yet"
    return out


def host_detail(store: Store, name: str, config: ReputationConfig, *, events: int = 50) -> dict | None:
    """A host's row, its current components and honesty evidence (recomputed from the
    stored rows with validator.reputation, as the daemon does), state history and
    feedback; None if the name was never added."""
    found = assess_host(store, name, config)
    if found is None:
        return None
    h, standing, _ = found
    row = host_row(store, name)
    history = store.reputation_events(name)
    feedback = store.feedback_for(name)
    return finite({
        **row, "removed_at": h["removed_at"], "added_at": h["added_at"],
        "components": standing.components, "evidence": standing.evidence,
        "events": [{k: e[k] for k in ("at", "state_from", "state_to", "score", "reason", "evidence")}
                   for e in history[:events]],
        "feedback": [_feedback(f) for f in feedback[:events]]})


def series(store: Store, name: str, config: ReputationConfig, points: int = SERIES_POINTS) -> list[dict]:
    """The host's score over time, recomputed at up to `points` of its answers with the
    reputation formula: honesty(state then) x the availability, latency and feedback
    components over the answers and ratings up to then. The last point uses the host's
    current state and every rating, so it equals the stored score."""
    h = store.get_host(name)
    outs = sorted(outcomes(store, name), key=lambda o: o.at)
    if h is None or not outs:
        return []
    events = sorted(store.reputation_events(name), key=lambda e: e["at"])
    event_at = [e["at"] for e in events]
    rated = sorted(store.feedback_for(name), key=lambda f: f["at"])
    rating_at = [f["at"] for f in rated]
    n = len(outs)
    picks = sorted({round(i * (n - 1) / max(1, min(n, points) - 1)) for i in range(min(n, points))})
    out = []
    for i in picks:
        at = outs[i].at
        last = i == n - 1
        k = bisect_right(event_at, at)
        state = h["state"] if last else (events[k - 1]["state_to"] if k else "new")
        fb = ratings(store, name) if last else [f["rating"] for f in rated[:bisect_right(rating_at, at)]]
        parts = components(outs[:i + 1], fb, config)
        out.append({"at": at, "state": state, "score": combined_score(state, parts, config),
                    "availability": parts.get("availability"), "latency": parts.get("latency"),
                    "feedback": parts.get("feedback")})
    return out


# ------------------------------------------------------------------------------- answers

def answer(r: dict) -> dict:
    """One recorded answer, flat, without the text and metrics (for lists)."""
    p, d, sc = r["probe"], r["dispatch"], r["score"]
    return {"probe_id": p["id"], "round": p["round"], "index": p["index"], "prompt_id": p["prompt_id"],
            "stream": p["stream"], "finished_at": d["finished_at"], "ok": d["ok"], "status": d["status"],
            "error": d["error"], "detail": d["detail"], "ttfb_s": d["ttfb_s"], "total_s": d["total_s"],
            "bytes": d["bytes"], "attempts": d["attempts"], "served_by": d["served_by"],
            "verdict": sc and sc["verdict"], "p_value": sc and sc["p_value"],
            "reasons": sc["reasons"] if sc else [], "scored_at": sc and sc["scored_at"]}


def history(store: Store, name: str, *, limit: int = PAGE, offset: int = 0, verdict: str | None = None,
            failed: bool | None = None, before: datetime | None = None) -> dict:
    total, rows = store.host_history(name, limit=limit, offset=offset, verdict=verdict, failed=failed,
                                     before=before)
    return page([answer(r) for r in rows], total, limit, offset)


def probe_detail(store: Store, scorer: Scorer, probe_id: str, *, rerun: bool = True,
                 spend: Callable[[], None] = lambda: None) -> dict | None:
    """A probe with its answer, score, per-token gaps and the reference's re-run.

    Per-token gaps come from the stored score (the daemon keeps them); the re-run is
    stored only when the daemon runs with `scoring.rerun`. What is missing is computed
    here with the real scorer (`validator audit`'s) and not stored: the server only
    reads. `sources` says which is which. `spend` is called first when the scorer is
    (to count it against the caller's rate limit, which may refuse)."""
    found = store.probe_detail(probe_id)
    if found is None:
        return None
    p, d, sc = found["probe"], found["dispatch"], found["score"]
    metrics = dict(sc["metrics"]) if sc else {}
    per_token = metrics.pop("per_token", None)
    rerun_text = metrics.pop("rerun", None)
    similarity = metrics.pop("similarity", None)
    sources = {"tokens": "stored" if per_token else None, "rerun": "stored" if rerun_text is not None else None}
    computed = None
    answered = d is not None and d["ok"] and d["text"] is not None
    if answered and (per_token is None or (rerun and rerun_text is None)):
        spend()
        try:
            (out,) = scorer.score([AnswerRecord.build(p["id"], p["host"], p["model"], p["messages"],
                                                      p["configs"], d["text"])], rerun=rerun)
        except InputError as exc:
            out = error(p["id"], p["host"], p["model"], str(exc))
        m = out.metrics
        computed = {"verdict": out.verdict, "p_value": out.p_value, "reasons": out.reasons,
                    "provenance": out.provenance}
        if per_token is None and m.get("per_token"):
            per_token, sources["tokens"] = m["per_token"], "computed"
        if rerun and rerun_text is None and m.get("rerun") is not None:
            rerun_text, similarity, sources["rerun"] = m["rerun"], m.get("similarity"), "computed"
        if not metrics:
            metrics = {k: v for k, v in m.items() if k not in ("per_token", "rerun", "similarity")}
    tokens = ([{"text": t, "gap": g} for t, g in zip(per_token["text"], per_token["gap"])]
              if per_token else None)
    return finite({
        "probe_id": p["id"], "host": p["host"], "model": p["model"], "round": p["round"],
        "index": p["index"], "prompt_id": p["prompt_id"], "messages": p["messages"],
        "configs": p["configs"], "stream": p["stream"], "created_at": p["created_at"],
        "answer": None if d is None else {**answer({"probe": p, "dispatch": d, "score": sc}), "text": d["text"]},
        "metrics": metrics, "tokens": tokens, "rerun": rerun_text, "similarity": similarity,
        "sources": sources, "computed_score": computed if sc is None else None,
        "provenance": sc["provenance"] if sc else (computed or {}).get("provenance"),
        "feedback": [_feedback(f) for f in found["feedback"]]})


def _feedback(f: dict) -> dict:
    return {k: f[k] for k in ("id", "probe_id", "rating", "note", "at")}


def finite(x: Any) -> Any:
    """JSON has no inf/NaN: such floats become None (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
