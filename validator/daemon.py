"""`validator run`: probe rounds, scoring and reputation, unattended.

Two APScheduler jobs in one asyncio loop (APScheduler 3.x; its job store is in memory on
purpose — our own tables are the durable state):

- `round`: every `rounds.interval_s` (with jitter), claim hosts for the current round
  (round number = time // interval, so every validator agrees on it), derive each host's
  probes from the secret, send the ones without an answer yet, and commit every answer
  the moment it arrives. Hosts start at random offsets within `spread_s`; at most
  `concurrency` probes are in flight.
- `score`: every `scoring.interval_s`, lease a batch of unscored answers across hosts,
  score them on the reference model (in a worker thread, so dispatching goes on),
  commit the scores, then update the reputation of each host involved.

Job defaults are set on purpose: coalesce (a late round runs once, not once per missed
interval), one instance per job (a slow round is not overlapped by the next), and a
misfire grace as long as the interval (APScheduler's default of 1 s would silently skip a
round whenever the loop is busy for a second).

SIGTERM/SIGINT drain: no new work is claimed, in-flight probes finish (bounded by the
client's deadline), the scoring batch in progress commits, then the process exits.
SIGKILL at any moment loses nothing committed: an answer is one row keyed by its probe,
a score one row keyed by its probe, and leases expire so another validator (or this one,
restarted) picks the work up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
from sqlalchemy.exc import IntegrityError

from validator.probing.client import CallRecord, Err, FlexstackClient
from validator.service.config import ValidatorConfig
from validator.probing.probes import derive_probes, load_bank, load_mix
from validator.models.registry import Registry
from validator.reputation import Outcome, ReputationConfig, Transition, assess
from validator.store import Store, upgrade

log = logging.getLogger(__name__)
HEARTBEAT_S = 30  # `validator status` calls a validator alive within 3 heartbeats


@dataclass
class Progress:
    """What the daemon has done since it started (for the demo's display and tests)."""
    rounds: int = 0
    sent: int = 0
    answered: int = 0
    scored: int = 0
    transitions: list[str] = field(default_factory=list)


class Daemon:
    def __init__(self, config: ValidatorConfig, *, store: Store | None = None,
                 registry: Registry | None = None, models: dict | None = None,
                 on_event: Callable[[str], None] | None = None):
        self.config = config
        self.owner = config.instance_name()
        self.secret = config.probe_secret()
        upgrade(config.database_url)
        self.store = store or Store(config.database_url)
        self.registry = registry or Registry.load(config.models)
        self.models = models if models is not None else {}  # name -> ReferenceModel, loaded once
        self.bank = load_bank(config.prompts)
        self.mix = load_mix(config.settings_mix)
        self.reputation = ReputationConfig.from_dict(config.reputation)
        self.progress = Progress()
        self.started_at = _now()
        self.on_event = on_event or (lambda message: log.info(message))
        self.stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._score_lock = threading.Lock()
        self._reputation_lock = threading.Lock()
        self._semaphore = asyncio.Semaphore(config.rounds.concurrency)
        for host in config.hosts:
            if self.store.get_host(host.name) is None:
                try:
                    self.store.add_host(host.name, host.url, host.model, token_env=host.token_env)
                except (ValueError, IntegrityError):  # another validator added it just now
                    if self.store.get_host(host.name) is None:
                        raise

    # ------------------------------------------------------------------ probing
    def round_number(self, now: float | None = None) -> int:
        return int((now if now is not None else time.time()) // self.config.rounds.interval_s)

    async def probe_round(self, round_no: int | None = None) -> int:
        """Claim and probe hosts for one round until none is left; returns hosts probed."""
        round_no = self.round_number() if round_no is None else round_no
        cfg = self.config.rounds
        probed, started = 0, time.monotonic()
        # A pool no larger than the probes in flight: httpcore scans its whole pool per
        # request, so twice the connections cost ~4x the CPU (benchmarks/daemon_overhead.py).
        async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
                max_connections=cfg.concurrency, keepalive_expiry=4.0)) as http:
            while not self.stopping.is_set():
                hosts = await asyncio.to_thread(self.store.claim_host_rounds, round_no, self.owner,
                                                cfg.claim_batch, cfg.lease_s)
                if not hosts:
                    break
                await asyncio.gather(*(self._probe_host_isolated(round_no, h, http) for h in hosts))
                probed += len(hosts)
        self.progress.rounds += 1
        took = time.monotonic() - started
        self.on_event(f"round {round_no}: {probed} hosts probed in {took:.0f} s"
                      + (f" (longer than the {cfg.interval_s:.0f} s interval)" if took > cfg.interval_s else ""))
        return probed

    async def _probe_host_isolated(self, round_no: int, name: str, http: httpx.AsyncClient) -> None:
        """Probe one host; whatever that raises stays with the host (logged, its unanswered
        probes recorded as client_bug, its round closed) and the round goes on for the rest."""
        try:
            await self._probe_host(round_no, name, http)
        except Exception as exc:  # noqa: BLE001 - one host must never abandon the round
            log.exception("round %s: probing host %s failed", round_no, name)
            self.on_event(f"round {round_no}: {name}: {type(exc).__name__} while probing "
                          f"(logged); its unanswered probes are recorded as client_bug")
            await asyncio.to_thread(self._record_host_failure, round_no, name, exc)

    def _record_host_failure(self, round_no: int, name: str, exc: Exception) -> None:
        try:
            for probe in self.store.pending_probes(round_no, name):
                self.store.record_dispatch(probe["id"], _failed_call(exc, "probing the host"), self.owner)
            self.update_reputation(name)
            if not self.stopping.is_set():
                self.store.finish_host_round(name, round_no, self.owner)
        except Exception:  # noqa: BLE001 - e.g. the database is down: the lease runs out, retried then
            log.exception("round %s: host %s: its failure could not be recorded", round_no, name)

    async def _probe_host(self, round_no: int, name: str, http: httpx.AsyncClient) -> None:
        cfg = self.config
        host = await asyncio.to_thread(self.store.get_host, name)
        probes = derive_probes(self.secret, round_no, name, self.bank, self.mix,
                               cfg.rounds.probes_per_host)
        await asyncio.to_thread(self.store.ensure_probes, round_no, name,
                                [p.as_dict() for p in probes])
        pending = {p["id"] for p in await asyncio.to_thread(self.store.pending_probes, round_no, name)}
        if pending and cfg.rounds.spread_s:
            await self._sleep(random.uniform(0, cfg.rounds.spread_s))
        token = (os.environ.get(host["token_env"]) if host["token_env"] else None) or "validator"
        client = FlexstackClient(host["url"], token=token, http=http, timeouts=cfg.client.timeouts())

        async def send(probe) -> bool:
            async with self._semaphore:
                if self.stopping.is_set():
                    return False
                self.progress.sent += 1
                record = await client.complete(probe.messages, probe.wire_settings,
                                               model=host["model"], stream=probe.stream)
            # Committed before anything else looks at it: a crash after this loses nothing.
            if await asyncio.to_thread(self.store.record_dispatch, probe.id, record, self.owner):
                self.progress.answered += record.ok
            return record.ok

        # A probe that raises leaves the others to finish and be stored; then the host's
        # handler (_probe_host_isolated) records it.
        answered = await asyncio.gather(*(send(p) for p in probes if p.id in pending),
                                        return_exceptions=True)
        failed = [r for r in answered if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if any(answered):
            await asyncio.to_thread(self.store.touch, name)
        # Availability and latency change with every round, scored or not.
        await asyncio.to_thread(self.update_reputation, name)
        if not self.stopping.is_set():
            await asyncio.to_thread(self.store.finish_host_round, name, round_no, self.owner)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ scoring
    async def score_pending(self) -> int:
        """Score leased batches until none is left; returns answers scored."""
        total = 0
        while not self.stopping.is_set():
            n = await asyncio.to_thread(self.score_batch)
            total += n
            if n == 0:
                break
        return total

    def score_batch(self) -> int:
        from validator.scoring.batch import run_audit

        cfg = self.config.scoring
        with self._score_lock:
            rows = self.store.claim_unscored(self.owner, cfg.batch, cfg.lease_s)
            if not rows:
                return 0
            lines = [json.dumps({"id": r["probe_id"], "host": r["host"], "model": r["model"],
                                 "messages": r["messages"], "configs": r["configs"],
                                 "response": r["text"]}) for r in rows]
            outputs, _ = run_audit(lines, self.registry, models=self.models, rerun=cfg.rerun,
                                   on_error=lambda m: log.warning("scoring: %s", m))
            for row, out in zip(rows, outputs):
                self.store.record_score(row["probe_id"], out["verdict"], out.get("p_value"),
                                        out.get("reasons", []), out.get("metrics", {}), self.owner)
            self.progress.scored += len(rows)
            for host in sorted({r["host"] for r in rows}):
                self.update_reputation(host)
            return len(rows)

    def update_reputation(self, host: str) -> None:
        with self._reputation_lock:
            transition = refresh_reputation(self.store, host, self.reputation)
        if transition:
            message = f"{host}: {transition.state_from} -> {transition.state_to}: {transition.reason}"
            self.progress.transitions.append(message)
            self.on_event(message)

    # ------------------------------------------------------------------ running
    async def run(self, max_rounds: int | None = None, first_round: int | None = None) -> Progress:
        """Serve until SIGTERM/SIGINT (or `max_rounds` rounds are probed and scored).
        `first_round` numbers the rounds first_round, first_round + 1, ... instead of by
        the clock, so that a demo or benchmark draws the same probes on every run (a
        deployed validator keeps the clock: every validator must agree on the round)."""
        from apscheduler.executors.asyncio import AsyncIOExecutor
        from apscheduler.jobstores.memory import MemoryJobStore
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread
                pass
        rounds, scoring = self.config.rounds, self.config.scoring
        scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()}, executors={"default": AsyncIOExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(max(1, rounds.interval_s))})
        done_rounds = 0
        rounds_done = asyncio.Event()

        async def round_job() -> None:
            nonlocal done_rounds
            await self._tracked(self.probe_round(None if first_round is None else first_round + done_rounds))
            done_rounds += 1
            if max_rounds is not None and done_rounds >= max_rounds:
                rounds_done.set()

        async def score_job() -> None:
            await self._tracked(self.score_pending())

        scheduler.add_job(round_job, IntervalTrigger(seconds=rounds.interval_s, jitter=rounds.jitter_s or None),
                          id="round", next_run_time=_now())
        scheduler.add_job(score_job, IntervalTrigger(seconds=scoring.interval_s), id="score",
                          misfire_grace_time=int(max(1, scoring.interval_s)), next_run_time=_now())
        scheduler.add_job(self.heartbeat, IntervalTrigger(seconds=HEARTBEAT_S), id="heartbeat",
                          misfire_grace_time=HEARTBEAT_S, next_run_time=_now())
        # A job still running when its next run is due is skipped (max_instances=1): for the
        # scorer, which works until the queue is empty, that is the normal case, not news.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        scheduler.start()
        self.on_event(f"validator {self.owner} running; database {self.config.database_url}")
        try:
            stop_wait = asyncio.ensure_future(self.stopping.wait())
            rounds_wait = asyncio.ensure_future(rounds_done.wait())
            await asyncio.wait({stop_wait, rounds_wait}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (stop_wait, rounds_wait):
                waiter.cancel()
            if rounds_done.is_set() and not self.stopping.is_set():
                scheduler.remove_job("round")  # the last round is in: score what is left, then stop
                await self.drain()
                await self._tracked(self.score_pending())
                self.stopping.set()
        finally:
            scheduler.shutdown(wait=False)
            await self.drain()
            await self.heartbeat(stopped=True)
        return self.progress

    async def heartbeat(self, stopped: bool = False) -> None:
        await asyncio.to_thread(self.store.heartbeat, self.owner, socket.gethostname(), os.getpid(),
                                self.started_at, stopped)

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.on_event("stopping: finishing in-flight work")
            self.stopping.set()

    async def drain(self) -> None:
        if self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def _tracked(self, coro):
        """Run work the drain waits for; shielded, so the scheduler's shutdown cancelling
        a job does not cancel a round or a scoring batch half done."""
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)


