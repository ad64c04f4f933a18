"""The `validator` command line. Each command only wires stages together."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="Referee for a decentralised LLM network.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from validator import __version__

        print(f"validator {__version__}")
        raise typer.Exit()


@app.callback(epilog="Exit statuses: 0 done; 1 an unexpected error; 2 a usage error (bad option, "
                     "config or input, unknown host or database; the message says which); "
                     "130 interrupted. docs/production.md lists them per command.")
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens."),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Model loading chatter (progress bars, deprecation notes) is not for the operator.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def audit(
    records: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL of recorded answers."),
    out: Path = typer.Option(..., "--out", help="Write one scored line per input line here (JSONL), "
                             "each as soon as it is scored."),
    hosts_out: Optional[Path] = typer.Option(None, "--hosts-out", help="Write per-host verdicts here (JSON)."),
    models: Optional[Path] = typer.Option(None, "--models", help="Model registry (default: the shipped configs/models.yaml)."),
    alpha: float = typer.Option(1e-4, help="Host false-alarm level: dishonest when the combined p-value is below."),
    no_rerun: bool = typer.Option(False, "--no-rerun", help="Skip the reference re-run (no similarity metrics)."),
):
    """Score recorded answers against the reference model of the model each claims.

    Exit status: 0 every line scored; 1 some lines are `error` lines (malformed, or not
    scorable here; each says why); 2 bad arguments; 130 interrupted (the lines scored
    so far are in --out)."""
    from validator.models.registry import Registry
    from validator.reputation import HostRule
    from validator.service.audit import HostTally, audit_lines
    from validator.service.scorer import Scorer

    if not (0.0 < alpha < 1.0):
        raise typer.BadParameter("alpha must be between 0 and 1", param_hint="--alpha")
    scorer = Scorer(Registry.load(models))
    started = time.perf_counter()
    tally, errors, written = HostTally(HostRule(alpha=alpha)), 0, 0

    def on_error(message: str) -> None:
        err.print(f"[yellow]warning[/yellow] {message}", highlight=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as bar, \
            records.open(encoding="utf-8", errors="replace") as fh, out.open("w") as sink:
        task = bar.add_task("scoring", total=None)
        try:
            for line in audit_lines(fh, scorer, rerun=not no_rerun, on_error=on_error,
                                    progress=lambda done: bar.update(task, completed=done)):
                sink.write(json.dumps(line, ensure_ascii=False) + "\n")
                sink.flush()
                written += 1
                errors += line["verdict"] == "error"
                tally.add(line)
        except KeyboardInterrupt:
            interrupted = True
    hosts = tally.hosts()
    if hosts_out:
        hosts_out.parent.mkdir(parents=True, exist_ok=True)
        hosts_out.write_text(json.dumps(hosts, indent=2) + "\n")

    table = Table(title=f"{written - errors} answers scored in {time.perf_counter() - started:.0f} s")
    for col in ("host", "verdict", "records", "failed", "p-value"):
        table.add_column(col)
    colours = {"honest": "green", "dishonest": "red", "inconclusive": "yellow"}
    for host, h in hosts.items():
        table.add_row(host, f"[{colours[h['verdict']]}]{h['verdict']}[/]", str(h["records"]),
                      str(h["failed"]), f"{h['p_value']:.2g}")
    Console(stderr=not sys.stdout.isatty()).print(table) if hosts else None
    if interrupted:
        err.print(f"interrupted: {written} lines scored are in {out}")
        raise typer.Exit(130)
    if errors:
        err.print(f"{errors} line(s) could not be scored; see the 'error' lines in {out}")
        raise typer.Exit(1)


@app.command()
def calibrate(
    model: str = typer.Option("smollm2-135m", help="Registry name of the model to calibrate."),
    prompts: Path = typer.Option(Path("configs/prompts/calibration.yaml"), help="Prompt bank to answer."),
    out: Optional[Path] = typer.Option(None, help="Tolerances file (default: the registry's calibration "
                                                  "path, else calibration/MODEL.json beside the registry)."),
    engines: Optional[str] = typer.Option(None, help="Honest engines to run, comma separated: "
                                                     "transformers-DTYPE[-eager][-batchN] (DTYPE float32, "
                                                     "bfloat16, float16), llama.cpp (GGUF checkpoints), or "
                                                     "`all` (default: float32, bfloat16, float32-eager, "
                                                     "float32-batch8, float32-batch1, and llama.cpp where a GGUF exists). "
                                                     "Engines whose answers are saved are not run again."),
    limit: int = typer.Option(0, help="Use only the first N prompts (0: all)."),
    fresh: bool = typer.Option(False, "--fresh", help="Answer the prompts again even if saved answers exist."),
    models: Optional[Path] = typer.Option(None, "--models", help="Model registry."),
):
    """Measure how far honest engines stray from the reference and write tolerances."""
    from validator.models.checkpoints import CheckpointUnavailable
    from validator.models.registry import Registry, RegistryError
    from validator.service.calibration import calibrate as run, engine_names

    try:
        registry = Registry.load(models)
        spec = registry.get(model)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model") from None
    target = out or spec.calibration or registry.path.parent / "calibration" / f"{model}.json"
    names = engine_names(spec, engines)
    # The honest answers are kept beside the tolerances, so anyone can re-derive them.
    answers = target.with_name(target.stem + ".answers.jsonl")
    if fresh and answers.exists():
        answers.unlink()
    try:
        result = run(spec, prompts, names, limit=limit, answers=answers,
                     log=lambda m: err.print(m, highlight=False))
    except (CheckpointUnavailable, ValueError) as exc:
        err.print(f"[red]cannot calibrate {model}:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    err.print(f"wrote {target}")
    if spec.calibration is None or spec.calibration.resolve() != target.resolve():
        err.print(f"the scorer reads {spec.calibration or 'no file'} for {model}: set the entry's "
                  f"calibration in {registry.path} to {target} to use these tolerances", highlight=False)
    Console().print_json(json.dumps(result["tolerances"]))


@app.command()
def simulate(
    network: Path = typer.Option(Path("configs/network.demo.yaml"), "--network",
                                 help="Network YAML: hosts, their strategies, credentials, gateway."),
    lazy: bool = typer.Option(False, "--lazy", help="Load models on first request, not before serving."),
):
    """Serve a simulated network of hosts on loopback until interrupted.

    Prints one line per host, `NAME URL STRATEGY`, once every port is listening."""
    from validator.network.simulator import NetworkConfig, SimulatedNetwork

    try:
        net = SimulatedNetwork(NetworkConfig.load(network))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--network") from None
    if not lazy:
        with err.status("loading models"):
            net.load()
    net.bind()
    for name, url, strategy in net.describe():
        print(name, url, strategy, flush=True)
    net.serve_forever()


# ------------------------------------------------------------------ the service (daemon, store)

db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
hosts_app = typer.Typer(help="Hosts: list, show, add, remove, disable, enable, release.",
                        no_args_is_help=True)
probes_app = typer.Typer(help="Probe sets.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(hosts_app, name="hosts")
app.add_typer(probes_app, name="probes")

CONFIG = typer.Option(None, "--config", "-c", envvar="VALIDATOR_CONFIG",
                      help="Validator config (default: the shipped example configs/validator.yaml); "
                           "VALIDATOR_* variables override its keys.")
DB = typer.Option(None, "--db", help="Database file or SQLAlchemy URL (default: the config's).")
STATE_COLOURS = {"new": "cyan", "trusted": "green", "probation": "yellow", "flagged": "red",
                 "disabled": "dim"}


def _config(config: Optional[Path], db: Optional[str] = None):
    from validator.service.config import ValidatorConfig

    try:
        return ValidatorConfig.load(config, database=db)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None


def _db_url(config: Optional[Path], db: Optional[str]) -> str:
    if db:
        return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"
    return _config(config).database_url


def _open_store(config: Optional[Path], db: Optional[str], *, create: bool = False):
    """The store, migrated to head. Reading a SQLite file that does not exist is an error
    (a typo must not silently show an empty network)."""
    from validator.store import Store, upgrade

    url = _db_url(config, db)
    if url.startswith("sqlite:///") and not create and not Path(url[len("sqlite:///"):]).exists():
        err.print(f"[red]no database at {url[len('sqlite:///'):]}[/] (run `validator db upgrade` "
                  "or `validator run` first, or pass --db)")
        raise typer.Exit(2)
    upgrade(url)
    return Store(url)


def _service(config: Optional[Path], db: Optional[str], *, create: bool = False):
    """The service over the store, with the config's registry and reputation settings."""
    from validator.models.registry import Registry
    from validator.reputation import ReputationConfig
    from validator.service.operations import Service

    cfg = _config(config)
    try:
        reputation = ReputationConfig.from_dict(cfg.reputation)
        registry = Registry.load(cfg.models)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    return Service(_open_store(config, db, create=create), registry, reputation)


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def print_hosts(rows: list[dict], reasons: dict[str, str] | None = None) -> None:
    table = Table()
    for col in ("host", "state", "score", "probes", "errors", "scored", "last answer", "flagged since"):
        table.add_column(col, justify="right" if col in ("score", "probes", "errors", "scored") else "left")
    if reasons is not None:
        table.add_column("why", overflow="fold", max_width=70)
    for r in rows:
        cells = [r["host"], f"[{STATE_COLOURS[r['state']]}]{r['state']}[/]",
                 "-" if r["score"] is None else f"{r['score']:.2f}", str(r["probes"]),
                 str(r["errors"]), str(r["scored"]), (r["last_seen"] or "-")[:19].replace("T", " "),
                 (r["flagged_since"] or "-")[:19].replace("T", " ")]
        if reasons is not None:
            cells.append(reasons.get(r["host"], ""))
        table.add_row(*cells)
    # Piped output gets a wide console: reasons are long and wrapping them into a narrow
    # table helps nobody.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@db_app.command("upgrade")
