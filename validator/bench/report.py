"""Bench reports: report.json (everything, for `--compare` and for reproduction),
report.md (tables, plots beside it in plots/) and report.html (self-contained: plots are
embedded PNGs, the suite and the full report JSON are embedded, no external URL).

Metrics, per host (the suite's `metrics` choose which are computed and shown):
- verdicts: the audit scorer's per-answer verdicts and p-values, pass and fail rates, and
  the host verdict by Fisher's method at the suite's alpha (validator.reputation);
- gaps: per-token gaps between the reference's best log-prob and the host token's;
- latency: time to first byte, total time, tokens (or characters) per second;
- determinism: repeats of one probe on one host giving identical answers;
- compliance: the verdicts broken down per settings cell and per prompt set (a host that
  ignores settings fails in some cells and passes in others);
- agreement: host against host, the share of identical answers on the same probes;
- similarity: to the reference's fixed-seed re-run of each probe (ROUGE-L, chrF, exact).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean, median
from typing import Any, Callable, Iterable

from validator.reputation import HostRule, host_verdict
from validator.bench.files import write_atomic
from validator.bench.suite import Plan
from validator.service.provenance import describe

SCHEMA = "validator.bench.report/1"
ARGMAX_GAP = 1e-3  # a token within this many nats of the best counts as the reference's choice
P_FLOOR = 1e-16  # p-values are plotted as -log10(max(p, floor))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return fmean(values) if values else None


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


# --------------------------------------------------------------------------- building

def _merged(p: Plan, results: dict[str, dict], scores: dict[str, dict]) -> list[dict]:
    """One row per probe of the plan: the probe, its result and its score (if any)."""
    out = []
    for q in p.probes:
        r, s = results.get(q.key), scores.get(q.key)
        m = (s or {}).get("metrics") or {}
        gaps = (m.get("per_token") or {}).get("gap") or []
        row = {"key": q.key, "host": q.host, "set": q.set, "prompt_id": q.prompt_id, "cell": q.cell,
               "repeat": q.repeat, "seed": q.seed, "stream": q.stream,
               "greedy": q.settings.greedy, "recorded": r is not None,
               "prompt_chars": sum(len(m["content"]) for m in q.messages),
               "ok": bool(r and r["ok"]), "error": r["error"] if r else None,
               "detail": r["detail"] if r and not r["ok"] else "",
               "ttfb_s": r["ttfb_s"] if r else None, "total_s": r["total_s"] if r else None,
               "bytes": r["bytes"] if r else None, "attempts": r["attempts"] if r else None,
               "text": r["text"] if r else None,
               "verdict": s["verdict"] if s else None, "p_value": s["p_value"] if s else None,
               "reason": (s.get("reasons") or [""])[0] if s else None,
               "tokens": m.get("tokens"), "gaps": gaps,
               "mean_gap": _mean(gaps), "max_gap": max(gaps) if gaps else None,
               "z": _best_z(m), "support_violations": (m.get("sampled") or {}).get("support_violations"),
               "similarity": m.get("similarity")}
        out.append(row)
    return out


def _best_z(metrics: dict) -> float | None:
    sampled = metrics.get("sampled")
    if not sampled:
        return None
    return sampled["z"].get(sampled["order"])


def _verdict_stats(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["verdict"] is not None and r["verdict"] != "error"]
    verdicts = Counter(r["verdict"] for r in rows if r["verdict"] is not None)
    ps = [r["p_value"] for r in scored if r["p_value"] is not None]
    gaps = [g for r in scored for g in r["gaps"]]
    zs = [r["z"] for r in scored if r["z"] is not None]
    return {"probes": len(rows), "answered": sum(r["ok"] for r in rows),
            "errors": sum(r["recorded"] and not r["ok"] for r in rows),
            "scored": len(scored), "pass": verdicts["pass"], "fail": verdicts["fail"],
            "inconclusive": verdicts["inconclusive"], "unscorable": verdicts["error"],
            "pass_rate": _rate(verdicts["pass"], len(scored)),
            "fail_rate": _rate(verdicts["fail"], len(scored)),
            "p_median": median(ps) if ps else None, "gap_mean": _mean(gaps), "z_mean": _mean(zs),
            "support_violations": sum(r["support_violations"] or 0 for r in scored),
            "prompt_chars_mean": _mean(r["prompt_chars"] for r in rows),
            "total_p50": _quantile([r["total_s"] for r in rows if r["ok"]], 0.5)}


def _gap_stats(gaps: list[float], tolerance: float | None) -> dict:
    return {"tokens": len(gaps), "mean": _mean(gaps), "p50": _quantile(gaps, 0.5),
            "p90": _quantile(gaps, 0.9), "p99": _quantile(gaps, 0.99),
            "max": max(gaps) if gaps else None,
            "share_argmax": _rate(sum(g <= ARGMAX_GAP for g in gaps), len(gaps)),
            "share_over_tolerance": (_rate(sum(g > tolerance for g in gaps), len(gaps))
                                     if tolerance is not None else None)}


def _latency(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["ok"]]
    ttfb = [r["ttfb_s"] for r in ok if r["ttfb_s"] is not None]
    total = [r["total_s"] for r in ok if r["total_s"]]
    tps = [r["tokens"] / r["total_s"] for r in ok if r["tokens"] and r["total_s"]]
    cps = [len(r["text"] or "") / r["total_s"] for r in ok if r["total_s"]]
    return {"ttfb_p50": _quantile(ttfb, 0.5), "ttfb_p90": _quantile(ttfb, 0.9),
            "total_p50": _quantile(total, 0.5), "total_p90": _quantile(total, 0.9),
            "tokens_per_s_p50": _quantile(tps, 0.5), "chars_per_s_p50": _quantile(cps, 0.5)}


def _determinism(rows: list[dict]) -> dict | None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["ok"]:
            groups[(r["set"], r["prompt_id"], r["cell"])].append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    greedy = [v for v in groups.values() if v[0]["greedy"]]
    sampled = [v for v in groups.values() if not v[0]["greedy"]]
    identical = sum(len({r["text"] for r in v}) == 1 for v in greedy)
    return {"groups": len(groups), "greedy_groups": len(greedy), "greedy_identical": identical,
            "greedy_identical_share": _rate(identical, len(greedy)),
            "sampled_groups": len(sampled),
            "sampled_distinct_share": _mean(len({r["text"] for r in v}) / len(v) for v in sampled)}


def _similarity(rows: list[dict]) -> dict | None:
    sims = [r["similarity"] for r in rows if r["similarity"]]
    if not sims:
        return None
    return {"answers": len(sims), "exact_share": fmean(float(s["exact"]) for s in sims),
            "rouge_l_mean": fmean(s["rouge_l"] for s in sims), "chrf_mean": fmean(s["chrf"] for s in sims)}


def _agreement(rows: list[dict], hosts: list[str]) -> dict:
    """Host against host: identical answers on the same probe (set, prompt, cell, repeat)."""
    answers: dict[str, dict[tuple, tuple[str, bool]]] = {h: {} for h in hosts}
    for r in rows:
        if r["ok"]:
            answers[r["host"]][(r["set"], r["prompt_id"], r["cell"], r["repeat"])] = (r["text"], r["greedy"])
    same, greedy_same, common, greedy_common = ([[None] * len(hosts) for _ in hosts] for _ in range(4))
    for i, a in enumerate(hosts):
        for j, b in enumerate(hosts):
            shared = answers[a].keys() & answers[b].keys()
            g = [k for k in shared if answers[a][k][1]]
            common[i][j], greedy_common[i][j] = len(shared), len(g)
            same[i][j] = _rate(sum(answers[a][k][0] == answers[b][k][0] for k in shared), len(shared))
            greedy_same[i][j] = _rate(sum(answers[a][k][0] == answers[b][k][0] for k in g), len(g))
    return {"hosts": hosts, "identical": same, "greedy_identical": greedy_same, "common": common,
            "greedy_common": greedy_common}


def build(p: Plan, manifest: dict, results: dict[str, dict], scores: dict[str, dict],
          sessions: list[dict]) -> dict:
    suite = p.suite
    metrics = set(suite.metrics)
    rows = _merged(p, results, scores)
    hosts = [h.name for h in suite.hosts]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    tolerance = next((s["metrics"]["gap"]["tolerance"] for s in scores.values()
                      if (s.get("metrics") or {}).get("gap")), None)
    rule = HostRule(alpha=suite.alpha)
    by_host: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_host[r["host"]].append(r)
    out_hosts = {}
    for h in suite.hosts:
        hr = by_host[h.name]
        errors = Counter(r["error"] for r in hr if r["recorded"] and not r["ok"])
        entry: dict[str, Any] = {"url": h.url, "model": h.model or suite.model,
                                 "probes": len(hr), "recorded": sum(r["recorded"] for r in hr),
                                 "answered": sum(r["ok"] for r in hr),
                                 "errors": dict(errors.most_common()),
                                 "error_rate": _rate(sum(errors.values()), sum(r["recorded"] for r in hr))}
        if suite.scored:
            scored = [r for r in hr if r["verdict"] not in (None, "error")]
            entry.update({k: v for k, v in _verdict_stats(hr).items()
                          if k not in ("probes", "answered", "errors")})
            hv = host_verdict([r["p_value"] for r in scored], [r["verdict"] for r in scored], rule)
            entry["verdict"] = hv["verdict"] if scored else None
            entry["combined_p"] = hv["p_value"] if scored else None
            ps = [r["p_value"] for r in scored]
            entry["p_min"] = min(ps) if ps else None
        if "gaps" in metrics:
            entry["gap"] = _gap_stats([g for r in hr for g in r["gaps"]], tolerance)
            entry["gap_greedy"] = _gap_stats([g for r in hr if r["greedy"] for g in r["gaps"]], tolerance)
        if "latency" in metrics:
            entry["latency"] = _latency(hr)
        if "determinism" in metrics:
            entry["determinism"] = _determinism(hr)
        if "similarity" in metrics:
            entry["similarity"] = _similarity(hr)
        out_hosts[h.name] = entry
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "suite": {"name": suite.name, "description": suite.description, "model": suite.model,
                  "path": manifest.get("suite_path"), "sha256": manifest.get("suite_sha256"),
                  "fingerprint": manifest.get("fingerprint"), "seed": suite.seed,
                  "repeats": suite.repeats, "metrics": suite.metrics, "alpha": suite.alpha,
                  "options": p.options, "text": p.suite_text, "normalised": suite.model_dump(mode="json")},
        "run": {"created": manifest.get("created"), "scored_by": _producers(scores),
                "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "sessions": sessions, "tolerance": tolerance,
                "complete": all(r["recorded"] for r in rows) and (
                    not suite.scored or all(r["verdict"] is not None for r in rows if r["ok"]))},
        "totals": {"probes": len(rows), "recorded": sum(r["recorded"] for r in rows),
                   "answered": sum(r["ok"] for r in rows),
                   "scored": sum(r["verdict"] is not None for r in rows)},
        "hosts": out_hosts, "cells": cells, "sets": sets,
    }
    if "compliance" in metrics and suite.scored:
        report["by_cell"] = {h: {c: _verdict_stats([r for r in by_host[h] if r["cell"] == c])
                                 for c in cells} for h in hosts}
        report["by_set"] = {h: {s: _verdict_stats([r for r in by_host[h] if r["set"] == s])
                                for s in sets} for h in hosts}
    if "agreement" in metrics:
        report["agreement"] = _agreement(rows, hosts)
    drop = {"gaps"} | (set() if "similarity" in metrics else {"similarity"})
    report["probes"] = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    report["plots"] = plots(report, rows)
    return report


def _producers(scores: dict[str, dict]) -> list[dict]:
    """The distinct provenances of the scores (what produced the verdicts), in order."""
    out: list[dict] = []
    for s in scores.values():
        body = s.get("provenance")
        if body and body not in out:
            out.append(body)
    return out


# --------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _heatmap(title: str, rows: list[str], cols: list[str], values: list[list[float | None]],
             labels: list[list[str]], cbar: str) -> bytes:
    import numpy as np

    fig = _figure(max(5.0, 1.2 + 1.1 * len(cols)), 1.4 + 0.45 * len(rows))
    ax = fig.add_subplot()
    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.8)
    return _png(fig)


def _plot_gaps(report: dict, rows: list[dict]) -> bytes | None:
    import numpy as np

    fig = _figure(7, 3.6)
    ax = fig.add_subplot()
    drawn = False
    for host in report["hosts"]:
        gaps = np.sort([g for r in rows if r["host"] == host for g in r["gaps"]])
        if len(gaps):
            ax.step(np.maximum(gaps, 1e-4), np.arange(1, len(gaps) + 1) / len(gaps), where="post",
                    label=f"{host} ({len(gaps)} tokens)")
            drawn = True
    if not drawn:
        return None
    tol = report["run"]["tolerance"]
    if tol is not None:
        ax.axvline(tol, color="grey", ls="--", lw=1, label=f"greedy tolerance {tol:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("per-token gap to the reference's best token (nats; 1e-4 = its choice)")
    ax.set_ylabel("share of tokens at or below")
    ax.set_title("Per-token gap distribution", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _plot_pvalues(report: dict, rows: list[dict]) -> bytes | None:
    import numpy as np

    hosts = list(report["hosts"])
    fig = _figure(7, 1.2 + 0.45 * len(hosts))
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    drawn = False
    for i, host in enumerate(hosts):
        ps = [r["p_value"] for r in rows if r["host"] == host and r["p_value"] is not None
              and r["verdict"] != "error"]
        if ps:
            x = -np.log10(np.maximum(ps, P_FLOOR))
            ax.scatter(x, i + rng.uniform(-0.2, 0.2, len(x)), s=14, alpha=0.7)
            drawn = True
    if not drawn:
        return None
    ax.axvline(2, color="green", ls="--", lw=1, label="pass (p >= 1e-2)")
    ax.axvline(4, color="red", ls="--", lw=1, label="fail (p < 1e-4)")
    ax.set_yticks(range(len(hosts)), hosts, fontsize=8)
    ax.set_ylim(-0.6, len(hosts) - 0.4)
    ax.set_xlabel(f"-log10 p-value per answer (floored at {P_FLOOR:g})")
    ax.set_title("Per-answer p-values", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def _plot_latency(report: dict, rows: list[dict]) -> bytes | None:
    import numpy as np

    hosts = [h for h in report["hosts"] if any(r["ok"] and r["host"] == h for r in rows)]
    if not hosts:
        return None
    fig = _figure(8, 1.4 + 0.4 * len(hosts))
    axes = fig.subplots(1, 2, sharey=True)
    rng = np.random.default_rng(0)
    for ax, key, title in ((axes[0], "ttfb_s", "time to first byte (s)"),
                           (axes[1], "total_s", "total time (s)")):
        for i, h in enumerate(hosts):
            xs = [r[key] for r in rows if r["host"] == h and r["ok"] and r[key] is not None]
            if xs:
                ax.scatter(xs, i + rng.uniform(-0.15, 0.15, len(xs)), s=12, alpha=0.6)
                ax.plot([median(xs)] * 2, [i - 0.3, i + 0.3], color="black", lw=2)
        ax.set_xscale("log")
        ax.set_xlabel(title + ", bar: median")
        ax.set_yticks(range(len(hosts)), hosts, fontsize=8)
    fig.suptitle("Latency of answered probes", fontsize=10)
    return _png(fig)


def _plot_agreement(report: dict) -> bytes | None:
    ag = report.get("agreement")
    if not ag or len(ag["hosts"]) < 2:
        return None
    key, common = ("greedy_identical", "greedy_common") if any(
        any(row) for row in ag["greedy_common"]) else ("identical", "common")
    labels = [[("-" if v is None else f"{v:.0%}") + f"\n{n}" for v, n in zip(vr, nr)]
              for vr, nr in zip(ag[key], ag[common])]
    what = "greedy probes" if key == "greedy_identical" else "probes"
    return _heatmap(f"Identical answers on the same {what} (share, count)",
                    ag["hosts"], ag["hosts"], ag[key], labels, "share identical")


def _plot_breakdown(report: dict, which: str, title: str) -> bytes | None:
    table = report.get(which)
    if not table:
        return None
    hosts = list(table)
    cols = report["cells"] if which == "by_cell" else report["sets"]
    if which == "by_set" and len(cols) < 2:
        return None
    values = [[table[h][c]["pass_rate"] for c in cols] for h in hosts]
    labels = [[f"{table[h][c]['pass']}/{table[h][c]['scored']}" for c in cols] for h in hosts]
    return _heatmap(title, hosts, cols, values, labels, "pass rate")


def _plot_determinism(report: dict) -> bytes | None:
    hosts = [(h, e["determinism"]) for h, e in report["hosts"].items()
             if e.get("determinism") and e["determinism"]["greedy_groups"]]
    if not hosts:
        return None
    fig = _figure(6, 1.2 + 0.4 * len(hosts))
    ax = fig.add_subplot()
    shares = [d["greedy_identical_share"] for _, d in hosts]
    ax.barh(range(len(hosts)), shares, color=["#4a4" if s == 1 else "#c44" for s in shares])
    for i, (_, d) in enumerate(hosts):
        ax.text(min(d["greedy_identical_share"], 0.85) + 0.02, i,
                f"{d['greedy_identical']}/{d['greedy_groups']}", va="center", fontsize=8)
    ax.set_yticks(range(len(hosts)), [h for h, _ in hosts], fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("share of repeated greedy probes with identical answers")
    ax.set_title("Determinism at temperature 0", fontsize=10)
    return _png(fig)


PLOTS: list[tuple[str, str, Callable[[dict, list[dict]], bytes | None]]] = [
    ("gaps", "Per-token gap distributions", _plot_gaps),
    ("p_values", "Per-answer p-values", _plot_pvalues),
    ("latency", "Latency", _plot_latency),
    ("agreement", "Host against host", lambda rep, rows: _plot_agreement(rep)),
    ("by_cell", "Pass rate per settings cell",
     lambda rep, rows: _plot_breakdown(rep, "by_cell", "Pass rate per settings cell (passed/scored)")),
    ("by_set", "Pass rate per prompt set",
     lambda rep, rows: _plot_breakdown(rep, "by_set", "Pass rate per prompt set (passed/scored)")),
    ("determinism", "Determinism", lambda rep, rows: _plot_determinism(rep)),
]
NEEDS = {"gaps": "gaps", "p_values": "verdicts", "latency": "latency", "agreement": "agreement",
         "by_cell": "compliance", "by_set": "compliance", "determinism": "determinism"}


def plots(report: dict, rows: list[dict]) -> list[dict]:
    """[{name, title, png (base64)}] for the metrics the suite asked for and has data for."""
    metrics = set(report["suite"]["metrics"])
    out = []
    for name, title, draw in PLOTS:
        if NEEDS[name] not in metrics:
            continue
        png = draw(report, rows)
        if png:
            out.append({"name": name, "title": title, "png": base64.b64encode(png).decode("ascii")})
    return out


# --------------------------------------------------------------------------- rendering

def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "%":
        return f"{v:.0%}"
    if kind == "p":
        return f"{v:.2g}"
    if kind == "s":
        return f"{v:.2f}"
    if kind == "int":
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {n}" for k, n in v.items()) or "none"
    return str(v)


def host_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """The per-host summary as a header and rows of strings (Markdown and HTML)."""
    metrics = set(report["suite"]["metrics"])
    head = ["host", "probes", "answered", "errors"]
    scored = "verdicts" in metrics or "compliance" in metrics or "gaps" in metrics
    if scored:
        head += ["verdict", "combined p", "pass", "fail", "inconclusive", "pass rate"]
    if "gaps" in metrics:
        head += ["mean gap", "p99 gap", "argmax share"]
    if "latency" in metrics:
        head += ["ttfb p50 (s)", "total p50 (s)", "tokens/s"]
    if "determinism" in metrics:
        head += ["greedy repeats identical"]
    if "similarity" in metrics:
        head += ["ROUGE-L to re-run"]
    rows = []
    for name, h in report["hosts"].items():
        row = [name, str(h["probes"]), str(h["answered"]), _fmt(h["errors"]) if h["errors"] else "0"]
        if scored:
            row += [h.get("verdict") or "-", _fmt(h.get("combined_p"), "p"), str(h.get("pass", 0)),
                    str(h.get("fail", 0)), str(h.get("inconclusive", 0)), _fmt(h.get("pass_rate"), "%")]
        if "gaps" in metrics:
            g = h["gap"]
            row += [_fmt(g["mean"]), _fmt(g["p99"]), _fmt(g["share_argmax"], "%")]
        if "latency" in metrics:
            lat = h["latency"]
            row += [_fmt(lat["ttfb_p50"], "s"), _fmt(lat["total_p50"], "s"), _fmt(lat["tokens_per_s_p50"])]
        if "determinism" in metrics:
            d = h.get("determinism")
            row += [f"{d['greedy_identical']}/{d['greedy_groups']}" if d and d["greedy_groups"] else "-"]
        if "similarity" in metrics:
            row += [_fmt((h.get("similarity") or {}).get("rouge_l_mean"))]
        rows.append(row)
    return head, rows


def breakdown_table(report: dict, which: str) -> tuple[list[str], list[list[str]]] | None:
    table = report.get(which)
    if not table:
        return None
    head = ["host", "cell" if which == "by_cell" else "prompt set", "answered", "scored", "pass",
            "fail", "inconclusive", "pass rate", "median p", "mean gap", "mean z (sampled)",
            "prompt chars", "total p50 (s)"]
    rows = []
    for host, per in table.items():
        for col, s in per.items():
            rows.append([host, col, str(s["answered"]), str(s["scored"]), str(s["pass"]), str(s["fail"]),
                         str(s["inconclusive"]), _fmt(s["pass_rate"], "%"), _fmt(s["p_median"], "p"),
                         _fmt(s["gap_mean"]), _fmt(s["z_mean"]), _fmt(s["prompt_chars_mean"], "int"),
                         _fmt(s["total_p50"], "s")])
    return head, rows


def error_rows(report: dict) -> list[list[str]]:
    return [[r["host"], r["set"], r["prompt_id"], r["cell"], str(r["repeat"]), r["error"],
             (r["detail"] or "")[:160]] for r in report["probes"] if r["recorded"] and not r["ok"]]


ERROR_HEAD = ["host", "set", "prompt", "cell", "repeat", "error", "detail"]


_MD_ESCAPE = str.maketrans({c: "\\" + c for c in "\\|[]`<>"} | {"\n": " ", "\r": " "})


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).translate(_MD_ESCAPE)  # noqa: E731  (hosts' text must stay text)
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _reproduce(report: dict) -> str:
    s = report["suite"]
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in s["options"].items() if v is not None)
    hosts = ",".join(f"{n}=URL" for n in report["hosts"])
    return f"validator bench {s['path'] or 'SUITE.yaml'} --hosts {hosts} --out DIR {opts}".strip()


def markdown(report: dict, plot_dir: str = "plots") -> str:
    s, run, t = report["suite"], report["run"], report["totals"]
    out = [f"# Bench report: {s['name']}", ""]
    if s["description"]:
        out += [s["description"].strip(), ""]
    out += [f"Model claimed: `{s['model']}`. Seed {s['seed']}, {s['repeats']} repeat(s), "
            f"fingerprint `{s['fingerprint']}`. Probes: {t['probes']}, recorded {t['recorded']}, "
            f"answered {t['answered']}, scored {t['scored']}"
            + ("" if run["complete"] else " (**incomplete run**)") + ".", "",
            "## Hosts", "", _md_table(*host_table(report)), ""]
    errs = error_rows(report)
    if errs:
        out += ["## Errors", "", _md_table(ERROR_HEAD, errs), ""]
    for which, title in (("by_cell", "Per settings cell"), ("by_set", "Per prompt set")):
        tb = breakdown_table(report, which)
        if tb:
            out += [f"## {title}", "", _md_table(*tb), ""]
    if run.get("scored_by"):
        out += ["## Scored by", ""] + [f"- {describe(b)}" for b in run["scored_by"]] + [""]
    if report["plots"]:
        out += ["## Plots", ""] + [f"![{p['title']}]({plot_dir}/{p['name']}.png)" for p in report["plots"]] + [""]
    out += ["## Reproduce", "", "```sh", _reproduce(report), "```", "",
            f"Suite file (sha256 `{s['sha256']}`):", "", "```yaml", s["text"].rstrip(), "```", ""]
    return "\n".join(out)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}
.v-honest,.v-pass{color:#186a18;font-weight:600}.v-dishonest,.v-fail{color:#b01818;font-weight:600}
.v-inconclusive{color:#a06800}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.meta{color:#555}
"""


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    coloured = {i for i, h in enumerate(head) if h in ("verdict", "result")}

    def cell(i: int, v: str) -> str:
        css = f' class="v-{v}"' if i in coloured and v in (
            "honest", "dishonest", "inconclusive", "pass", "fail") else ""
        return f"<td{css}>{html.escape(str(v))}</td>"

    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
            + "</tbody></table>")


