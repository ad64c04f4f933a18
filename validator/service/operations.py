"""The operations that read the store, run a stage and write the result back. Every front
door (daemon, CLI, REST API, dashboard, bench) calls these instead of wiring the store
and the stages itself, so each rule is written once:

- scoring stored answers: leased from the queue, scored by the batch scorer as typed
  records, each score stored with its provenance; a record whose scoring raises is
  isolated and stored as `error` with the reason, so no batch is leased again forever;
- a host's reputation: recomputed from everything stored (a pure function of the rows,
  so a restarted validator gets the same answer), ratings oldest first;
- admin transitions, always conditional on the state they were decided from;
- feedback, folded into the host's score at once.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Sequence

from validator import reputation
from validator.models.registry import Registry
from validator.reputation import Outcome, ReputationConfig, Standing, Transition, assess
from validator.scoring.batch import AnswerRecord, InputError, ScoredAnswer, error
from validator.service.scorer import ModelUnavailable, Scorer
from validator.store import Store

log = logging.getLogger(__name__)
ADMIN_ACTIONS = ("disable", "enable", "release")


class UnknownHost(LookupError):
    pass


class UnknownProbe(LookupError):
    pass


class StateChanged(RuntimeError):
    """The host's state changed between reading it and writing the transition."""


def outcomes(store: Store, host: str) -> list[Outcome]:
    """A host's probe outcomes, as reputation reads them, from the stored answers."""
    return [Outcome(probe_id=probe_id, at=at, verdict=verdict,
                    p_value=p_value if verdict != "error" else None, error=error_class,
                    ttfb_s=ttfb_s, total_s=total_s, bytes=nbytes or 0,
                    pooled=pooled if verdict != "error" else None)
            for probe_id, at, error_class, ttfb_s, total_s, nbytes, verdict, p_value, pooled
            in store.host_outcomes(host)]


def ratings(store: Store, host: str) -> list[float]:
    """A host's feedback ratings oldest first, as reputation weighs them (newest most)."""
    return [f["rating"] for f in reversed(store.feedback_for(host))]


def evidence_since(events: Sequence[dict]) -> datetime | None:
    """Start of a host's evidence window: its last release from flagged."""
    released = [e["at"] for e in events if e["state_from"] == "flagged" and e["state_to"] == "probation"]
    return max(released) if released else None


def assess_host(store: Store, host: str, config: ReputationConfig) -> tuple[dict, Standing, Transition | None] | None:
    """(host row, standing, transition if the evidence moves it) from the stored rows."""
    row = store.get_host(host)
    if row is None:
        return None
    standing, transition = assess(row["state"], outcomes(store, host), ratings(store, host), config,
                                  since=evidence_since(store.reputation_events(host)))
    return row, standing, transition


@dataclass
class ScoringBatch:
    scored: int = 0
    hosts: list[str] = field(default_factory=list)
    transitions: list[tuple[str, Transition]] = field(default_factory=list)


