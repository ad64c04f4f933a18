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
import contextlib
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
from sqlalchemy.exc import IntegrityError

from validator.models.registry import Registry
from validator.probing.client import Attribution, AuthSession, CallRecord, Err, FlexstackClient
from validator.probing.probes import derive_probes, load_bank, load_mix
from validator.reputation import ReputationConfig, Transition
from validator.service.config import ValidatorConfig
from validator.service.credentials import (CredentialsError, HostCredentials, credentials_for,
                                           read_secrets_file)
from validator.service.operations import Service
from validator.service.scorer import Scorer
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
        self.bank = load_bank(config.prompts)
        self.mix = load_mix(config.settings_mix)
        self.service = Service(self.store, self.registry, ReputationConfig.from_dict(config.reputation),
                               Scorer(self.registry, models=models))
        self.progress = Progress()
        self.started_at = _now()
        self.on_event = on_event or (lambda message: log.info(message))
        self.stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._semaphore = asyncio.Semaphore(config.rounds.concurrency)
        # Credentials key -> (credentials, the session their clients share across rounds).
        self._sessions: dict[str, tuple[HostCredentials, AuthSession]] = {}
        self._secrets = self._read_secrets()  # an unreadable file stops the start
        self.gateways = {h.name for h in config.hosts if h.gateway}
        self.attribution = Attribution(config.attribution.header, config.attribution.body_field)
        for host in config.hosts:
            if self.store.get_host(host.name) is None:
                try:
                    # The store's token_env column holds the credentials key.
                    self.store.add_host(host.name, host.url, host.model, token_env=host.credentials)
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
        try:  # rotated credentials are picked up without a restart
            self._secrets = self._read_secrets()
        except CredentialsError as exc:
            self.on_event(f"{exc}; keeping the credentials read before")
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
        if self.stopping.is_set():  # probes left unsent by the stop are not failures: a restart sends them
            return
        try:
            for probe in self.store.pending_probes(round_no, name):
                self.store.record_dispatch(probe["id"], _failed_call(exc, "probing the host"), self.owner)
            self.update_reputation(name)
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
        client = FlexstackClient(host["url"], session=self._session(host["token_env"] or name),
                                 attribution=self.attribution, http=http, timeouts=cfg.client.timeouts())
        gateway = name in self.gateways

        async def send(probe) -> bool:
            async with self._semaphore:
                if self.stopping.is_set():
                    return False
                self.progress.sent += 1
                record = await client.complete(probe.messages, probe.wire_settings,
                                               model=host["model"], stream=probe.stream)
            # Committed before anything else looks at it: a crash after this loses nothing.
            if await asyncio.to_thread(self.store.record_dispatch, probe.id, record, self.owner,
                                       served_host=record.served_by if gateway else None):
                self.progress.answered += record.ok
            return record.ok

        # A round slower than the lease must keep it, or another validator re-sends the probes.
        # A probe that raises leaves the others to finish and be stored; then the host's
        # handler (_probe_host_isolated) records it.
        renewer = asyncio.ensure_future(self._renew_lease(name, round_no))
        try:
            answered = await asyncio.gather(*(send(p) for p in probes if p.id in pending),
                                            return_exceptions=True)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        failed = [r for r in answered if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if any(answered):
            await asyncio.to_thread(self.store.touch, name)
        # Availability and latency change with every round, scored or not.
        await asyncio.to_thread(self.update_reputation, name)
        if not self.stopping.is_set():
            await asyncio.to_thread(self.store.finish_host_round, name, round_no, self.owner)

    def _read_secrets(self) -> dict:
        path = self.config.credentials_file
        return read_secrets_file(path) if path else {}

    def _session(self, key: str) -> AuthSession:
        """The session of credentials key `key`, kept while its credentials stay the same
        (tokens from a login or refresh live across rounds); new when they change."""
        try:
            creds = credentials_for(key, self._secrets)
        except CredentialsError as exc:  # the calls fail as auth_failed: the validator's error
            self.on_event(str(exc))
            creds = HostCredentials()
        held = self._sessions.get(key)
        if held is None or held[0] != creds:
            held = self._sessions[key] = (creds, AuthSession(creds.token, creds.refresh_token,
                                                             creds.username, creds.password))
        return held[1]

    async def _renew_lease(self, host: str, round_no: int) -> None:
        lease_s = self.config.rounds.lease_s
        while True:
            await asyncio.sleep(lease_s / 3)
            if not await asyncio.to_thread(self.store.renew_lease, host, round_no, self.owner, lease_s):
                log.warning("lost the lease on %s round %d", host, round_no)
                return

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
        cfg = self.config.scoring
        batch = self.service.score_stored(self.owner, limit=cfg.batch, lease_s=cfg.lease_s, rerun=cfg.rerun)
        self.progress.scored += batch.scored
        for host, transition in batch.transitions:
            self._announce(host, transition)
        return batch.scored

    def update_reputation(self, host: str) -> None:
        transition = self.service.refresh_reputation(host)
        if transition:
            self._announce(host, transition)

    def _announce(self, host: str, transition: Transition) -> None:
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
        self.on_event(f"validator {self.owner} running; database {self.config.database_shown}")
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