def render_html(report: dict) -> str:
    s, run, t = report["suite"], report["run"], report["totals"]
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
             f"<title>Bench report: {e(s['name'])}</title><style>{CSS}</style></head><body>",
             f"<h1>Bench report: {e(s['name'])}</h1>"]
    if s["description"]:
        parts.append(f"<p>{e(s['description'].strip())}</p>")
    parts.append(f"<p class=meta>Model claimed <code>{e(s['model'])}</code>; seed {s['seed']}; "
                 f"{s['repeats']} repeat(s); fingerprint <code>{e(str(s['fingerprint']))}</code>; "
                 f"probes {t['probes']}, recorded {t['recorded']}, answered {t['answered']}, "
                 f"scored {t['scored']}{'' if run['complete'] else ' — <b>incomplete run</b>'}; "
                 f"generated {e(run['generated'])}.</p>")
    parts += ["<h2 id=hosts>Hosts</h2>", _html_table(*host_table(report), cls="hosts")]
    errs = error_rows(report)
    if errs:
        parts += ["<h2 id=errors>Errors</h2>", _html_table(ERROR_HEAD, errs, cls="errors")]
    if run.get("scored_by"):
        parts += ["<h2 id=scored-by>Scored by</h2><ul>"] + [f"<li>{e(describe(b))}</li>" for b in run["scored_by"]] + ["</ul>"]
    for p in report["plots"]:
        parts.append(f'<h2 id="plot-{e(p["name"])}">{e(p["title"])}</h2><figure>'
                     f'<img class=plot data-plot="{e(p["name"])}" alt="{e(p["title"])}" '
                     f'src="data:image/png;base64,{p["png"]}"></figure>')
    for which, title in (("by_cell", "Per settings cell"), ("by_set", "Per prompt set")):
        tb = breakdown_table(report, which)
        if tb:
            parts += [f"<h2>{title}</h2>", _html_table(*tb, cls=which)]
    probe_head = ["host", "set", "prompt", "cell", "repeat", "stream", "result", "p-value", "reason", "answer"]
    probe_rows = [[r["host"], r["set"], r["prompt_id"], r["cell"], str(r["repeat"]),
                   "yes" if r["stream"] else "no",
                   (r["verdict"] or ("answered" if r["ok"] else (r["error"] or "not recorded"))),
                   _fmt(r["p_value"], "p"), (r["reason"] or r["detail"] or "")[:200],
                   (r["text"] or "")[:300]] for r in report["probes"]]
    parts += [f"<h2 id=probes>Probes</h2><details><summary>{len(probe_rows)} probes</summary>",
              _html_table(probe_head, probe_rows, cls="probes"), "</details>"]
    parts += ["<h2 id=reproduce>Reproduce</h2>", f"<pre>{e(_reproduce(report))}</pre>",
              f"<p>Suite file <code>{e(str(s['path']))}</code> (sha256 <code>{e(str(s['sha256']))}</code>), "
              "seeds derive from its <code>seed</code>; every probe's re-run seed is in the data below.</p>",
              f"<pre id=suite-text>{e(s['text'])}</pre>"]
    data = {k: v for k, v in report.items() if k != "plots"}
    blob = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")  # inert inside <script>
    parts.append(f'<script type="application/json" id="report-data">{blob}</script></body></html>')
    return "\n".join(parts)


def write(out: Path, report: dict) -> list[Path]:
    """report.json, report.md, report.html and plots/*.png in `out`; returns the paths."""
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    files = []
    for p in report["plots"]:
        path = plot_dir / f"{p['name']}.png"
        write_atomic(path, base64.b64decode(p["png"]))
        files.append(path)
    data = {k: v for k, v in report.items() if k != "plots"} | {
        "plots": [p["name"] for p in report["plots"]]}
    for name, text in (("report.json", json.dumps(data, indent=1, ensure_ascii=False) + "\n"),
                       ("report.md", markdown(report)), ("report.html", render_html(report))):
        write_atomic(out / name, text)
        files.append(out / name)
    return files