def db_upgrade(config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Create or migrate the database to the current schema (a no-op when current)."""
    from validator.store import upgrade

    from validator.service.config import redact_url

    url = _db_url(config, db)
    upgrade(url)
    err.print(f"database at head: {redact_url(url)}")


@hosts_app.command("list")
def hosts_list(config: Optional[Path] = CONFIG, db: Optional[str] = DB,
               as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")):
    """Every host: state, score, probes, last seen, flagged since."""
    from validator.service.reads import host_rows

    rows = host_rows(_open_store(config, db))
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_hosts(rows)


@hosts_app.command("show")
def hosts_show(host: str, config: Optional[Path] = CONFIG, db: Optional[str] = DB,
               recent: int = typer.Option(10, help="How many recent answers to show."),
               as_json: bool = typer.Option(False, "--json", help="Print one JSON object: the host, "
                                            "its state history, recent answers and feedback.")):
    """One host: standing, state history with its evidence, recent verdicts with reasons."""
    store = _open_store(config, db)
    h = store.get_host(host)
    if h is None:
        err.print(f"[red]no host named {host!r}[/]")
        raise typer.Exit(2)
    if as_json:
        answers = [{"probe_id": r["probe"]["id"], "round": r["probe"]["round"],
                    **{k: r["dispatch"][k] for k in ("finished_at", "ok", "error", "detail", "status",
                                                     "ttfb_s", "total_s", "served_by")},
                    **({k: r["score"][k] for k in ("verdict", "p_value", "reasons")} if r["score"]
                       else {"verdict": None, "p_value": None, "reasons": []})}
                   for r in store.host_scores(host, limit=recent)]
        print(json.dumps({"host": {k: v for k, v in h.items() if k != "token_env"},
                          "history": store.reputation_events(host), "answers": answers,
                          "feedback": store.feedback_for(host)}, indent=2, default=str))
        return
    console = Console()
    score = "-" if h["score"] is None else f"{h['score']:.3f}"
    console.print(f"[bold]{h['name']}[/]  {h['url']}  model {h['model']}  "
                  f"state [{STATE_COLOURS[h['state']]}]{h['state']}[/]  score {score}  "
                  f"last seen {_when(h['last_seen'])}" + ("  (removed)" if h["removed_at"] else ""))
    history = Table(title="state history")
    for col in ("at", "change", "score", "reason"):
        history.add_column(col, overflow="fold")
    for e in store.reputation_events(host):
        history.add_row(_when(e["at"]), f"{e['state_from']} -> {e['state_to']}",
                        "-" if e["score"] is None else f"{e['score']:.2f}", e["reason"])
    console.print(history)
    from validator.service.provenance import describe

    answers = Table(title=f"last {recent} answers")
    for col in ("probe", "round", "finished", "result", "p-value", "scored by", "why"):
        answers.add_column(col, overflow="fold")
    producers: list[dict | None] = []  # distinct provenances, numbered in order of appearance
    for r in store.host_scores(host, limit=recent):
        d, sc = r["dispatch"], r["score"]
        by = "-"
        if sc is not None:
            if sc["provenance"] not in producers:
                producers.append(sc["provenance"])
            by = f"[{producers.index(sc['provenance']) + 1}]"
        if not d["ok"]:
            result, p, why = f"[red]{d['error']}[/]", "-", d["detail"][:160]
        elif sc is None:
            result, p, why = "unscored", "-", ""
        else:
            colour = {"pass": "green", "fail": "red"}.get(sc["verdict"], "yellow")
            result = f"[{colour}]{sc['verdict']}[/]"
            p = "-" if sc["p_value"] is None else f"{sc['p_value']:.2g}"
            why = "; ".join(sc["reasons"][:2])
        answers.add_row(r["probe"]["id"], str(r["probe"]["round"]), _when(d["finished_at"]), result, p, by, why)
    console.print(answers)
    for i, body in enumerate(producers, start=1):
        console.print(f"[{i}] {describe(body)}", highlight=False)
    feedback = store.feedback_for(host)
    if feedback:
        console.print("feedback: " + "; ".join(f"{f['rating']:g} ({f['note']})" for f in feedback[:5]))


@hosts_app.command("add")
def hosts_add(name: str, url: str, model: str = typer.Option(..., help="Registry name of the model it claims."),
              credentials: Optional[str] = typer.Option(
                  None, help="Credentials key KEY (default: the host's name): VALIDATOR_CRED_<KEY>_TOKEN "
                             "etc., or the secrets file's entry (docs/production.md, Credentials)."),
              config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Add a host (or bring back a removed one with its history)."""
    import re

    from validator.service.config import CREDENTIALS_KEY

    if credentials is not None and not re.match(CREDENTIALS_KEY, credentials):
        raise typer.BadParameter("letters, digits, '.', '_' and '-', at most 64", param_hint="--credentials")
    service = _service(config, db, create=True)
    try:
        service.add_host(name, url, model, token_env=credentials)  # the column holds the key
    except ValueError as exc:  # a live host has the name, or the registry has no such model
        raise typer.BadParameter(str(exc)) from None
    err.print(f"added {name} ({url}, {model})")


@hosts_app.command("remove")
def hosts_remove(name: str, config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Stop probing a host and hide it from lists; its history stays."""
    from validator.service.operations import UnknownHost

    try:
        _service(config, db).remove_host(name)
    except (UnknownHost, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    err.print(f"removed {name}")


def _admin(name: str, action: str, note: str, config, db) -> None:
    from validator.reputation import InvalidTransition
    from validator.service.operations import StateChanged, UnknownHost

    try:
        t = _service(config, db).transition(name, action, by=os.environ.get("USER", "admin"), note=note)
    except (UnknownHost, InvalidTransition) as exc:
        raise typer.BadParameter(str(exc)) from None
    except StateChanged as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3)
    err.print(f"{name}: {t.state_from} -> {t.state_to}")


@hosts_app.command("disable")
def hosts_disable(name: str, note: str = typer.Option("", help="Why (stored with the change)."),
                  config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Stop probing a host and zero its score until `enable`."""
    _admin(name, "disable", note, config, db)


@hosts_app.command("enable")
def hosts_enable(name: str, note: str = typer.Option(""), config: Optional[Path] = CONFIG,
                 db: Optional[str] = DB):
    """Undo `disable` (the host starts again as new)."""
    _admin(name, "enable", note, config, db)


@hosts_app.command("release")
def hosts_release(name: str, note: str = typer.Option(""), config: Optional[Path] = CONFIG,
                  db: Optional[str] = DB):
    """Move a flagged host to probation: trusted again only after clean probes."""
    _admin(name, "release", note, config, db)


@app.command()
def feedback(probe_id: str, rating: float = typer.Option(..., help="1 (bad) to 5 (good)."),
             note: str = typer.Option("", help="What the reviewer saw."),
             config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Record a person's rating of one answer; it is folded into the host's score."""
    from validator.service.operations import UnknownProbe

    try:
        stored = _service(config, db).add_feedback(probe_id, rating, note)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rating") from None
    except UnknownProbe as exc:
        raise typer.BadParameter(str(exc)) from None
    err.print(f"feedback stored for {stored['host']}; score now "
              f"{'-' if stored['score'] is None else format(stored['score'], '.3f')}")


@app.command()
def export(fmt: str = typer.Option("json", "--format", help="csv or json."),
           out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: stdout)."),
           config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Every recorded answer with its timings, verdict, p-value and reasons."""
    import csv
    import io

    if fmt not in ("csv", "json"):
        raise typer.BadParameter("csv or json", param_hint="--format")
    store = _open_store(config, db)
    rows = store.export_rows()
    if fmt == "json":
        text = json.dumps(rows, indent=1, default=str) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["probe_id"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
        text = buf.getvalue()
    if out:
        with out.open("w", newline="") as fh:  # the csv module owns line endings (answers hold \r\n)
            fh.write(text)
        err.print(f"wrote {len(rows)} answers to {out}")
    else:
        sys.stdout.write(text)


@probes_app.command("show")
def probes_show(round_no: int = typer.Option(..., "--round", help="Round number."),
                host: str = typer.Option(..., "--host", help="Host name."),
                config: Optional[Path] = CONFIG,
                as_json: bool = typer.Option(False, "--json")):
    """The probes a host gets in a round and when each leaves (derived from the secret:
    reproducible here, unpredictable to hosts)."""
    from validator.probing.probes import arrival_offsets, derive_probes, load_bank, schedule_phase
    from validator.scoring.batch import rerun_seed

    cfg = _config(config)
    try:
        secret = cfg.probe_secret()
        probes = derive_probes(secret, round_no, host, load_bank(cfg.prompts), cfg.probe_mix(),
                               cfg.rounds.probes_per_host)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    rounds = cfg.rounds
    window = rounds.interval_s if rounds.spread_s is None else min(rounds.spread_s, rounds.interval_s)
    start = round_no * rounds.interval_s + schedule_phase(secret, rounds.interval_s)
    leaves = [start + o for o in arrival_offsets(secret, round_no, host, len(probes), window)]
    if as_json:
        print(json.dumps([{**p.as_dict(), "leaves_at": at} for p, at in zip(probes, leaves)], indent=2))
        return
    console = Console()
    for p, at in zip(probes, leaves):
        c = p.configs
        console.print(f"[bold]{p.id}[/] #{p.index} prompt {p.prompt_id} leaves "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))} "
                      f"{'stream' if p.stream else 'plain'} T={c['temperature']} top_k={c['top_k']} "
                      f"top_p={c['top_p']} max_tokens={c['max_tokens']} (re-run seed {rerun_seed(p.messages, p.wire_settings)})")
        for m in p.messages:
            console.print(f"  [dim]{m['role']}:[/] {m['content']}", highlight=False)


@probes_app.command("import")
def probes_import(requests_file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                                       help="JSONL of user requests: one object a line with `messages`."),
                  out: Path = typer.Option(..., "--out", help="The bank to write (.jsonl, else YAML)."),
                  min_chars: int = typer.Option(1, help="Drop conversations shorter than this (characters)."),
                  max_chars: int = typer.Option(8000, help="Drop conversations longer than this (characters)."),
                  mix_out: Optional[Path] = typer.Option(None, "--mix-out", help="Also write the settings the "
                                                         "requests carried (`configs`) as the mix `imported` "
                                                         "(for settings_file: and settings_mix:)."),
                  as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Build a private prompt bank from exported user requests: de-duplicated, roles and
    lengths checked; prints what was kept and what was dropped, and why."""
    from validator.probing.probes import import_requests, write_bank, write_mix

    with requests_file.open(encoding="utf-8", errors="replace") as fh:
        prompts, report = import_requests(fh, min_chars=min_chars, max_chars=max_chars)
    if prompts:
        write_bank(prompts, out)
    if mix_out and prompts:
        try:
            entries = write_mix(report.settings, mix_out)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--mix-out") from None
        err.print(f"settings mix `imported` ({entries} settings, {sum(report.settings.values())} requests) "
                  f"written to {mix_out}", highlight=False)
    if as_json:
        print(json.dumps({**report.as_dict(), "out": str(out) if prompts else None}, indent=2))
    else:
        err.print(f"read {report.read} requests; kept {report.kept}" + (f", written to {out}" if prompts else ""))
        for reason, n in report.dropped.most_common():
            err.print(f"  dropped {n}: {reason} (first at line {report.first_line[reason]})", highlight=False)
    if not prompts:
        err.print("[red]no request was kept: nothing written[/]")
        raise typer.Exit(1)
    repo = next((d for d in out.resolve().parents if (d / ".git").exists()), None)
    if repo is not None:
        err.print(f"[yellow]warning[/yellow] {out} is inside the git repository {repo}: keep the bank "
                  "out of anything published, or hosts can read it")


@app.command()
def run(config: Optional[Path] = CONFIG, db: Optional[str] = DB,
        rounds: Optional[int] = typer.Option(None, help="Stop after this many rounds (default: run until SIGTERM)."),
        instance: Optional[str] = typer.Option(None, help="Instance name in leases (overrides the config).")):
    """The daemon: probe rounds, scoring and reputation until SIGTERM/SIGINT (drains first)."""
    import asyncio

    from validator.daemon import Daemon

    cfg = _config(config, db)
    if instance:
        cfg.instance = instance
    logging.getLogger("validator").setLevel(logging.INFO)
    try:
        daemon = Daemon(cfg, on_event=lambda m: err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {m}",
                                                          highlight=False))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    from validator.probing.probes import shipped_in_repository

    for warning in shipped_in_repository(daemon.bank, daemon.secret):  # fine for a demo, not a deployment
        err.print(f"[yellow]warning[/yellow] {warning}", highlight=False)
    progress = asyncio.run(daemon.run(max_rounds=rounds))
    err.print(f"stopped: {progress.rounds} rounds, {progress.sent} probes sent, "
              f"{progress.answered} answered, {progress.scored} scored")


@app.command()
def status(config: Optional[Path] = CONFIG, db: Optional[str] = DB,
           as_json: bool = typer.Option(False, "--json")):
    """Liveness (validators holding leases, last activity), queue depth, last round."""
    store = _open_store(config, db)
    st = store.status()
    from datetime import datetime, timezone

    from validator.daemon import HEARTBEAT_S

    now = datetime.now(timezone.utc)
    validators = []
    for v in store.validators():
        held = next((x for x in st["validators"] if x["owner"] == v["name"]), None)
        age = (now - v["heartbeat_at"]).total_seconds()
        state = "stopped" if v["stopped_at"] else ("alive" if age < 3 * HEARTBEAT_S else "silent")
        validators.append({**v, "state": state, "heartbeat_age_s": round(age, 1),
                           "leases": held["leases"] if held else 0})
    st["validators"] = validators
    st["validator_errors"] = _validator_errors(store)
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return
    console = Console()
    console.print(f"last round: {st['last_round']}   queue (answers awaiting scoring): {st['queue_depth']}")
    console.print(f"last answer: {_when(st['last_answer_at'])}   last score: {_when(st['last_score_at'])}")
    console.print("hosts: " + (", ".join(f"{n} {s}" for s, n in sorted(st["hosts_by_state"].items()))
                               or "none"))
    colours = {"alive": "green", "stopped": "dim", "silent": "red"}
    for v in validators:
        console.print(f"validator {v['name']} ({v['hostname']} pid {v['pid']}): "
                      f"[{colours[v['state']]}]{v['state']}[/], last heartbeat {v['heartbeat_age_s']:.0f} s ago, "
                      f"{v['leases']} live leases")
    if not validators:
        console.print("no validator has run against this database")
    for error, e in st["validator_errors"].items():
        last = e["last"][0]
        console.print(f"[red]validator error {error}[/]: {e['count']} calls (not charged to the hosts); "
                      f"last {_when(last['finished_at'])} with {last['host']}: {last['detail'][:200]}",
                      highlight=False)
        console.print("  the validator's own credentials were refused: check its VALIDATOR_CRED_* "
                      "variables or secrets file (docs/production.md, Credentials)", highlight=False)


def _validator_errors(store) -> dict:
    """Calls that failed on the validator's side (reputation.VALIDATOR_ERRORS), per class:
    how many, by host, and the newest few."""
    from validator.reputation import VALIDATOR_ERRORS

    out = {}
    for error in sorted(VALIDATOR_ERRORS):
        by_host = {host: n for host, e, n in store.dispatch_counts() if e == error}
        if by_host:
            out[error] = {"count": sum(by_host.values()), "hosts": by_host,
                          "last": store.last_errors(error)}
    return out


@app.command()
def demo(config: Path = typer.Option(Path("configs/demo.yaml"), "--config", help="Demo settings."),
         rounds: Optional[int] = typer.Option(None, help="Rounds to run (default: the config's)."),
         network_file: Optional[Path] = typer.Option(None, "--network", help="Network YAML instead of the "
                                                     "config's (configs/network.gemma.yaml: hosts claiming "
                                                     "Gemma-3 270M)."),
         as_json: bool = typer.Option(False, "--json", help="Print the final host list as JSON "
                                      "(as `validator hosts list --json` does) instead of the table.")):
    """Simulated hosts on loopback, refereed by the real daemon for a few rounds."""
    import asyncio

    import yaml
    from rich.progress import SpinnerColumn

    from validator.service.config import HostEntry, ValidatorConfig
    from validator.daemon import Daemon
    from validator.configs import resolve
    from validator.network.simulator import NetworkConfig, SimulatedNetwork
    from validator.store import Store
    from validator.service.reads import host_reasons, host_rows

    raw = yaml.safe_load(resolve(config).read_text())
    network = NetworkConfig.load(network_file or raw["network"])
    n_rounds = rounds or int(raw.get("rounds", 3))
    db = Path(raw.get("database", "demo.db")).expanduser().resolve()
    for suffix in ("", "-wal", "-shm"):  # a demo starts from nothing
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is the point

    net = SimulatedNetwork(network)
    t0 = time.perf_counter()
    with err.status("loading the hosts' models and the reference"):
        net.load()
    net.start()
    try:
        cfg = ValidatorConfig.model_validate({**raw.get("validator", {}), "database": str(db), "hosts": [
            HostEntry(name=name, url=net.urls[name], model=strategy.model).model_dump()
            for name, strategy in net.hosts.items()]})
        events: list[str] = []
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                      disable=not err.is_terminal) as bar:
            daemon = Daemon(cfg, on_event=lambda m: (events.append(m), bar.console.print(m, highlight=False)))
            expected = len(cfg.hosts) * cfg.rounds.probes_per_host * n_rounds
            sent = bar.add_task("probes answered", total=expected)
            scored = bar.add_task("answers scored ", total=None)

            async def main():
                async def report():
                    while not daemon.stopping.is_set():
                        p = daemon.progress
                        bar.update(sent, completed=p.sent)
                        bar.update(scored, completed=p.scored, total=max(p.answered, 1))
                        await asyncio.sleep(0.3)
                reporter = asyncio.create_task(report())
                try:
                    return await daemon.run(max_rounds=n_rounds, first_round=raw.get("first_round"))
                finally:
                    reporter.cancel()

            progress = asyncio.run(main())
    finally:
        net.stop()
    store = Store(f"sqlite:///{db}")
    rows = host_rows(store)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print_hosts(rows, host_reasons(store))
    err.print(f"{n_rounds} rounds, {progress.sent} probes, {progress.scored} answers scored in "
              f"{time.perf_counter() - t0:.0f} s. The database is {db}:\n"
              f"  validator hosts list --db {db}\n  validator hosts show cheat-other-model --db {db}")


@app.command()
def bench(
    suite: Optional[Path] = typer.Argument(None, help="Suite YAML (examples in configs/suites/)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results and reports go here; the same "
                                       "--out resumes an interrupted run (default bench-out/SUITE)."),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="NAME=URL,NAME=URL: replaces the suite's hosts."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts per prompt set."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Cap every settings cell's max_tokens."),
    context_scale: Optional[float] = typer.Option(None, "--context-scale",
                                                  help="Multiply every prompt set's context_words."),
    retry_errors: bool = typer.Option(False, "--retry-errors",
                                      help="Send probes again whose recorded result is an error."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", metavar="A.json B.json",
                                                        help="Show what changed between two reports."),
    as_json: bool = typer.Option(False, "--json", help="With --compare: print the comparison as JSON."),
    models: Optional[Path] = typer.Option(None, "--models", help="Model registry."),
):
    """Run a research benchmark suite against hosts and write report.json/.md/.html."""
    if compare and any(compare):
        from validator.bench.compare import ReportError, compare as diff, load_report, print_comparison

        try:
            result = diff(load_report(compare[0]), load_report(compare[1]))
        except ReportError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        if as_json:
            print(json.dumps(result, indent=1))
        else:
            print_comparison(result, compare[0], compare[1], Console(width=None if sys.stdout.isatty() else 160))
        return
    if suite is None:
        typer.echo("error: give a suite file, or --compare A.json B.json", err=True)
        raise typer.Exit(2)
    from validator.bench.report import host_table
    from validator.bench.runner import Interrupted, run_bench
    from validator.bench.suite import SuiteError
    from validator.models.registry import Registry

    target = out or Path("bench-out") / suite.stem
    try:
        result = run_bench(suite, target, hosts=hosts, limit=limit, max_tokens=max_tokens,
                           context_scale=context_scale, retry_errors=retry_errors, registry=Registry.load(models) if models else None,
                           log=lambda m: err.print(m, highlight=False, soft_wrap=True))
    except SuiteError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except Interrupted:
        typer.echo(f"interrupted: every recorded result is kept in {target}; run the same command "
                   "again to resume", err=True)
        raise typer.Exit(130)
    head, rows = host_table(result.report)
    table = Table(title=f"{result.report['suite']['name']}: {result.sent} probes sent, "
                        f"{result.skipped} already recorded, {result.scored} scored")
    for col in head:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    err.print(f"reports: {target / 'report.html'}, {target / 'report.md'}, {target / 'report.json'}",
              highlight=False, soft_wrap=True)


# ------------------------------------------------------------------ the web server (REST API, dashboard)

tokens_app = typer.Typer(help="API tokens of `validator serve`: create, list, revoke.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@app.command()
def serve(config: Optional[Path] = CONFIG, db: Optional[str] = DB,
          host: Optional[str] = typer.Option(None, "--host", help="Bind address (default: the config's serve.host)."),
          port: Optional[int] = typer.Option(None, "--port", "-p", help="Port (default: the config's serve.port)."),
          public_reads: Optional[bool] = typer.Option(None, "--public-reads/--private-reads",
                                                      help="Reads without a token (default: the config's).")):
    """REST API (OpenAPI docs at /docs), dashboard (/hosts), /metrics and POST /validator/v1/llm."""
    import uvicorn

    from validator.models.registry import Registry
    from validator.reputation import ReputationConfig
    from validator.service.config import redact_url
    from validator.web.app import create_app

    cfg = _config(config)
    overrides = {k: v for k, v in {"host": host, "port": port, "public_reads": public_reads}.items()
                 if v is not None}
    settings = cfg.serve.model_copy(update=overrides)
    try:
        reputation = ReputationConfig.from_dict(cfg.reputation)
        registry = Registry.load(cfg.models)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    store = _open_store(config, db)
    app_ = create_app(store, settings, registry=registry, reputation=reputation)
    err.print(f"serving {redact_url(store.url)} on http://{settings.host}:{settings.port}: dashboard /hosts, "
              f"API docs /docs, metrics /metrics ({'public' if settings.public_reads else 'token'} reads)",
              highlight=False)
    uvicorn.run(app_, host=settings.host, port=settings.port, log_level="info", access_log=False)


@tokens_app.command("create")
def tokens_create(role: str = typer.Option(..., "--role", help="admin (reads and writes) or reader (reads only)."),
                  name: Optional[str] = typer.Option(None, "--name", help="Who uses it (shown in lists and "
                                                     "recorded with admin actions); default: the role."),
                  config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Create a token and print it once (only its SHA-256 is stored)."""
    from validator.store import API_ROLES
    from validator.web.auth import create_token

    if role not in API_ROLES:
        raise typer.BadParameter(f"one of {', '.join(API_ROLES)}", param_hint="--role")
    store = _open_store(config, db, create=True)
    secret, row = create_token(store, role, name or role)
    err.print(f"token {row['id']} ({row['name']}, {role}); it is shown only now, keep it:")
    print(secret)


@tokens_app.command("list")
def tokens_list(config: Optional[Path] = CONFIG, db: Optional[str] = DB,
                as_json: bool = typer.Option(False, "--json")):
    """Every token (never the secrets): id, name, role, created, revoked."""
    store = _open_store(config, db)
    rows = [{k: t[k] for k in ("id", "name", "role", "created_at", "revoked_at")} for t in store.api_tokens()]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table()
    for col in ("id", "name", "role", "created", "revoked"):
        table.add_column(col)
    for t in rows:
        table.add_row(str(t["id"]), t["name"], t["role"], _when(t["created_at"]), _when(t["revoked_at"]))
    Console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int = typer.Argument(..., help="The token's id (`validator tokens list`)."),
                  config: Optional[Path] = CONFIG, db: Optional[str] = DB):
    """Revoke a token: requests with it get 401 from then on."""
    store = _open_store(config, db)
    if not store.revoke_api_token(token_id):
        raise typer.BadParameter(f"no live token with id {token_id}")
    err.print(f"token {token_id} revoked")