def _failed_call(exc: BaseException, doing: str) -> CallRecord:
    """The record of a call that ended in an exception of ours (validator.probing.client.Err)."""
    return CallRecord(ok=False, error=Err.CLIENT_BUG,
                      detail=f"{type(exc).__name__} while {doing}: {str(exc)[:500]}")


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def outcomes(store: Store, host: str) -> list[Outcome]:
    """A host's probe outcomes, as reputation reads them, from the stored answers."""
    return [Outcome(probe_id=probe_id, at=at, verdict=verdict,
                    p_value=p_value if verdict != "error" else None, error=error,
                    ttfb_s=ttfb_s, total_s=total_s, bytes=nbytes or 0)
            for probe_id, at, error, ttfb_s, total_s, nbytes, verdict, p_value
            in store.host_outcomes(host)]


def refresh_reputation(store: Store, host: str, config: ReputationConfig) -> Transition | None:
    """Recompute a host's standing from everything stored (a pure function of the rows,
    so a restarted validator gets the same answer) and store it; returns the state
    change, if any, which is stored with its evidence."""
    row = store.get_host(host)
    if row is None or row["state"] == "disabled":
        return None
    released = [e["at"] for e in store.reputation_events(host)
                if e["state_from"] == "flagged" and e["state_to"] == "probation"]
    feedback = [f["rating"] for f in store.feedback_for(host)]
    standing, transition = assess(row["state"], outcomes(store, host), feedback, config,
                                  since=max(released) if released else None)
    if transition:
        if store.set_state(host, standing.state, score=standing.score,
                           components=standing.components, evidence=transition.evidence,
                           reason=transition.reason, expect=row["state"]) is None:
            return None  # another validator changed the state first
    else:
        store.set_score(host, standing.score)
    return transition