class Service:
    def __init__(self, store: Store, registry: Registry, reputation_config: ReputationConfig | None = None,
                 scorer: Scorer | None = None):
        self.store = store
        self.registry = registry
        self.reputation = reputation_config or ReputationConfig()
        self.scorer = scorer or Scorer(registry)
        # One refresh of a host at a time in this process (validators elsewhere are kept
        # apart by set_state's condition), and one scoring batch: a validator's own live
        # leases come back to it, so two batches at once would score the same answers.
        self._reputation_lock = threading.Lock()
        self._scoring_lock = threading.Lock()

    # ------------------------------------------------------------------ reputation
    def refresh_reputation(self, host: str) -> Transition | None:
        """Recompute a host's standing and store it; returns the state change, if any,
        which is stored with its evidence. Disabled hosts stay as the admin left them."""
        with self._reputation_lock:
            found = assess_host(self.store, host, self.reputation)
            if found is None or found[0]["state"] == "disabled":
                return None
            row, standing, transition = found
            if transition:
                if self.store.set_state(host, standing.state, score=standing.score,
                                        components=standing.components, evidence=transition.evidence,
                                        reason=transition.reason, expect=row["state"]) is None:
                    return None  # another validator changed the state first
            else:
                self.store.set_score(host, standing.score)
            return transition

    # ------------------------------------------------------------------ scoring
    def score_stored(self, owner: str, *, limit: int, lease_s: float, rerun: bool) -> ScoringBatch:
        """Lease up to `limit` unscored answers, score them, store every score with its
        provenance, and refresh the reputation of each host involved."""
        with self._scoring_lock:
            rows = self.store.claim_unscored(owner, limit, lease_s)
            if not rows:
                return ScoringBatch()
            records: list[AnswerRecord | ScoredAnswer] = []
            for r in rows:
                try:
                    records.append(AnswerRecord.build(r["probe_id"], r["host"], r["model"], r["messages"],
                                                      r["configs"], r["text"]))
                except InputError as exc:
                    records.append(error(r["probe_id"], r["host"], r["model"], f"unscorable probe: {exc}"))
            todo = [x for x in records if isinstance(x, AnswerRecord)]
            scored = {id(rec): s for rec, s in zip(todo, self._score_isolated(todo, rerun))}
            for row, rec in zip(rows, records):
                s = scored[id(rec)] if isinstance(rec, AnswerRecord) else rec
                self.store.record_score(row["probe_id"], s.verdict, s.p_value, s.reasons, s.metrics, owner,
                                        provenance=s.provenance, pooled=s.metrics.get("pooled"))
        batch = ScoringBatch(scored=len(rows), hosts=sorted({r["host"] for r in rows}))
        for host in batch.hosts:
            transition = self.refresh_reputation(host)
            if transition:
                batch.transitions.append((host, transition))
        return batch

    def _score_isolated(self, records: list[AnswerRecord], rerun: bool) -> list[ScoredAnswer]:
        """Score a batch; a batch that raises is split until each failing record is an
        `error` with the reason (the validator's failure, not the host's)."""
        if not records:
            return []
        try:
            return self.scorer.score(records, rerun=rerun)
        except ModelUnavailable as exc:  # a cause of the model, not of one record
            models = {r.model for r in records}
            if len(models) == 1:
                return [error(r.id, r.host, r.model, str(exc)) for r in records]
        except Exception as exc:  # noqa: BLE001 - isolated below, logged with its traceback
            if len(records) == 1:
                log.exception("scoring %s failed", records[0].id)
                r = records[0]
                return [error(r.id, r.host, r.model, f"scoring failed: {type(exc).__name__}: {exc}")]
        half = len(records) // 2 if len({r.model for r in records}) == 1 else None
        if half is None:  # split by model first: one model's failure is not the others'
            by_model: dict[str, list[int]] = {}
            for i, r in enumerate(records):
                by_model.setdefault(r.model, []).append(i)
            out: list[ScoredAnswer | None] = [None] * len(records)
            for indices in by_model.values():
                for i, s in zip(indices, self._score_isolated([records[i] for i in indices], rerun)):
                    out[i] = s
            return out  # type: ignore[return-value]
        return self._score_isolated(records[:half], rerun) + self._score_isolated(records[half:], rerun)

    # ------------------------------------------------------------------ admin
    def add_host(self, name: str, url: str, model: str, *, token_env: str | None = None) -> None:
        """Add a host (or bring back a removed one with its history). ValueError: a live
        host has the name; RegistryError: the registry has no such model."""
        self.registry.get(model)
        self.store.add_host(name, url, model, token_env=token_env)

    def remove_host(self, name: str) -> None:
        if self.store.get_host(name) is None:
            raise UnknownHost(f"no host named {name!r}")
        self.store.remove_host(name)

    def transition(self, host: str, action: str, *, by: str, note: str = "") -> Transition:
        """An admin's disable, enable or release, recorded with who and why. Conditional:
        when the state changed since it was read (another admin, a validator's verdict),
        nothing is written and StateChanged is raised."""
        if action not in ADMIN_ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {', '.join(ADMIN_ACTIONS)}")
        row = self.store.get_host(host)
        if row is None:
            raise UnknownHost(f"no host named {host!r}")
        t = getattr(reputation, action)(row["state"], at=datetime.now(UTC), by=by, note=note)
        if self.store.set_state(host, t.state_to, evidence=t.evidence, reason=t.reason,
                                expect=row["state"]) is None:
            raise StateChanged(f"{host} changed state meanwhile; read it again")
        return t

    def add_feedback(self, probe_id: str, rating: float, note: str = "") -> dict:
        """A person's rating (1-5) of one answer, folded into the host's score at once."""
        if not (isinstance(rating, (int, float)) and math.isfinite(rating) and 1 <= rating <= 5):
            raise ValueError("rating must be between 1 and 5")
        probe = self.store.probe(probe_id)
        if probe is None:
            raise UnknownProbe(f"no probe {probe_id!r}")
        feedback_id = self.store.add_feedback(probe_id, float(rating), note)
        self.refresh_reputation(probe["host"])
        return {"id": feedback_id, "probe_id": probe_id, "host": probe["host"],
                "score": self.store.get_host(probe["host"])["score"]}
