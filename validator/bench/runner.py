"""Running a suite: probes through validator.probing.client, every result recorded durably the
moment it arrives, then scored with the audit scorer (validator.scoring.batch.run_audit, as the
daemon scores), then the reports.

The output directory is the run's state:

- `run.json`: the suite (its exact text and what it expanded to) and the fingerprint
  that a resumed run must match;
- `results.jsonl`: one line per answered probe (the raw answer or its error class, with
  timings), appended and fsync'd as each arrives, keyed by the probe's stable key;
- `scores.jsonl`: one line per scored answer (verdict, p-value, reasons, metrics);
- `sessions.jsonl`: one line per invocation (probes sent, skipped as done, scored);
- `report.json`, `report.md`, `report.html`, `plots/`: rewritten at the end of each run.

A SIGKILL at any moment loses at most the probes in flight (never a recorded line; a
line torn by the kill is cut off at the next start). Re-running the same command resumes:
probes with a recorded result are not sent again, scored answers are not scored again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from validator.bench import report as reporting
from validator.bench.files import JsonlLog, _fsync_dir, write_atomic
from validator.bench.suite import BenchProbe, Plan, SuiteError, credentials, plan
from validator.models.registry import Registry, RegistryError
from validator.probing.client import FlexstackClient
from validator.scoring.batch import AnswerRecord, InputError, error
from validator.service.scorer import ModelUnavailable, Scorer

RUN_SCHEMA = "validator.bench.run/1"
SCORE_CHUNK = 32  # answers per scoring call: each chunk's scores are recorded together
DETAIL_CAP = 500  # characters of an error's detail kept per probe


class Interrupted(Exception):
    """SIGINT/SIGTERM: what was recorded is kept; the same command resumes."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class OutDir:
    """The run's directory: locked while a run uses it, checked against the plan."""

    def __init__(self, path: Path, p: Plan):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = (path / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SuiteError(f"another `validator bench` is using {path}") from None
        manifest_path = path / "run.json"
        if manifest_path.exists():
            try:
                self.manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as exc:
                self.close()
                raise SuiteError(f"{manifest_path} is unreadable ({exc}); pass another --out") from None
            if self.manifest.get("fingerprint") != p.fingerprint:
                self.close()
                raise SuiteError(_mismatch(path, self.manifest.get("basis") or {}, p.basis))
            self.resumed = True
        else:
            self.manifest = {"schema": RUN_SCHEMA, "fingerprint": p.fingerprint, "created": now(),
                             "suite_path": str(p.suite_path),
                             "suite_sha256": hashlib.sha256(p.suite_text.encode()).hexdigest(),
                             "suite_text": p.suite_text, "basis": p.basis}
            write_atomic(manifest_path, json.dumps(self.manifest, indent=1) + "\n")
            _fsync_dir(path)
            self.resumed = False
        self.results = JsonlLog(path / "results.jsonl")
        self.scores = JsonlLog(path / "scores.jsonl")
        self.sessions_path = path / "sessions.jsonl"

    def sessions(self) -> list[dict]:
        if not self.sessions_path.exists():
            return []
        out = []
        for line in self.sessions_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_session(self, session: dict) -> None:
        with self.sessions_path.open("a") as fh:
            fh.write(json.dumps(session) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        for log in (getattr(self, "results", None), getattr(self, "scores", None)):
            if log is not None:
                log.close()
        self._lock.close()


def _mismatch(path: Path, old: dict, new: dict) -> str:
    differ = [f"suite.{k}" for k in sorted(set(old.get("suite", {})) | set(new["suite"]))
              if old.get("suite", {}).get(k) != new["suite"].get(k)]
    differ += [f"--{k.replace('_', '-')}" for k in sorted(new["options"])
               if old.get("options", {}).get(k) != new["options"][k]]
    if not differ and old.get("probes") != new["probes"]:
        differ.append("the prompts' content")
    return (f"{path} holds a run of a different suite or options (differs in: "
            f"{', '.join(differ) or 'unknown'}); rerun with the same suite file and options to "
            f"resume, or pass another --out")


# --------------------------------------------------------------------------- dispatch

def _record(p: BenchProbe, url: str, rec: Any, sent_at: str, session: int) -> dict:
    call = asdict(rec)
    call.pop("configs_echo", None)
    call["detail"] = (call.get("detail") or "")[:DETAIL_CAP]
    return {"key": p.key, "host": p.host, "url": url, "set": p.set, "prompt_id": p.prompt_id,
            "cell": p.cell, "repeat": p.repeat, "configs": p.settings.as_configs(), "seed": p.seed,
            **call, "sent_at": sent_at, "finished_at": now(), "session": session}


async def dispatch(p: Plan, todo: list[BenchProbe], results: JsonlLog, session: int,
                   on_done: Callable[[dict], None], log: Callable[[str], None] = lambda m: None) -> int:
    """Send `todo`, at most `concurrency` at a time; each result is recorded as it
    arrives. SIGINT/SIGTERM: no new probe starts, those in flight finish (a second
    signal abandons them: they are sent again on resume). Returns probes recorded."""
    suite = p.suite
    hosts = {h.name: h for h in suite.hosts}
    creds = {name: credentials(h) for name, h in hosts.items()}
    stopping = asyncio.Event()
    sem = asyncio.Semaphore(suite.concurrency)
    recorded = 0
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []

    def on_signal() -> None:
        if stopping.is_set():
            for t in tasks:
                t.cancel()
            return
        stopping.set()
        log(f"stopping: {min(suite.concurrency, len(todo) - recorded)} probes in flight finish "
            "first (signal again to abandon them; they are sent on resume)")

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    timeouts = suite.client.timeouts()
    try:
        async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(
                max_connections=suite.concurrency, keepalive_expiry=4.0)) as http:
            clients = {name: FlexstackClient(h.url, token=creds[name].token, username=creds[name].username,
                                             password=creds[name].password, http=http, timeouts=timeouts)
                       for name, h in hosts.items()}

            async def send(probe: BenchProbe) -> None:
                nonlocal recorded
                async with sem:
                    if stopping.is_set():
                        return
                    sent_at = now()
                    rec = await clients[probe.host].complete(
                        probe.messages, probe.settings, model=hosts[probe.host].model or suite.model,
                        stream=probe.stream)
                row = _record(probe, hosts[probe.host].url, rec, sent_at, session)
                results.append(row)  # durable before anything else looks at it
                recorded += 1
                on_done(row)

            tasks.extend(asyncio.ensure_future(send(probe)) for probe in todo)
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    if stopping.is_set():
        raise Interrupted(f"interrupted after recording {recorded} probes")
    return recorded


# --------------------------------------------------------------------------- scoring

def score_pending(p: Plan, out: OutDir, *, registry: Any = None, models: dict | None = None,
                  on_progress: Callable[[int, int], None] = lambda done, total: None,
                  on_error: Callable[[str], None] = lambda m: None) -> int:
    """Score every recorded answer without a recorded score, in chunks (each chunk's
    scores recorded together); returns answers scored."""
    by_key = p.by_key
    todo = [row for key, row in out.results.rows.items()
            if row["ok"] and key in by_key and key not in out.scores.rows]
    if not todo:
        return 0
    scorer = Scorer(registry or Registry.load(), models=models)
    hosts = {h.name: h for h in p.suite.hosts}
    rerun = "similarity" in p.suite.metrics
    done = 0
    on_progress(0, len(todo))
    for start in range(0, len(todo), SCORE_CHUNK):
        chunk = todo[start:start + SCORE_CHUNK]
        records = []
        for row in chunk:
            try:
                records.append(AnswerRecord.build(row["key"], row["host"], hosts[row["host"]].model or p.suite.model,
                                                  by_key[row["key"]].messages, by_key[row["key"]].scoring_configs(),
                                                  row["text"]))
            except InputError as exc:
                records.append(error(row["key"], row["host"], None, str(exc)))
        todo_records = [r for r in records if isinstance(r, AnswerRecord)]
        try:
            scored = iter(scorer.score(todo_records, rerun=rerun))
        except ModelUnavailable as exc:
            scored = iter([error(r.id, r.host, r.model, str(exc)) for r in todo_records])
        for row, record in zip(chunk, records):
            result = next(scored) if isinstance(record, AnswerRecord) else record
            if result.verdict == "error":
                on_error(f"{row['key']}: {result.reasons[0]}")
            out.scores.append({"key": row["key"], "answer_sha256": _sha(row["text"]),
                               **{k: getattr(result, k) for k in ("verdict", "p_value", "reasons", "metrics",
                                                                  "provenance")}})
        done += len(chunk)
        on_progress(done, len(todo))
    return done


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- the run

@dataclass
class RunResult:
    out: Path
    report: dict
    sent: int
    skipped: int
    scored: int
    resumed: bool
    files: list[Path] = field(default_factory=list)


class _Display:
    """Progress bars on stderr with rich, only when it is a terminal."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                            disable=not (enabled and console.is_terminal), transient=False)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> "_Display":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def task(self, name: str, total: int, completed: int = 0) -> None:
        self.tasks[name] = self.bar.add_task(name, total=total, completed=completed, note="")

    def update(self, name: str, **fields: Any) -> None:
        self.bar.update(self.tasks[name], **fields)


def run_bench(suite_path: Path, out: Path, *, hosts: str | None = None, limit: int | None = None,
              max_tokens: int | None = None, context_scale: float | None = None,
              retry_errors: bool = False, registry: Any = None,
              models: dict | None = None, progress: bool = True,
              log: Callable[[str], None] = lambda m: None) -> RunResult:
    """Run (or resume) a suite into `out`, then write the reports. SuiteError: the suite
    or options cannot run; Interrupted: a signal stopped it (what was recorded stays)."""
    p = plan(suite_path, hosts=hosts, limit=limit, max_tokens=max_tokens, context_scale=context_scale)
    for h in p.suite.hosts:
        credentials(h)  # a missing environment variable is an error before anything is sent
    if p.suite.scored:
        registry = registry or Registry.load()
        for model in {h.model or p.suite.model for h in p.suite.hosts}:
            try:
                registry.get(model)
            except RegistryError as exc:
                raise SuiteError(f"model {model}: {exc}") from None
    od = OutDir(out, p)
    started, t0 = now(), time.monotonic()
    session = len(od.sessions()) + 1
    stats = {"session": session, "started": started, "pid": os.getpid(), "sent": 0, "skipped": 0,
             "scored": 0, "interrupted": False, "torn_lines": od.results.torn + od.scores.torn}
    try:
        rows = od.results.rows
        todo = [q for q in p.probes
                if q.key not in rows or (retry_errors and not rows[q.key]["ok"])]
        stats["skipped"] = len(p.probes) - len(todo)
        if od.resumed:
            log(f"resuming {out}: {stats['skipped']} of {len(p.probes)} probes already recorded")
        log(f"{len(todo)} probes to send to {len(p.suite.hosts)} hosts "
            f"({len(p.probes)} in the suite), results in {out}")
        with _Display(progress) as display:
            display.task("probes", len(p.probes), completed=stats["skipped"])
            errors = 0

            def on_done(row: dict) -> None:
                nonlocal errors
                stats["sent"] += 1
                errors += not row["ok"]
                display.update("probes", advance=1, note=f"{errors} errors" if errors else "")

            if todo:
                try:
                    asyncio.run(dispatch(p, todo, od.results, session, on_done, log))
                except Interrupted:
                    stats["interrupted"] = True
                    raise
            if p.suite.scored:
                display.task("scoring", 0)

                def on_progress(done: int, total: int) -> None:
                    if done == 0:
                        log(f"scoring {total} answers on the reference model")
                    display.update("scoring", completed=done, total=total)

                with _term_as_interrupt():
                    stats["scored"] = score_pending(
                        p, od, registry=registry, models=models, on_progress=on_progress,
                        on_error=lambda m: log(f"scoring: {m}"))
        report = reporting.build(p, od.manifest, od.results.rows, od.scores.rows,
                                 od.sessions() + [{**stats, "finished": now()}])
        files = reporting.write(out, report)
    except KeyboardInterrupt:
        stats["interrupted"] = True
        raise Interrupted("interrupted") from None
    finally:
        stats["finished"], stats["took_s"] = now(), round(time.monotonic() - t0, 3)
        od.log_session(stats)
        od.close()
    return RunResult(out, report, stats["sent"], stats["skipped"], stats["scored"], od.resumed, files)


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while scoring (the chunk in progress is lost,
    every recorded score stays)."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
