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


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens.")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Model loading chatter (progress bars, deprecation notes) is not for the operator.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def audit(
    records: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL of recorded answers."),
    out: Path = typer.Option(..., "--out", help="Write one scored line per input line here (JSONL)."),
    hosts_out: Optional[Path] = typer.Option(None, "--hosts-out", help="Write per-host verdicts here (JSON)."),
    models: Optional[Path] = typer.Option(None, "--models", help="Model registry (default configs/models.yaml)."),
    alpha: float = typer.Option(1e-4, help="Host false-alarm level: dishonest when the combined p-value is below."),
    no_rerun: bool = typer.Option(False, "--no-rerun", help="Skip the reference re-run (no similarity metrics)."),
):
    """Score recorded answers against the reference model of the model each claims."""
    from .audit import run_audit
    from .evidence import HostRule
    from .registry import Registry

    registry = Registry.load(models)
    started = time.perf_counter()
    errors = 0

    def on_error(message: str) -> None:
        nonlocal errors
        errors += 1
        err.print(f"[yellow]warning[/yellow] {message}", highlight=False)

    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as bar:
        task = bar.add_task("scoring", total=None)
        with records.open(encoding="utf-8", errors="replace") as fh:
            lines, hosts = run_audit(fh, registry, host_rule=HostRule(alpha=alpha), rerun=not no_rerun,
                                     on_error=on_error,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    if hosts_out:
        hosts_out.parent.mkdir(parents=True, exist_ok=True)
        hosts_out.write_text(json.dumps(hosts, indent=2) + "\n")

    table = Table(title=f"{len(lines) - errors} answers scored in {time.perf_counter() - started:.0f} s")
    for col in ("host", "verdict", "records", "failed", "p-value"):
        table.add_column(col)
    colours = {"honest": "green", "dishonest": "red", "inconclusive": "yellow"}
    for host, h in hosts.items():
        table.add_row(host, f"[{colours[h['verdict']]}]{h['verdict']}[/]", str(h["records"]),
                      str(h["failed"]), f"{h['p_value']:.2g}")
    Console(stderr=not sys.stdout.isatty()).print(table) if hosts else None
    if errors:
        err.print(f"{errors} bad line(s); see the 'error' lines in {out}")


@app.command()
def calibrate(
    model: str = typer.Option("smollm2-135m", help="Registry name of the model to calibrate."),
    prompts: Path = typer.Option(Path("configs/prompts/calibration.yaml"), help="Prompt bank to answer."),
    out: Optional[Path] = typer.Option(None, help="Tolerances file (default: the registry's calibration path)."),
    engines: str = typer.Option("transformers-float32,transformers-bfloat16,llama.cpp",
                                help="Honest engines to run, comma separated."),
    limit: int = typer.Option(0, help="Use only the first N prompts (0: all)."),
    fresh: bool = typer.Option(False, "--fresh", help="Answer the prompts again even if saved answers exist."),
    models: Optional[Path] = typer.Option(None, "--models", help="Model registry."),
):
    """Measure how far honest engines stray from the reference and write tolerances."""
    from .calibration import calibrate as run
    from .registry import Registry

    registry = Registry.load(models)
    spec = registry.get(model)
    target = out or spec.calibration
    if target is None:
        raise typer.BadParameter(f"model {model} has no calibration path; pass --out")
    # The honest answers are kept beside the tolerances, so anyone can re-derive them.
    answers = target.with_name(target.stem + ".answers.jsonl")
    if fresh and answers.exists():
        answers.unlink()
    result = run(spec, prompts, [e.strip() for e in engines.split(",") if e.strip()], limit=limit,
                 answers=answers, log=lambda m: err.print(m, highlight=False))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2) + "\n")
    err.print(f"wrote {target}")
    Console().print_json(json.dumps(result["tolerances"]))


@app.command()
def simulate(
    network: Path = typer.Option(Path("configs/network.demo.yaml"), "--network",
                                 help="Network YAML: hosts, their strategies, credentials, gateway."),
    lazy: bool = typer.Option(False, "--lazy", help="Load models on first request, not before serving."),
):
    """Serve a simulated network of hosts on loopback until interrupted.

    Prints one line per host, `NAME URL STRATEGY`, once every port is listening."""
    from .simulator import NetworkConfig, SimulatedNetwork

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


@app.command("models")
def list_models(models: Optional[Path] = typer.Option(None, "--models", help="Model registry.")):
    """List the model registry."""
    from .registry import Registry

    registry = Registry.load(models)
    table = Table()
    for col in ("model", "checkpoint", "dtype", "device", "calibrated"):
        table.add_column(col)
    for name, spec in registry.models.items():
        ckpt = ", ".join(f"{k}={v}" for k, v in spec.checkpoint.items())
        table.add_row(name, ckpt, spec.dtype, spec.device,
                      "yes" if spec.calibration and spec.calibration.exists() else "no")
    Console().print(table)


if __name__ == "__main__":
    app()