@app.command()
def init(directory: Path = typer.Argument(..., help="Directory to write into (created)."),
         user: Optional[str] = typer.Option(None, help="User the systemd units run as (default: you)."),
         instance: Optional[str] = typer.Option(None, help="This validator's instance name (default: "
                                                "the directory's name)."),
         force: bool = typer.Option(False, "--force", help="Overwrite existing files (a new secret).")):
    """Write a production skeleton: config, secrets (mode 0600), systemd units, Prometheus rules."""
    from validator.deploy import init as write, next_steps

    try:
        written = write(directory, user=user, instance=instance, force=force)
    except FileExistsError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2)
    for path in written:
        print(path)
    err.print(next_steps(directory), highlight=False, soft_wrap=True)


@app.command("models")
def list_models(models: Optional[Path] = typer.Option(None, "--models", help="Model registry."),
                as_json: bool = typer.Option(False, "--json", help="Print a JSON list of objects.")):
    """List the model registry: each entry's checkpoint and its kind, dtype, device (and
    the device it resolves to here), memory budgets given, and whether it is calibrated."""
    from validator.models.checkpoints import CheckpointUnavailable, resolve_device
    from validator.models.registry import Registry, RegistryError

    try:
        registry = Registry.load(models)
    except RegistryError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from None
    rows = []
    for name, spec in registry.models.items():
        try:
            here = resolve_device(spec)
        except CheckpointUnavailable as exc:
            here = f"unavailable: {exc}"
        rows.append({"model": name, "kind": next(k for k in ("hub", "dir", "package") if k in spec.checkpoint),
                     "checkpoint": spec.checkpoint, "dtype": spec.dtype, "device": spec.device,
                     "device_here": here, "budgets": spec.extra.get("budgets") or "derived from free memory",
                     "calibration": str(spec.calibration) if spec.calibration else None,
                     "calibrated": bool(spec.calibration and spec.calibration.exists())})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for col in ("model", "kind", "checkpoint", "dtype", "device", "calibrated"):
        table.add_column(col)
    for row in rows:
        ckpt = ", ".join(f"{k}={v}" for k, v in row["checkpoint"].items() if k != row["kind"]) or ""
        device = row["device"] if row["device"] == row["device_here"] else f"{row['device']} ({row['device_here']})"
        table.add_row(row["model"], row["kind"], str(row["checkpoint"][row["kind"]]) + (f" ({ckpt})" if ckpt else ""),
                      row["dtype"], device, "yes" if row["calibrated"] else "no")
    Console().print(table)


if __name__ == "__main__":
    app()
