"""`validator bench --compare A.json B.json`: what changed between two runs, per host and
metric (verdict, pass and fail rates, errors, gaps, determinism, latency, similarity),
and per settings cell where a pass rate moved."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from validator.bench.report import SCHEMA


class ReportError(ValueError):
    """A file that is not a bench report.json."""


# (label, path into a host's entry, how to compare, threshold)
#   same: any difference; abs: absolute difference over the threshold;
#   rel: relative difference over the threshold; log: |log10(b/a)| over the threshold.
HOST_METRICS: list[tuple[str, tuple[str, ...], str, float]] = [
    ("verdict", ("verdict",), "same", 0),
    ("pass rate", ("pass_rate",), "abs", 0.05),
    ("fail rate", ("fail_rate",), "abs", 0.05),
    ("combined p", ("combined_p",), "log", 1.0),
    ("error rate", ("error_rate",), "abs", 0.05),
    ("errors", ("errors",), "same", 0),
    ("mean gap", ("gap", "mean"), "rel", 0.2),
    ("argmax share", ("gap", "share_argmax"), "abs", 0.05),
    ("greedy repeats identical", ("determinism", "greedy_identical_share"), "abs", 0.05),
    ("ttfb p50 (s)", ("latency", "ttfb_p50"), "rel", 0.25),
    ("total p50 (s)", ("latency", "total_p50"), "rel", 0.25),
    ("tokens/s p50", ("latency", "tokens_per_s_p50"), "rel", 0.25),
    ("ROUGE-L to re-run", ("similarity", "rouge_l_mean"), "abs", 0.05),
]
GAP_FLOOR = 0.02  # mean gaps below this many nats are all "the reference's choice"


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise ReportError(f"{path} is not a `validator bench` report.json (schema {SCHEMA})")
    return report


def _get(entry: dict | None, path: tuple[str, ...]) -> Any:
    value: Any = entry
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def changed(a: Any, b: Any, how: str, threshold: float) -> bool:
    if a is None or b is None or how == "same":
        return a != b
    if how == "abs":
        return abs(b - a) > threshold
    if how == "log":
        la, lb = (math.log10(max(v, 1e-300)) for v in (a, b))
        return abs(lb - la) > threshold
    if max(abs(a), abs(b)) < GAP_FLOOR:
        return False
    return abs(b - a) > threshold * max(abs(a), abs(b))


def _delta(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return b - a
    return None


def compare(a: dict, b: dict) -> dict:
    """{"a", "b", "notes", "rows": [{host, metric, a, b, delta, changed}], "changed": n}."""
    rows = []
    hosts = list(dict.fromkeys([*a["hosts"], *b["hosts"]]))
    for host in hosts:
        ha, hb = a["hosts"].get(host), b["hosts"].get(host)
        if ha is None or hb is None:
            rows.append({"host": host, "metric": "present", "a": ha is not None, "b": hb is not None,
                         "delta": None, "changed": True})
            continue
        for label, path, how, threshold in HOST_METRICS:
            va, vb = _get(ha, path), _get(hb, path)
            if va is None and vb is None:
                continue
            rows.append({"host": host, "metric": label, "a": va, "b": vb, "delta": _delta(va, vb),
                         "changed": changed(va, vb, how, threshold)})
        cells_a, cells_b = (r.get("by_cell", {}).get(host, {}) for r in (a, b))
        for cell in [c for c in cells_a if c in cells_b]:
            va, vb = cells_a[cell]["pass_rate"], cells_b[cell]["pass_rate"]
            rows.append({"host": host, "metric": f"pass rate [{cell}]", "a": va, "b": vb,
                         "delta": _delta(va, vb), "changed": changed(va, vb, "abs", 0.05), "cell": cell})
    notes = []
    sa, sb = a["suite"], b["suite"]
    if sa.get("fingerprint") != sb.get("fingerprint"):
        notes.append(f"the runs differ in suite or options: {sa.get('name')} ({sa.get('fingerprint')}) "
                     f"against {sb.get('name')} ({sb.get('fingerprint')})")
    for name, r in (("A", a), ("B", b)):
        if not r["run"].get("complete", True):
            notes.append(f"run {name} is incomplete")
    meta = lambda r: {"suite": r["suite"]["name"], "fingerprint": r["suite"].get("fingerprint"),  # noqa: E731
                      "generated": r["run"].get("generated"), "probes": r["totals"]["probes"]}
    return {"a": meta(a), "b": meta(b), "notes": notes, "rows": rows,
            "changed": sum(r["changed"] for r in rows)}


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items()) or "none"
    return str(v)


def print_comparison(result: dict, a_path: Path, b_path: Path, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"A = {a_path} ({result['a']['suite']}), B = {b_path} ({result['b']['suite']})")
    for col in ("host", "metric", "A", "B", "change"):
        table.add_column(col, overflow="fold")
    for r in result["rows"]:
        if r.get("cell") and not r["changed"]:
            continue  # per-cell rows only when they moved
        delta = r["delta"]
        change = ("[bold red]changed[/]" if r["changed"] else "") + (
            f" ({delta:+.3g})" if delta is not None and r["changed"] else "")
        style = None if r["changed"] else "dim"
        table.add_row(r["host"], r["metric"], _show(r["a"]), _show(r["b"]), change, style=style)
    console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(f"{result['changed']} of {len(result['rows'])} compared metrics changed")
