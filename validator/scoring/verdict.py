"""From an aligned answer to metrics, a p-value and a verdict.

Evidence per answer (docs/methodology.md explains each; README "Known limits" its limits):
- greedy settings: per-token gap between the reference's best log-prob and the host
  token's; a gap over the calibrated tolerance is a violation, honest engines produce
  them at a calibrated rate, so k violations in n tokens has a binomial p-value;
- sampled settings: tokens outside the top-k/top-p support (binomial again), and the
  statistic S = sum(log q(token) + H(q)), which has mean zero under honest sampling
  from q; a Chernoff bound gives its two-sided p-value (too unlikely: another model or
  a hotter sampler; too likely: sampling settings ignored);
- termination: more tokens than max_tokens is impossible for an honest host; an early
  stop where the reference would not end is a violation at a calibrated rate.
The answer's p-value is the Bonferroni-corrected minimum over its components: the
chance that an honest host produces evidence at least this strong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from validator.scoring import alternatives
from validator.scoring.align import Alignment
from validator.scoring.reference import LAMBDAS_HIGH, LAMBDAS_LOW
from validator.models.sampling import ORDERS, Settings
from validator.scoring.tokens import TokenTable


# Distances (nats of the reference's log-prob below the top-k/top-p support's edge) at
# which the pooled edge evidence counts sampled tokens beyond the edge. An honest engine's
# rounding moves a token across the edge by a little, mostly at a narrow top-p; a host
# that ignores top-k/top-p samples tokens far beyond it too. Each gap has its own
# calibrated honest rate (Tolerances.edge_rate).
EDGE_GAPS = (0.0, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Tolerances:
    """Calibrated on honest engines (`validator calibrate`); never tuned on cheaters."""

    greedy_gap: float = 2.0  # nats below the reference's best: a greedy-token violation
    support_gap: float = 1.5  # nats below the edge of the top-k/top-p support
    eos_gap: float = 4.0  # nats below the best, for end-of-sequence at an early stop
    token_rate: float = 1e-3  # honest greedy-gap violations per token (upper bound)
    support_rate: float = 1e-3  # honest support violations per sampled token
    eos_rate: float = 1e-2  # honest early-stop violations per answer
    # Host-level (pooled) evidence, validator.reputation's compliance e-processes:
    statistic_slack: float = 0.08  # honest bias of the log-prob statistic, nats per standard deviation of a step
    # honest sampled tokens beyond the support's edge by more than each of EDGE_GAPS nats
    # (per token, upper bounds); a single number: that rate at every gap
    edge_rate: tuple[float, ...] = (1.5e-2, 7e-3, 2.5e-3, 2.5e-3, 2.5e-3)
    argmax_rate: float = 5e-2  # honest greedy tokens off the reference's argmax (per token)
    source: str = "built-in defaults (uncalibrated)"

    @classmethod
    def from_file(cls, path: str | Path | None) -> "Tolerances":
        if not path or not Path(path).exists():
            return cls()
        raw = json.loads(Path(path).read_text())
        tol = dict(raw["tolerances"])
        if "edge_rate" in tol:
            rate = tol["edge_rate"]
            tol["edge_rate"] = tuple(float(r) for r in rate) if isinstance(rate, list) else (float(rate),) * len(EDGE_GAPS)
            if len(tol["edge_rate"]) != len(EDGE_GAPS):
                raise ValueError(f"{path}: edge_rate needs one rate per gap {EDGE_GAPS}")
        return cls(**{k: tol[k] for k in cls.__dataclass_fields__ if k in tol},
                   source=f"{Path(path).name} ({raw.get('summary', 'calibrated')})")


@dataclass(frozen=True)
class VerdictRule:
    fail_below: float = 1e-4  # an answer with p below this fails
    pass_from: float = 1e-2  # an answer with p at least this passes; between: inconclusive
    length_slack: float = 0.05  # share of max_tokens within which a stop counts as the length limit


@dataclass
class AnswerScore:
    verdict: str
    p_value: float
    reasons: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


def _piece(table: TokenTable, token: int) -> str:
    return table.bytes[token].decode("utf-8", errors="replace")


def _binomial_p(k: int, n: int, rate: float) -> float:
    """P(at least k violations in n tokens at the honest rate)."""
    if k <= 0:
        return 1.0
    return float(stats.binom.sf(k - 1, n, rate))


def _chernoff_two_sided(s: float, var_terms: dict[str, np.ndarray]) -> float:
    """Two-sided tail bound for S = sum of X_t with known per-step log-MGFs.

    Low tail: P(S <= s) <= exp(sum(log E[q^-l]) - l*sum(H) + l*s) for each l in the grid;
    high tail likewise; a union bound over the grid and both tails keeps it valid."""
    ent = var_terms["entropy"].sum()
    low = (var_terms["mgf_low"].sum(0) - LAMBDAS_LOW * ent + LAMBDAS_LOW * s).min()
    high = (var_terms["mgf_high"].sum(0) + LAMBDAS_HIGH * ent - LAMBDAS_HIGH * s).min()
    grid = len(LAMBDAS_LOW) + len(LAMBDAS_HIGH)
    return float(min(1.0, grid * math.exp(min(low, high, 0.0))))


def score_answer(al: Alignment, settings: Settings, table: TokenTable, tol: Tolerances,
          rule: VerdictRule = VerdictRule()) -> AnswerScore:
    f = al.feats
    n = len(al.tokens)
    final = n  # the step after the last token
    logp = al.token_logp
    gaps = f.max_logp[:n] - logp if n else np.zeros(0)
    metrics: dict[str, Any] = {
        "tokens": n,
        "implied_tokens": int(sum(al.implied)),
        "mode": "greedy" if settings.greedy else "sampled",
        "settings": {"temperature": settings.temperature, "top_k": settings.top_k,
                     "top_p": settings.top_p, "max_tokens": settings.max_tokens},
        "alignment": {"branches": al.branches, "forward_passes": al.passes},
        "mean_logprob": float(logp.mean()) if n else None,
        "gap": {
            "share_argmax": float(np.mean(np.array(al.tokens) == f.argmax[:n])) if n else None,
            "p50": float(np.quantile(gaps, 0.5)) if n else None,
            "p90": float(np.quantile(gaps, 0.9)) if n else None,
            "p99": float(np.quantile(gaps, 0.99)) if n else None,
            "max": float(gaps.max()) if n else None,
            "over_tolerance": int((gaps > tol.greedy_gap).sum()),
            "tolerance": tol.greedy_gap,
        },
    }
    components: list[tuple[str, float, str]] = []  # (name, p, reason)

    # -- termination -------------------------------------------------------------------
    fewest = table.fewest_tokens(al.text_bytes)
    stop = "length" if settings.length_stop(n, rule.length_slack) else "eos"
    eos_logp = al.eos_logp
    term: dict[str, Any] = {"stop": stop, "fewest_tokens": fewest, "max_tokens": settings.max_tokens,
                            "eos_gap": float(f.max_logp[final] - eos_logp)}
    metrics["termination"] = term
    if fewest > settings.max_tokens:
        reach = table.fewest_tokens(al.text_bytes, into_last_char=True)
        term["fewest_tokens_into_last_char"] = reach
        if reach > settings.max_tokens:
            components.append(("length", 0.0,
                               f"needs at least {fewest} tokens, more than max_tokens={settings.max_tokens}"))
    elif stop == "eos":
        if settings.greedy:
            bad = term["eos_gap"] > tol.eos_gap
            measure = term["eos_gap"]
        else:
            measure = float(f.boundary[final].min() - eos_logp)  # below the support's edge
            bad = measure > tol.support_gap
        term["violation"] = bool(bad)
        if bad:
            expected = _piece(table, int(f.argmax[final]))
            components.append(("termination", tol.eos_rate,
                               f"stopped after {n} of max {settings.max_tokens} tokens where the "
                               f"reference does not end (end of sequence {measure:.1f} nats below "
                               f"{'its choice' if settings.greedy else 'the support'}; it expected {expected!r})"))

    # -- greedy: gaps ------------------------------------------------------------------
    if settings.greedy:
        over = np.nonzero(gaps > tol.greedy_gap)[0]
        p = _binomial_p(len(over), n, tol.token_rate)
        if len(over):
            i = int(over[0])
            components.append(("gap", p,
                               f"{len(over)} of {n} tokens more than {tol.greedy_gap:.2f} nats below the "
                               f"reference's choice, first at token {i} ({_piece(table, al.tokens[i])!r} "
                               f"where the reference expected {_piece(table, int(f.argmax[i]))!r}, "
                               f"{gaps[i]:.1f} nats)"))
        else:
            components.append(("gap", p, ""))
        metrics["pooled"] = {"mode": "greedy", "tokens": n,
                             "off_argmax": int((np.array(al.tokens) != f.argmax[:n]).sum()) if n else 0,
                             "gap_sum": round(float(gaps.sum()), 6) if n else 0.0,
                             "rate": tol.argmax_rate}
    else:
        components += _sampled(al, settings, tol, table, metrics, stop, rule)
    # Every answer is one trial of ending early where the reference does not: pooled per
    # host (validator.reputation), a few such stops outweigh their weak per-answer p-values.
    metrics["pooled"]["termination"] = {"answers": 1, "violations": int(term.get("violation", False)),
                                        "rate": tol.eos_rate}

    # -- verdict -------------------------------------------------------------------------
    p_min = min(c[1] for c in components)
    p_value = min(1.0, p_min * len(components))
    verdict = "fail" if p_value < rule.fail_below else "pass" if p_value >= rule.pass_from else "inconclusive"
    reasons = [c[2] for c in components if c[2]] or [_summary(metrics, settings, tol)]
    metrics["components"] = {c[0]: c[1] for c in components}
    return AnswerScore(verdict, p_value, reasons, metrics)


def _sampled(al: Alignment, settings: Settings, tol: Tolerances, table: TokenTable,
             metrics: dict, stop: str, rule: VerdictRule) -> list[tuple[str, float, str]]:
    f = al.feats
    n = len(al.tokens)
    steps = np.arange(n)
    logp = al.token_logp
    edge = f.boundary[:n].min(axis=1) if n else np.zeros(0)
    support_gap = np.maximum(edge - logp, 0.0)
    outside = np.nonzero(support_gap > tol.support_gap)[0]
    inside = support_gap <= tol.support_gap
    # The statistic runs over the in-support tokens, and over the end of sequence when
    # the host chose to stop (that was a sampled token too).
    idx = steps[inside]
    tok_logp = logp[inside]
    eos_logp = al.eos_logp
    if stop == "eos" and f.boundary[n].min() - eos_logp <= tol.support_gap:
        idx = np.append(idx, n)
        tok_logp = np.append(tok_logp, eos_logp)
    order_p, order_z = [], []
    for o in range(2):
        clipped = np.maximum(tok_logp, f.boundary[idx, o])
        logq = clipped / settings.temperature - f.log_z[idx, o]
        ent = f.entropy[idx, o]
        s = float((logq + ent).sum())
        var = float(f.variance[idx, o].sum())
        order_z.append(s / math.sqrt(var) if var > 1e-12 else 0.0)
        order_p.append(_chernoff_two_sided(s, {"entropy": ent, "mgf_low": f.mgf_low[idx, o],
                                               "mgf_high": f.mgf_high[idx, o]}))
    metrics["pooled"] = pooled_sampled(al, settings, tol, idx, tok_logp, support_gap)
    best = int(np.argmax(order_p))
    p_stat, z = order_p[best], order_z[best]
    p_support = _binomial_p(len(outside), n, tol.support_rate)
    metrics["sampled"] = {
        "support_violations": int(len(outside)),
        "support_tolerance": tol.support_gap,
        "statistic_tokens": int(len(idx)),
        "z": {name: round(order_z[o], 3) for o, name in enumerate(ORDERS)},
        "p_statistic": {name: order_p[o] for o, name in enumerate(ORDERS)},
        "order": ORDERS[best],
    }
    out = []
    if len(outside):
        i = int(outside[0])
        out.append(("support", p_support,
                    f"{len(outside)} of {n} sampled tokens outside the top-k={settings.top_k}/"
                    f"top-p={settings.top_p} support by more than {tol.support_gap:.2f} nats, first at "
                    f"token {i} ({_piece(table, al.tokens[i])!r}, {support_gap[i]:.1f} nats out)"))
    else:
        out.append(("support", p_support, ""))
    if p_stat >= rule.pass_from:
        why = ""
    elif z < 0:
        why = f"tokens less likely than honest sampling at temperature {settings.temperature:g} gives " \
              f"(log-prob statistic z={z:.1f}): another model or a hotter sampler"
    else:
        why = f"tokens more likely than honest sampling at temperature {settings.temperature:g} gives " \
              f"(log-prob statistic z=+{z:.1f}): the sampling settings look ignored (greedy or colder)"
    out.append(("statistic", p_stat, why))
    return out


# The lambda grid of the pooled log-prob evidence (both signs): the Chernoff grid's.
POOLED_LAMBDAS = np.concatenate([-LAMBDAS_LOW[::-1], LAMBDAS_HIGH])


def pooled_sampled(al: Alignment, settings: Settings, tol: Tolerances, idx: np.ndarray,
                   tok_logp: np.ndarray, support_gap: np.ndarray) -> dict[str, Any]:
    """What a sampled answer adds to its host's pooled evidence (validator.reputation):
    per sampler order the statistic S and its exact log-MGF Psi(lambda) = sum over the
    statistic's steps of log E_q[exp(lambda X_t)] on POOLED_LAMBDAS; how many tokens fall
    beyond the support's edge by more than each of EDGE_GAPS; per order the log e-value of
    each explicit alternative (validator.scoring.alternatives), with the settings asked."""
    f = al.feats

    def statistic(steps: np.ndarray, token_logp: np.ndarray, o: int) -> dict[str, Any]:
        low, high = LAMBDAS_LOW[::-1], LAMBDAS_HIGH
        clipped = np.maximum(token_logp, f.boundary[steps, o])
        logq = clipped / settings.temperature - f.log_z[steps, o]
        ent = f.entropy[steps, o].sum()
        # X = log q + H: log E[e^{-l X}] = log E[q^-l] - l H, log E[e^{l X}] = log E[q^l] + l H
        neg = f.mgf_low[steps, o][:, ::-1].sum(0) - low * ent
        pos = f.mgf_high[steps, o].sum(0) + high * ent
        sd = float(np.sqrt(np.maximum(f.variance[steps, o], 0.0)).sum())
        return {"s": round(float((logq + f.entropy[steps, o]).sum()), 6),
                "psi": [round(float(v), 6) for v in np.concatenate([neg, pos])],
                "var": round(float(f.variance[steps, o].sum()), 6), "sd": round(sd, 6),
                # honest numeric bias scales with each step's spread (a step that keeps
                # one token has X = 0 on every engine)
                "slack": round(tol.statistic_slack * sd, 6)}

    orders = [statistic(idx, tok_logp, o) for o in range(2)]
    out = {"mode": "sampled", "tokens": int(len(idx)),
           **{k: [o[k] for o in orders] for k in ("s", "psi", "var", "sd", "slack")},
           "lambdas": [float(v) for v in POOLED_LAMBDAS],
           "edge": {"tokens": int(len(support_gap)), "gaps": list(EDGE_GAPS),
                    "beyond": [int((support_gap > g).sum()) for g in EDGE_GAPS],
                    "rate": list(tol.edge_rate)}}
    if f.alt_boundary is not None:
        log_e = alternatives.answer_log_e(tok_logp, settings, f.boundary[idx], f.log_z[idx], f.alt_boundary[idx],
                                          f.alt_log_z[idx], f.alt_beyond[idx],
                                          tol.edge_rate[EDGE_GAPS.index(alternatives.EDGE_GAP)])
        out["alternatives"] = {"settings": f"{settings.temperature:g}/{settings.top_k}/{settings.top_p:g}",
                               "log_e": [[round(float(v), 4) for v in row] for row in log_e]}
    return out


def _summary(metrics: dict, settings: Settings, tol: Tolerances) -> str:
    n = metrics["tokens"]
    end = "ends where the reference can end" if metrics["termination"]["stop"] == "eos" \
        else f"stops at the max_tokens limit ({settings.max_tokens})"
    if settings.greedy:
        return f"all {n} tokens within {tol.greedy_gap:.2f} nats of the reference's choice; {end}"
    z = metrics["sampled"]["z"][metrics["sampled"]["order"]]
    return f"all {n} tokens inside the sampling support; log-prob statistic z={z:+.1f}; {end}"

