"""`validator run`: probe rounds, scoring and reputation, unattended.

Two APScheduler jobs in one asyncio loop (APScheduler 3.x; its job store is in memory on
purpose — our own tables are the durable state):

- rounds (a loop of its own, not a job: a round lasts about its whole interval, and the
  next one must start on time): a round is the lease over a host's probes for one
  interval. Round r starts at r * interval + phase, the phase keyed by the secret, so
  validators sharing a database (and a secret) agree on the round while no public clock
  marks it. Each round claims the hosts, derives each host's probes from the secret, and
  sends each one without an answer yet at its own random time within `spread_s` of the
  round's start (Poisson arrivals per host; validator.probing.probes.arrival_offsets),
  committing every answer the moment it arrives. A round's last probes may overlap the
  next round's first. At most `concurrency` probes are in flight; a validator busy with
  as many probes as that leaves further hosts to the other validators.
- `score`: every `scoring.interval_s`, lease a batch of unscored answers across hosts,
  score them on the reference model (in a worker thread, so dispatching goes on),
  commit the scores, then update the reputation of each host involved.

Job defaults are set on purpose: coalesce (a late run runs once, not once per missed
interval), one instance per job, and a misfire grace as long as the interval
(APScheduler's default of 1 s would silently skip a run whenever the loop is busy).

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
from validator.probing.probes import (account_index, arrival_offsets, catch_up, derive_probes, load_bank,
                                      schedule_phase)
from validator.reputation import ReputationConfig, Transition
from validator.service.config import ValidatorConfig
from validator.service.credentials import (CredentialsError, HostCredentials, accounts_for,
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
        self._banks: dict[str, list] = {}  # claimed model -> the prompts its reference can score
        self.mix = config.probe_mix()
        self.phase = schedule_phase(self.secret, config.rounds.interval_s)
        self.wire = config.client.wire()
        self.service = Service(self.store, self.registry, ReputationConfig.from_dict(config.reputation),
                               Scorer(self.registry, models=models))
        self.progress = Progress()
        self.started_at = _now()
        self.on_event = on_event or (lambda message: log.info(message))
        self.stopping = asyncio.Event()
        self._inflight: set[asyncio.Task] = set()
        self._semaphore = asyncio.Semaphore(config.rounds.concurrency)
        # Probes claimed and not yet known to wait for a later time, or due and not done:
        # a validator claims more hosts only while this is below the concurrency.
        self._busy = 0
        self._busy_changed = asyncio.Condition()
        # (credentials key, account) -> (credentials, the session their clients share
        # across rounds).
        self._sessions: dict[tuple[str, int], tuple[HostCredentials, AuthSession]] = {}
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
        now = time.time() if now is None else now
        return int((now - self.phase) // self.config.rounds.interval_s)

    def round_start(self, round_no: int) -> float:
        return round_no * self.config.rounds.interval_s + self.phase

    @property
    def window_s(self) -> float:
        """How much of a round a host's probes are spread over."""
        rounds = self.config.rounds
        return rounds.interval_s if rounds.spread_s is None else min(rounds.spread_s, rounds.interval_s)

    async def _add_busy(self, n: int) -> None:
        async with self._busy_changed:
            self._busy += n
            self._busy_changed.notify_all()

    async def probe_round(self, round_no: int | None = None, started: float | None = None) -> int:
        """Claim and probe hosts for one round until none is left; returns hosts probed.
        `started`: the wall-clock start the probes' times count from (default: the
        round's keyed start, or now for a round whose start is still ahead)."""
        round_no = self.round_number() if round_no is None else round_no
        started = min(self.round_start(round_no), time.time()) if started is None else started
        cfg = self.config.rounds
        t0 = time.monotonic()
        tasks: dict[str, asyncio.Task] = {}
        try:  # rotated credentials are picked up without a restart
            self._secrets = self._read_secrets()
        except CredentialsError as exc:
            self.on_event(f"{exc}; keeping the credentials read before")
        # A pool no larger than the probes in flight: httpcore scans its whole pool per
        # request, so twice the connections cost ~4x the CPU (benchmarks/daemon_overhead.py).
        async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
                max_connections=cfg.concurrency, keepalive_expiry=4.0)) as http:
            while not self.stopping.is_set():
                while self._busy >= cfg.concurrency and not self.stopping.is_set():
                    async with self._busy_changed:
                        with contextlib.suppress(TimeoutError):  # a stop does not notify
                            await asyncio.wait_for(self._busy_changed.wait(), 1.0)
                if self.stopping.is_set():
                    break
                # A claim returns the hosts this validator already holds in the round too
                # (restart recovery): ask for that many more, and start only new ones.
                held = sum(not (t.done() and not t.cancelled() and t.exception() is None and t.result())
                           for t in tasks.values())
                hosts = await asyncio.to_thread(self.store.claim_host_rounds, round_no, self.owner,
                                                cfg.claim_batch + held, cfg.lease_s)
                new = [h for h in hosts if h not in tasks]
                if not new:
                    break
                await self._add_busy(len(new) * cfg.probes_per_host)
                tasks.update((h, asyncio.ensure_future(self._probe_host_isolated(round_no, h, http, started)))
                             for h in new)
            await asyncio.gather(*tasks.values())
        self.progress.rounds += 1
        took = time.monotonic() - t0
        self.on_event(f"round {round_no}: {len(tasks)} hosts probed in {took:.0f} s")
        return len(tasks)

    async def _probe_host_isolated(self, round_no: int, name: str, http: httpx.AsyncClient,
                                   started: float) -> bool:
        """Probe one host; whatever that raises stays with the host (logged, its unanswered
        probes recorded as client_bug, its round closed) and the round goes on for the rest."""
        try:
            return await self._probe_host(round_no, name, http, started)
        except Exception as exc:  # noqa: BLE001 - one host must never abandon the round
            log.exception("round %s: probing host %s failed", round_no, name)
            self.on_event(f"round {round_no}: {name}: {type(exc).__name__} while probing "
                          f"(logged); its unanswered probes are recorded as client_bug")
            return await asyncio.to_thread(self._record_host_failure, round_no, name, exc)

    def _record_host_failure(self, round_no: int, name: str, exc: Exception) -> bool:
        if self.stopping.is_set():  # probes left unsent by the stop are not failures: a restart sends them
            return False
        try:
            for probe in self.store.pending_probes(round_no, name):
                self.store.record_dispatch(probe["id"], _failed_call(exc, "probing the host"), self.owner)
            self.update_reputation(name)
            return self.store.finish_host_round(name, round_no, self.owner)
        except Exception:  # noqa: BLE001 - e.g. the database is down: the lease runs out, retried then
            log.exception("round %s: host %s: its failure could not be recorded", round_no, name)
            return False

    async def _probe_host(self, round_no: int, name: str, http: httpx.AsyncClient,
                          started: float) -> bool:
        """Send the host's pending probes of the round, each at its time; True when the
        host's round is finished (False: stopped, or the lease went to another)."""
        cfg = self.config
        held = cfg.rounds.probes_per_host  # busy count this host holds (reserved when claimed)

        async def adjust(n: int) -> None:
            nonlocal held
            held += n
            await self._add_busy(n)

        try:
            host = await asyncio.to_thread(self.store.get_host, name)
            probes = derive_probes(self.secret, round_no, name, self.bank_for(host["model"]), self.mix,
                                   cfg.rounds.probes_per_host)
            await asyncio.to_thread(self.store.ensure_probes, round_no, name,
                                    [p.as_dict() for p in probes])
            pending = {p["id"] for p in await asyncio.to_thread(self.store.pending_probes, round_no, name)}
            window, now = self.window_s, time.time()
            due = [started + o for o in arrival_offsets(self.secret, round_no, name, len(probes), window)]
            due = catch_up(due, now, window / len(probes), random.Random())
            todo = [(p, at, at <= now) for p, at in zip(probes, due) if p.id in pending]
            # Probes that wait for a later time are not busy until their time comes.
            await adjust(sum(now_due for *_, now_due in todo) - held)
            clients = [FlexstackClient(host["url"], session=session, attribution=self.attribution, http=http,
                                       timeouts=cfg.client.timeouts(), wire=self.wire)
                       for session in self._sessions_of(host["token_env"] or name)]
            gateway = name in self.gateways

            async def send(probe, at: float, counted: bool) -> bool:
                if not counted:
                    await self._sleep(at - time.time())
                    if self.stopping.is_set():
                        return False
                    await adjust(1)
                try:
                    if renewer.done():
                        return False  # the lease is lost: its new holder sends the probe
                    async with self._semaphore:
                        if self.stopping.is_set():
                            return False
                        self.progress.sent += 1
                        client = clients[account_index(self.secret, probe.id, len(clients))]
                        record = await client.complete(probe.messages, probe.wire_settings,
                                                       model=host["model"], stream=probe.stream)
                    # Committed before anything else looks at it: a crash after this loses nothing.
                    if await asyncio.to_thread(self.store.record_dispatch, probe.id, record, self.owner,
                                               served_host=record.served_by if gateway else None):
                        self.progress.answered += record.ok
                    return record.ok
                finally:
                    await adjust(-1)

            # Probes wait for their times longer than the lease lasts: keep it meanwhile,
            # or another validator re-sends them. A probe that raises leaves the others to
            # finish and be stored; then the host's handler (_probe_host_isolated) records it.
            renewer = asyncio.ensure_future(self._renew_lease(name, round_no))
            try:
                answered = await asyncio.gather(*(send(*t) for t in todo), return_exceptions=True)
            finally:
                lost = renewer.done()
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
        finally:
            if held:
                await self._add_busy(-held)
        failed = [r for r in answered if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        if any(answered):
            await asyncio.to_thread(self.store.touch, name)
        # Availability and latency change with every round, scored or not.
        await asyncio.to_thread(self.update_reputation, name)
        if self.stopping.is_set() or lost:
            return False
        return await asyncio.to_thread(self.store.finish_host_round, name, round_no, self.owner)

    def bank_for(self, model: str) -> list:
        """The bank's prompts the reference of `model` can score (its chat template takes
        them): a probe no answer to which can be scored is never sent."""
        if model not in self._banks:
            reasons = self.service.scorer.refusals(model, [p.messages for p in self.bank])
            self._banks[model] = [p for p, why in zip(self.bank, reasons) if why is None]
            refused = [(p.id, why) for p, why in zip(self.bank, reasons) if why is not None]
            if refused:
                self.on_event(f"{len(refused)} of {len(self.bank)} prompts are not sent to hosts claiming "
                              f"{model} (e.g. {refused[0][0]}: {refused[0][1]})")
            if not self._banks[model]:
                raise ValueError(f"no prompt of the bank can be scored for model {model!r}")
        return self._banks[model]

    def _read_secrets(self) -> dict:
        path = self.config.credentials_file
        return read_secrets_file(path) if path else {}

    def _sessions_of(self, key: str) -> list[AuthSession]:
        """The sessions of credentials key `key`, one per account of its pool, each kept
        while its credentials stay the same (tokens from a login or refresh live across
        rounds) and new when they change."""
        try:
            accounts = accounts_for(key, self._secrets)
        except CredentialsError as exc:  # the calls fail as auth_failed: the validator's error
            self.on_event(str(exc))
            accounts = [HostCredentials()]
        sessions = []
        for i, creds in enumerate(accounts):
            held = self._sessions.get((key, i))
            if held is None or held[0] != creds:
                held = self._sessions[(key, i)] = (creds, AuthSession(creds.token, creds.refresh_token,
                                                                      creds.username, creds.password))
            sessions.append(held[1])
        return sessions

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
        scoring = self.config.scoring
        scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()}, executors={"default": AsyncIOExecutor()},
            job_defaults={"coalesce": True, "max_instances": 1,
                          "misfire_grace_time": int(max(1, scoring.interval_s))})
        rounds_done = asyncio.Event()

        async def round_loop() -> None:
            await self._round_loop(max_rounds, first_round)
            rounds_done.set()

        async def score_job() -> None:
            await self._tracked(self.score_pending())

        scheduler.add_job(score_job, IntervalTrigger(seconds=scoring.interval_s), id="score",
                          misfire_grace_time=int(max(1, scoring.interval_s)), next_run_time=_now())
        scheduler.add_job(self.heartbeat, IntervalTrigger(seconds=HEARTBEAT_S), id="heartbeat",
                          misfire_grace_time=HEARTBEAT_S, next_run_time=_now())
        # A job still running when its next run is due is skipped (max_instances=1): for the
        # scorer, which works until the queue is empty, that is the normal case, not news.
        logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
        scheduler.start()
        self.on_event(f"validator {self.owner} running; database {self.config.database_shown}")
        looping = asyncio.ensure_future(round_loop())
        try:
            stop_wait = asyncio.ensure_future(self.stopping.wait())
            rounds_wait = asyncio.ensure_future(rounds_done.wait())
            await asyncio.wait({stop_wait, rounds_wait}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (stop_wait, rounds_wait):
                waiter.cancel()
            if rounds_done.is_set() and not self.stopping.is_set():
                await self.drain()  # the last round is in: score what is left, then stop
                await self._tracked(self.score_pending())
                self.stopping.set()
        finally:
            scheduler.shutdown(wait=False)
            await self.drain()
            await asyncio.gather(looping, return_exceptions=True)
            await self.heartbeat(stopped=True)
        return self.progress

    async def _round_loop(self, max_rounds: int | None, first_round: int | None) -> None:
        """Start rounds until stopped (or `max_rounds` have started), then wait for them.
        By the clock, each round starts at its keyed start and may overlap the previous
        one's last probes; numbered from `first_round`, rounds run back to back, each
        timed from when it starts."""
        interval = self.config.rounds.interval_s
        running: list[asyncio.Future] = []
        count = 0
        while not self.stopping.is_set() and (max_rounds is None or count < max_rounds):
            count += 1
            more = max_rounds is None or count < max_rounds
            if first_round is None:
                round_no = self.round_number()
                running.append(asyncio.ensure_future(self._tracked(self.probe_round(round_no))))
                if more:
                    await self._sleep(self.round_start(round_no + 1) - time.time())
            else:
                t0 = time.time()
                await self._tracked(self.probe_round(first_round + count - 1, started=t0))
                if more:
                    await self._sleep(t0 + interval - time.time())
        await asyncio.gather(*running, return_exceptions=True)

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

