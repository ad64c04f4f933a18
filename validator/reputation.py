"""A host's reputation: an honesty state, and one score, from its history of probes.

Pure functions of their inputs (the host's state, its outcomes, its ratings, the
config), so a restarted daemon recomputes exactly what it had. Storage and scheduling
live elsewhere; this module only reads and returns values.

Score
-----
    score = honesty(state) * (w_a * availability + w_l * latency + w_f * feedback)
                           / (w_a + w_l + w_f)

over the components that have data (a term with no data drops out of both sums; no
data at all gives 0). Every component is in [0, 1], so the score is too. Defaults:
w_a = 0.5, w_l = 0.25, w_f = 0.25 (the network's own weight for human feedback);
without ratings the score is (0.5 * availability + 0.25 * latency) / 0.75.
honesty(state) is 1 for `trusted`, 0.5 for `new` and `probation`, 0 for `flagged` and
`disabled`.

- availability: share of probes answered without a transport error (timeouts,
  malformed bodies, 5xx ... as classed by validator.probing.client), over the last `window`
  probes, each weighted 2^(-age / half_life), age 0 for the newest probe. Probes that
  failed on the validator's own credentials (VALIDATOR_ERRORS) are left out.
- latency: per answered probe, the mean of a time-to-first-byte term (1 at or below
  `ttfb_target_s`, 0 at or above `ttfb_limit_s`, linear between) and a throughput term
  (bytes / total_s: 1 at or above `throughput_target_bps`, 0 at or below
  `throughput_limit_bps`, linear between); averaged with the same decay.
- feedback: human ratings 1..5 mapped to (r - 1) / 4, decayed with
  `feedback_half_life` (in ratings).

Availability, latency and feedback move the score, never the honesty state.

Honesty evidence (the `flagged` decision)
-----------------------------------------
Each scored probe's p-value p becomes an e-value e = min(cap, kappa * p^(kappa - 1))
(kappa = 0.5, cap = 1000): for a p-value that is uniform or conservative, E[e] <= 1.
The host's evidence after probe n is a mixture over the probe s at which cheating
might have started,

    R_n = sum_{s <= n} w_s * prod_{t = s..n} e_t,   w_s = 1 / (s (s + 1)),

computed as R_n = (R_{n-1} + w_n) * e_n. Since the weights sum to 1, R_n is bounded by
a nonnegative supermartingale with initial value 1 under honesty, and Ville's
inequality gives P(R_n >= 1/alpha for some n, ever) <= alpha: the false-alarm bound
holds for unlimited looks, whenever and however often the daemon calls `assess`, with
no horizon to fix in advance (a month or a year of probing alike). We chose this over
alpha-spending (which needs a planned horizon and spends the level on looks) and
over a plain product martingale (which an honest history drives so low that a host
turning to cheat after a month would take many probes to catch): the mixture pays
only log(1/w_s) ~ 2 log s extra for a change at probe s, e.g. 4 probes at p = 1e-6 to
flag a host that turns after 1000 honest probes. The cap bounds what one probe can do: with
the defaults (cap 1000 < 1/(w_1 alpha) = 2e4) no single probe, however damning (p = 0),
flags a host alone; at least two are needed.
Assumption: each p-value is uniform or larger given the host's earlier probes.

A host is flagged when R_n >= 1/alpha at any probe since its evidence window began.

States
------
- new -> trusted: `trust_after` consecutive scored probes with verdict `pass`.
- new, trusted, probation -> flagged: R_n >= 1/alpha (flagging wins over trusting).
- flagged -> probation: only `release()` (an admin). The release restarts the
  evidence: the caller passes the release's time as `since`, and only probes at or
  after it count toward R_n and the clean runs.
- probation -> trusted: `probation_clean` consecutive passing probes since the release;
  -> flagged again on evidence.
- any -> disabled: only `disable()`; disabled -> new: only `enable()` (the evidence
  window is not restarted, so a host flagged before it was disabled is flagged again).
  `assess` never leaves `disabled` or `flagged`.
Transport errors and unscored probes neither count toward a clean run nor break it;
`fail` and `inconclusive` verdicts break it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from validator.models.sampling import ALTERNATIVES, alternative_name
from validator.store import STATES, VERDICTS


UNSCORED = "error"  # the validator could not score the answer (its fault, not the host's)
SCORED_VERDICTS = tuple(v for v in VERDICTS if v != UNSCORED)  # these carry a p-value
# Call errors that are the validator's own (its credentials refused): they say nothing of
# the host, so availability and latency skip them (validator.probing.client.Err).
VALIDATOR_ERRORS = frozenset({"auth_failed"})


# ---------------------------------------------------------------- pooled compliance evidence
# Per-answer p-values cannot see a small systematic deviation (sampling a little colder,
# top-k/top-p not passed through): every answer's p-value is near 1, and combining
# near-1 p-values never accumulates evidence. These e-processes pool the statistics
# themselves over a host's answers (docs/methodology.md, "Pooled evidence"):
#
# - log-prob: per sampled answer the scorer stores S = sum_t X_t, X_t = log q_t(token) +
#   H(q_t), and its exact log-MGF Psi(l) = sum_t log E_q[exp(l X_t)] on a grid of l of
#   both signs, per sampler order. e(l) = exp(l S - Psi(l) - |l| c D) (D the sum of the
#   steps' standard deviations of X, c the calibrated bias per standard deviation honest
#   engines may show) has expectation at most 1
#   under honest sampling from q (exactly 1 for c = 0), the smaller over the two orders
#   included; a product over answers is a test supermartingale for each l;
# - edge: per sampled answer, k of n tokens beyond the top-k/top-p support's edge; under
#   honesty each token is beyond it with probability at most r0 (calibrated), so
#   e(r) = (r / r0)^k ((1 - r) / (1 - r0))^(n - k) for r > r0 is one too;
# - termination: per answer (greedy or sampled), whether it ended early where the
#   reference does not end; under honesty at most r0 (the calibrated eos_rate) per answer,
#   the same binomial e-value with n = 1. A truncating host stops early on most answers,
#   each only weak evidence on its own (p = r0).
# - alternatives: per sampled answer and per sampler order, the likelihood ratio of each
#   explicit alternative (validator.scoring.alternatives: a hotter or colder temperature,
#   top-p wider, top-k ignored, in either order) to the honest distribution, hedged so that
#   its expectation under honest sampling is at most 1. A host that samples between the
#   two orders (0.25 hotter at top-p 0.5) is explained by one order or the other answer by
#   answer, never by one order throughout: so this process takes, per settings asked, each
#   order's process over all of the host's answers at those settings and the smaller of
#   the two (an honest host serves one settings with one engine, so one sampler order),
#   and multiplies those over the settings.
# Each process is a mixture over its grid (uniform weights) and, as the answers'
# evidence, over the answer at which a deviation began (w_s = 1/(s(s+1))): its log is
# `pooled_log_evidence`. Answers without a record (greedy ones for logprob and edge,
# unscored, older scores) contribute e = 1.

POOLED = ("logprob", "edge", "termination", "alternatives")
# The scorer's grid of l (validator.scoring.verdict.POOLED_LAMBDAS; a test keeps them equal).
POOLED_LAMBDA_GRID = (-1.0, -0.7, -0.5, -0.3, -0.2, -0.1, -0.05, -0.02,
                      0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0)
RATE_MULTIPLES = np.array([2.0, 4.0, 8.0, 16.0, 32.0, 64.0])  # alternative rates r = m * r0
# Gaps (nats beyond the support's edge) of the edge counts (validator.scoring.verdict.EDGE_GAPS;
# a test keeps them equal).
EDGE_GAPS = (0.0, 0.1, 0.25, 0.5, 1.0)
ALTERNATIVE_COUNT = len(ALTERNATIVES)  # explicit alternatives per answer (validator.scoring.alternatives)


def _logprob_log_e(record: Mapping[str, Any]) -> np.ndarray:
    lam = np.asarray(record["lambdas"], dtype=float)
    s = np.asarray(record["s"], dtype=float)[:, None]
    psi = np.asarray(record["psi"], dtype=float)
    if psi.shape != (len(s), len(lam)):
        raise ValueError("psi does not match s and lambdas")
    if "slack" in record:  # per order: the calibrated bias per standard deviation x the steps' spread
        per_order = np.asarray(record["slack"], dtype=float)[:, None]
        if per_order.shape != s.shape or (per_order < 0).any():
            raise ValueError("slack does not match s")
        slack = np.abs(lam) * per_order
    else:  # scores stored with a per-token bias
        slack = np.abs(lam) * float(record.get("bias", 0.0)) * int(record["tokens"])
    return (lam * s - psi - slack).min(axis=0)  # the order that fits best


def _binomial_log_e(n: int, k: int, r0: float) -> np.ndarray:
    """log (r/r0)^k ((1-r)/(1-r0))^(n-k) on the grid of r: k of n trials hit, each at most
    r0 under honesty."""
    if not (0 <= k <= n and 0.0 < r0 < 1.0):
        raise ValueError("counts or rate out of range")
    r = np.minimum(RATE_MULTIPLES * r0, 0.9)
    return k * np.log(r / r0) + (n - k) * (np.log1p(-r) - math.log1p(-r0))


def _edge_counts(edge: Mapping[str, Any]) -> tuple[int, list[int], list[float]]:
    """Sampled tokens, those beyond the edge by more than each of EDGE_GAPS, the honest
    rate at each. A record with one count (scored before the gaps) counts it at every gap."""
    n, beyond, rate = int(edge["tokens"]), edge["beyond"], edge["rate"]
    if not isinstance(beyond, list):
        beyond, rate = [beyond] * len(EDGE_GAPS), [rate] * len(EDGE_GAPS)
    elif list(edge.get("gaps", ())) != list(EDGE_GAPS) or len(beyond) != len(rate):
        raise ValueError("edge counts at other gaps")
    return n, [int(k) for k in beyond], [float(r) for r in rate]


def _edge_log_e(record: Mapping[str, Any]) -> np.ndarray:
    """[gaps x rates]: per gap, k of n tokens beyond the edge by more than it."""
    n, beyond, rate = _edge_counts(record["edge"])
    return np.concatenate([_binomial_log_e(n, k, r) for k, r in zip(beyond, rate)])


def _termination_log_e(record: Mapping[str, Any]) -> np.ndarray:
    term = record["termination"]
    return _binomial_log_e(int(term["answers"]), int(term["violations"]), float(term["rate"]))


_ONE_ANSWER = {"logprob": _logprob_log_e, "edge": _edge_log_e, "termination": _termination_log_e}
_MODES = {"logprob": ("sampled",), "edge": ("sampled",), "termination": ("sampled", "greedy")}


def pooled_log_e(records: Sequence[Mapping[str, Any] | None], kind: str) -> np.ndarray:
    """[grid, answers]: each answer's log e-value per grid point of process `kind`
    (0 where an answer has no record of that kind, or an unreadable one: skipping an
    answer for what it is, not for its evidence, keeps the bound)."""
    size = {"logprob": len(POOLED_LAMBDA_GRID), "edge": len(EDGE_GAPS) * len(RATE_MULTIPLES),
            "termination": len(RATE_MULTIPLES)}[kind]
    out = np.zeros((size, len(records)))
    one = _ONE_ANSWER[kind]
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or rec.get("mode") not in _MODES[kind]:
            continue
        if kind == "logprob" and list(rec.get("lambdas", ())) != list(POOLED_LAMBDA_GRID):
            continue
        try:
            values = one(rec)
        except (KeyError, TypeError, ValueError):
            continue
        if values.shape == (size,) and not np.isnan(values).any():
            out[:, i] = values
    return out


def _alternatives(record: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    alt = record["alternatives"]
    log_e = np.asarray(alt["log_e"], dtype=float)
    if log_e.shape != (2, ALTERNATIVE_COUNT) or not np.isfinite(log_e).all():
        raise ValueError("alternatives do not match the grid")
    return str(alt["settings"]), log_e


def _alternatives_log_evidence(records: Sequence[Mapping[str, Any] | None]) -> np.ndarray:
    """The alternatives process after each answer: per settings asked and per order, the
    change-point mixture of each alternative over the answers at those settings, the
    uniform mixture over the alternatives, the smaller over the orders; summed (a product
    of processes) over the settings, each at its latest answer."""
    groups: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or rec.get("mode") != "sampled" or "alternatives" not in rec:
            continue
        try:
            key, log_e = _alternatives(rec)
        except (KeyError, TypeError, ValueError):
            continue
        at, values = groups.setdefault(key, ([], []))
        at.append(i)
        values.append(log_e)
    total = np.zeros(len(records))
    for at, values in groups.values():
        per_answer = np.stack(values)  # [answers, orders, alternatives]
        curves = [np.logaddexp.reduce(log_evidence(per_answer[:, o, :].T), axis=0) - math.log(ALTERNATIVE_COUNT)
                  for o in range(2)]
        curve = np.minimum(*curves)
        ends = at[1:] + [len(records)]
        for start, stop, value in zip(at, ends, curve):
            total[start:stop] += value
    return total


def pooled_log_evidence(records: Sequence[Mapping[str, Any] | None], kind: str) -> np.ndarray:
    """log of process `kind` after each answer: the change-point mixture per grid point,
    then the uniform mixture over the grid. Ville: P(ever >= 1/alpha) <= alpha."""
    if not len(records):
        return np.zeros(0)
    if kind == "alternatives":
        return _alternatives_log_evidence(records)
    per_grid = log_evidence(pooled_log_e(records, kind))
    return np.logaddexp.reduce(per_grid, axis=0) - math.log(per_grid.shape[0])


def pooled_summary(records: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """What the pooled records say, for a person: the log-prob statistic's z over the
    sampled answers (order fitting best: the larger variance-normalised |S| is not used,
    the smaller is), tokens beyond the edge, greedy tokens off the reference's argmax,
    answers that ended where the reference does not."""
    every_sampled = [r for r in records if isinstance(r, Mapping) and r.get("mode") == "sampled"]
    sampled = [r for r in every_sampled if "var" in r and "s" in r]
    greedy = [r for r in records if isinstance(r, Mapping) and r.get("mode") == "greedy"]
    out: dict[str, Any] = {"sampled_answers": len(sampled), "greedy_answers": len(greedy)}
    ends = [r["termination"] for r in records if isinstance(r, Mapping)
            and isinstance(r.get("termination"), Mapping)]
    if ends:
        out.update({"termination_answers": sum(int(t.get("answers", 0)) for t in ends),
                    "termination_violations": sum(int(t.get("violations", 0)) for t in ends)})
    if sampled:
        s = np.array([r["s"] for r in sampled], dtype=float).sum(0)
        var = np.array([r["var"] for r in sampled], dtype=float).sum(0)
        z = np.where(var > 0, s / np.sqrt(np.maximum(var, 1e-12)), 0.0)
        best = int(np.argmin(np.abs(z)))
        tokens = sum(int(r.get("tokens", 0)) for r in sampled)
        out.update({"statistic_tokens": tokens, "statistic_z": round(float(z[best]), 3),
                    "statistic_per_token": round(float(s[best] / tokens), 5) if tokens else None})
    edge_n, by_gap = 0, np.zeros(len(EDGE_GAPS), dtype=int)
    for r in every_sampled:
        try:
            n, beyond, _ = _edge_counts(r["edge"])
        except (KeyError, TypeError, ValueError):
            continue
        edge_n, by_gap = edge_n + n, by_gap + np.asarray(beyond, dtype=int)
    if edge_n:
        out.update({"edge_tokens": edge_n, "edge_beyond": int(by_gap[0]),
                    "edge_beyond_by_gap": {f"{g:g}": int(k) for g, k in zip(EDGE_GAPS, by_gap)},
                    "edge_share": round(int(by_gap[0]) / edge_n, 5)})

    best = _best_alternative(every_sampled)
    if best is not None:
        out.update({"alternative_best": best[0], "alternative_log_e": best[1], "alternative_settings": best[2]})
    if greedy:
        n = sum(int(r.get("tokens", 0)) for r in greedy)
        k = sum(int(r.get("off_argmax", 0)) for r in greedy)
        out.update({"greedy_tokens": n, "greedy_off_argmax": k,
                    "greedy_off_argmax_share": round(k / n, 5) if n else None})
    return out


def _best_alternative(sampled: Sequence[Mapping[str, Any]]) -> tuple[str, float, str] | None:
    """The explicit alternative that fits the host's answers best, for a person: per
    settings asked, the summed log e-values of each alternative in the order that explains
    the answers better (the smaller best), the largest over the settings."""
    sums: dict[str, np.ndarray] = {}
    for r in sampled:
        try:
            key, log_e = _alternatives(r)
        except (KeyError, TypeError, ValueError):
            continue
        sums[key] = sums.get(key, 0.0) + log_e
    best = None
    for key, total in sums.items():
        o = int(np.argmin(total.max(axis=1)))
        a = int(np.argmax(total[o]))
        if best is None or total[o, a] > best[1]:
            best = (alternative_name(ALTERNATIVES[a]), round(float(total[o, a]), 2), key)
    return best


def evidence_weights(pooled_weight: float) -> dict[str, float]:
    """Mixture weights of the host's evidence: the answers' e-values keep 1 - pooled_weight,
    each pooled process an equal share of pooled_weight (weights summing to 1 keep Ville's
    bound)."""
    return {"answers": 1.0 - pooled_weight, **{k: pooled_weight / len(POOLED) for k in POOLED}}


# ---------------------------------------------------------------- one audit's host verdict
# Evidence from many answers of one host, combined into one verdict.
#
# Fisher's method: under honesty every answer's p-value is uniform or larger (ours are
# conservative), so -2 * sum(ln p) is at most chi-squared with 2n degrees of freedom and
# its tail is a valid p-value for the whole set. The pooled processes above give
# p = 1 / max_n R_n each (Ville). The host's p-value is the weighted Bonferroni
# combination min(p_fisher / w_answers, p_logprob / w_logprob, p_edge / w_edge), with the
# reputation's weights: the same pooled evidence as the daemon's. A host is `dishonest`
# when that p-value is below alpha (default 1e-4: the chance of flagging an honest host
# in one audit), `honest` when it is comfortably large and there are enough answers,
# else `inconclusive`.


@dataclass(frozen=True)
class HostRule:
    alpha: float = 1e-4
    honest_from: float = 1e-2  # combined p-value at or above which a host is called honest
    min_records: int = 3  # fewer answers than this are never enough to call a host honest
    # Share of alpha given to the pooled evidence (as ReputationConfig): 0.05 per process.
    pooled_weight: float = 0.2


def fisher(p_values: Iterable[float]) -> float:
    ps = list(p_values)
    if not ps:
        return 1.0
    if min(ps) <= 0.0:
        return 0.0
    statistic = -2.0 * sum(math.log(min(p, 1.0)) for p in ps)
    return float(stats.chi2.sf(statistic, 2 * len(ps)))


def host_verdict(p_values: list[float], verdicts: list[str], rule: HostRule = HostRule(),
                 pooled: Sequence[Mapping[str, Any] | None] | None = None) -> dict:
    """`pooled`: each answer's pooled record (a score's metrics["pooled"]), in the order
    the answers came; None: the answers' p-values alone."""
    weights = evidence_weights(rule.pooled_weight if pooled is not None else 0.0)
    p_fisher = fisher(p_values)
    parts = {"answers": p_fisher}
    for kind in POOLED if pooled is not None else ():
        log_r = pooled_log_evidence(list(pooled), kind)
        parts[kind] = float(min(1.0, math.exp(-max(0.0, float(log_r.max(initial=0.0))))))
    p = min(1.0, min(v / weights[k] if weights[k] > 0 else math.inf for k, v in parts.items()))
    if p < rule.alpha:
        verdict = "dishonest"
    elif p >= rule.honest_from and len(p_values) >= rule.min_records:
        verdict = "honest"
    else:
        verdict = "inconclusive"
    out = {"verdict": verdict, "records": len(p_values),
           "failed": sum(v == "fail" for v in verdicts), "p_value": p}
    if pooled is not None:
        out["evidence"] = {k: {"p_value": v, "weight": weights[k]} for k, v in parts.items()}
        out["pooled"] = pooled_summary(list(pooled))
    return out


class InvalidTransition(ValueError):
    """An admin call that the state machine does not allow from the current state."""


# --------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Outcome:
    """One probe's result. A transport failure has `error` (a validator.probing.client.Err
    class) and no verdict; an answered probe not scored yet has neither, and one the
    validator could not score has verdict "error" and no p-value: both are answered
    (availability, latency) but carry no honesty evidence."""

    probe_id: str
    at: datetime
    verdict: str | None = None
    p_value: float | None = None
    error: str | None = None
    ttfb_s: float | None = None
    total_s: float | None = None
    bytes: int = 0
    pooled: Mapping[str, Any] | None = None  # the score's pooled record (metrics["pooled"])

    def __post_init__(self) -> None:
        if self.verdict not in (*VERDICTS, None):
            raise ValueError(f"probe {self.probe_id}: verdict {self.verdict!r} is not one of "
                             f"{VERDICTS}")
        if (self.verdict in SCORED_VERDICTS) != (self.p_value is not None):
            raise ValueError(f"probe {self.probe_id}: a p-value comes with a verdict of {SCORED_VERDICTS} "
                             "and only with one")
        if self.p_value is not None and not 0.0 <= self.p_value <= 1.0:
            raise ValueError(f"probe {self.probe_id}: p_value {self.p_value} is not in [0, 1]")
        if self.error is not None and self.verdict is not None:
            raise ValueError(f"probe {self.probe_id}: a transport error ({self.error}) has no verdict")

    @property
    def answered(self) -> bool:
        return self.error is None

    @property
    def scored(self) -> bool:
        return self.p_value is not None


@dataclass(frozen=True)
class ReputationConfig:
    """Every knob, with its default. `from_dict` reads a YAML `reputation:` section."""

    # honesty evidence
    alpha: float = HostRule().alpha  # chance an honest host is ever flagged
    kappa: float = 0.5  # calibrator e = kappa * p^(kappa - 1)
    max_e_per_probe: float = 1000.0  # cap on one probe's e-value
    pooled_weight: float = HostRule().pooled_weight  # share of the evidence mixture for the pooled processes
    trust_after: int = 10  # consecutive passing probes: new -> trusted
    probation_clean: int = 20  # consecutive passing probes since release: probation -> trusted
    # score
    weight_availability: float = 0.5
    weight_latency: float = 0.25
    weight_feedback: float = 0.25
    new_factor: float = 0.5  # honesty factor of a `new` host
    probation_factor: float = 0.5  # honesty factor of a host on probation
    half_life: float = 50.0  # probes, for availability and latency
    window: int = 500  # most recent probes that availability and latency read
    feedback_half_life: float = 20.0  # ratings
    ttfb_target_s: float = 2.0
    ttfb_limit_s: float = 30.0
    throughput_target_bps: float = 100.0  # bytes per second over the whole call
    throughput_limit_bps: float = 5.0

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"reputation: {what}")

        need(0.0 < self.alpha < 1.0, f"alpha must be in (0, 1), got {self.alpha}")
        need(0.0 < self.kappa < 1.0, f"kappa must be in (0, 1), got {self.kappa}")
        need(0.0 <= self.pooled_weight < 1.0, f"pooled_weight must be in [0, 1), got {self.pooled_weight}")
        need(self.max_e_per_probe > 1.0, f"max_e_per_probe must be > 1, got {self.max_e_per_probe}")
        for name in ("trust_after", "probation_clean", "window"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_availability", "weight_latency", "weight_feedback"):
            need(getattr(self, name) >= 0.0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.weight_availability + self.weight_latency + self.weight_feedback > 0,
             "the weights must not all be 0")
        for name in ("new_factor", "probation_factor"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("half_life", "feedback_half_life"):
            need(getattr(self, name) > 0.0, f"{name} must be > 0, got {getattr(self, name)}")
        need(0.0 <= self.ttfb_target_s < self.ttfb_limit_s,
             f"need 0 <= ttfb_target_s < ttfb_limit_s, got {self.ttfb_target_s} and {self.ttfb_limit_s}")
        need(0.0 <= self.throughput_limit_bps < self.throughput_target_bps,
             "need 0 <= throughput_limit_bps < throughput_target_bps, "
             f"got {self.throughput_limit_bps} and {self.throughput_target_bps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ReputationConfig":
        """Build from a mapping such as a YAML `reputation:` section (None: defaults).
        Unknown keys and values of the wrong type raise ValueError naming them."""
        d = dict(d or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"reputation: unknown key(s) {', '.join(unknown)}; "
                             f"known keys: {', '.join(fields)}")
        values = {}
        for key, value in d.items():
            integral = fields[key].type == "int"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    integral and not float(value).is_integer()):
                raise ValueError(f"reputation: {key} must be {'an integer' if integral else 'a number'}, "
                                 f"got {value!r}")
            values[key] = int(value) if integral else float(value)
        return cls(**values)


# --------------------------------------------------------------------------- outputs

@dataclass(frozen=True)
class Standing:
    state: str
    score: float
    components: dict[str, float]  # honesty factor and each component that has data
    evidence: dict[str, Any]  # JSON-ready: the honesty statistic and counts behind the state


@dataclass(frozen=True)
class Transition:
    state_from: str
    state_to: str
    reason: str  # for a person
    evidence: dict[str, Any]  # JSON-ready: what caused it
    at: datetime | None  # the probe that caused it, or the admin's time

    @property
    def restarts_evidence(self) -> bool:
        """True for a release: pass `at` as `since` to later `assess` calls."""
        return self.state_from == "flagged" and self.state_to == "probation"


# --------------------------------------------------------------------------- honesty evidence

def log_e_values(p_values: np.ndarray, config: ReputationConfig) -> np.ndarray:
    """log of each probe's e-value, min(cap, kappa * p^(kappa - 1)); any array shape."""
    p = np.asarray(p_values, dtype=float)
    with np.errstate(divide="ignore"):
        log_e = math.log(config.kappa) + (config.kappa - 1.0) * np.log(p)
    return np.minimum(log_e, math.log(config.max_e_per_probe))


def log_evidence(log_e: np.ndarray) -> np.ndarray:
    """log R_n after each probe n, along the last axis (leading axes: independent hosts).

    R_n = sum_{s<=n} w_s prod_{t=s..n} e_t with w_s = 1/(s(s+1)); with C_n the cumulative
    sum of log e, log R_n = C_n + logsumexp_{s<=n}(log w_s - C_{s-1})."""
    log_e = np.asarray(log_e, dtype=float)
    s = np.arange(1, log_e.shape[-1] + 1)
    log_w = -np.log(s) - np.log1p(s)
    cum = np.cumsum(log_e, axis=-1)
    return cum + np.logaddexp.accumulate(log_w - (cum - log_e), axis=-1)


def _onset(log_e: np.ndarray, n: int) -> int:
    """The start s (0-based) whose term dominates R_n: where the evidence begins."""
    s = np.arange(1, n + 1)
    cum = np.cumsum(log_e[:n])
    return int(np.argmax(-np.log(s) - np.log1p(s) - (cum - log_e[:n])))


def _first_clean_run(scored: Sequence[Outcome], length: int) -> int | None:
    """Index of the probe completing the first run of `length` consecutive passes."""
    run = 0
    for i, o in enumerate(scored):
        run = run + 1 if o.verdict == "pass" else 0
        if run >= length:
            return i
    return None


def _fmt_e(log_e: float) -> str:
    return f"{math.exp(log_e):.2g}" if log_e < 700 else f"10^{log_e / math.log(10):.0f}"


@dataclass(frozen=True)
class _Honesty:
    scored: list[Outcome]  # scored probes in the evidence window, oldest first
    log_e: np.ndarray  # per probe
    log_r: np.ndarray  # log R_n per probe: the weighted mixture of the processes below
    parts: dict[str, np.ndarray]  # log of each process (answers and POOLED) per probe
    weights: dict[str, float]
    threshold: float  # log(1/alpha)
    crossing: int | None  # index of the first probe with log R_n >= threshold

    def summary(self, since: datetime | None) -> dict[str, Any]:
        run = 0
        for o in reversed(self.scored):
            if o.verdict != "pass":
                break
            run += 1
        return {
            "since": since.isoformat() if since else None,
            "probes_scored": len(self.scored),
            "verdicts": {v: sum(o.verdict == v for o in self.scored) for v in SCORED_VERDICTS},
            "log_e": float(self.log_r[-1]) if len(self.scored) else 0.0,
            "log_e_max": float(self.log_r.max()) if len(self.scored) else 0.0,
            "log_threshold": self.threshold,
            "crossed_at_probe": self.scored[self.crossing].probe_id if self.crossing is not None else None,
            "clean_streak": run,
            "processes": {k: {"weight": self.weights[k],
                              "log_e": float(v[-1]) if len(self.scored) else 0.0,
                              "log_e_max": float(v.max()) if len(self.scored) else 0.0}
                          for k, v in self.parts.items()},
            "pooled": pooled_summary([o.pooled for o in self.scored]),
        }

    def flag_evidence(self, alpha: float) -> tuple[str, dict[str, Any]]:
        n = self.crossing + 1
        start = _onset(self.log_e, n)
        window = self.scored[start:n]
        worst = sorted(window, key=lambda o: o.p_value)[:20]
        fails = sum(o.verdict == "fail" for o in window)
        log_r = float(self.log_r[self.crossing])
        at = {k: float(v[self.crossing]) + math.log(self.weights[k]) if self.weights[k] > 0 else -math.inf
              for k, v in self.parts.items()}
        lead = max(at, key=at.get)
        pooled = pooled_summary([o.pooled for o in self.scored[: self.crossing + 1]])
        what = {
            "answers": f"{fails} failed, smallest p-value {worst[0].p_value:.1e} on {worst[0].probe_id}",
            "logprob": f"mostly the pooled log-prob statistic: z={pooled.get('statistic_z', 0):+.1f} over "
                       f"{pooled.get('statistic_tokens', 0)} sampled tokens, "
                       + ("tokens more likely than the requested settings give (colder sampling, or "
                          "top-k/top-p not applied as asked)" if pooled.get("statistic_z", 0) > 0 else
                          "tokens less likely than the requested settings give (hotter sampling, or "
                          "another model)"),
            "edge": f"mostly tokens beyond the top-k/top-p support's edge: {pooled.get('edge_beyond', 0)} of "
                    f"{pooled.get('edge_tokens', 0)} sampled tokens, "
                    f"{pooled.get('edge_beyond_by_gap', {}).get('0.5', 0)} of them by more than 0.5 nats "
                    "(top-k/top-p wider than asked, or ignored)",
            "alternatives": "mostly likelihood ratios against explicit alternative settings: the answers "
                            f"fit '{pooled.get('alternative_best', '?')}' better than the settings asked",
            "termination": f"mostly answers ending where the reference does not end: "
                           f"{pooled.get('termination_violations', 0)} of {pooled.get('termination_answers', 0)} "
                           "answers (cut short)",
        }[lead]
        reason = (f"{len(window)} probe(s) from {window[0].probe_id} to {window[-1].probe_id} "
                  f"({what}) give evidence {_fmt_e(log_r)} against the host, at or above 1/alpha = "
                  f"{1 / alpha:.0e}: an honest host gets this far with probability at most {alpha:.0e}")
        return reason, {"alpha": alpha, "log_e": log_r, "log_threshold": self.threshold,
                        "probes": len(window), "failed": fails, "first_probe": window[0].probe_id,
                        "last_probe": window[-1].probe_id, "leading_process": lead,
                        "processes": {k: float(v[self.crossing]) for k, v in self.parts.items()},
                        "pooled": pooled,
                        "smallest_p_values": {o.probe_id: o.p_value for o in worst}}


def _honesty(outcomes: Sequence[Outcome], since: datetime | None, config: ReputationConfig) -> _Honesty:
    scored = [o for o in outcomes if o.scored and (since is None or o.at >= since)]
    log_e = log_e_values(np.array([o.p_value for o in scored], dtype=float), config)
    weights = evidence_weights(config.pooled_weight)
    parts = {"answers": log_evidence(log_e)}
    for kind in POOLED:
        parts[kind] = pooled_log_evidence([o.pooled for o in scored], kind)
    # log R_n = log sum_k w_k R_n^k: a mixture of test supermartingales is one.
    terms = [v + math.log(weights[k]) for k, v in parts.items() if weights[k] > 0]
    log_r = np.logaddexp.reduce(np.stack(terms), axis=0) if len(scored) else np.zeros(0)
    threshold = math.log(1.0 / config.alpha)
    hits = np.flatnonzero(log_r >= threshold)
    return _Honesty(scored, log_e, log_r, parts, weights, threshold, int(hits[0]) if len(hits) else None)


# --------------------------------------------------------------------------- components

def _decayed_mean(values: Sequence[float | None], half_life: float) -> float | None:
    """Mean of `values` (newest last), value i weighted 2^(-age/half_life); None entries
    age the others but carry no weight. None when nothing has weight."""
    total = weight = 0.0
    for age, v in enumerate(reversed(values)):
        if v is not None:
            w = 2.0 ** (-age / half_life)
            total += w * v
            weight += w
    return total / weight if weight > 0 else None


def _ramp(x: float, zero_at: float, one_at: float) -> float:
    """0 at `zero_at`, 1 at `one_at`, linear between, clipped."""
    return min(1.0, max(0.0, (x - zero_at) / (one_at - zero_at)))


def _latency(o: Outcome, config: ReputationConfig) -> float | None:
    terms = []
    if o.ttfb_s is not None:
        terms.append(_ramp(o.ttfb_s, config.ttfb_limit_s, config.ttfb_target_s))
    if o.total_s is not None and o.total_s > 0:
        terms.append(_ramp(o.bytes / o.total_s, config.throughput_limit_bps, config.throughput_target_bps))
    return sum(terms) / len(terms) if terms else None


def components(outcomes: Sequence[Outcome], feedback: Sequence[float],
               config: ReputationConfig) -> dict[str, float]:
    """availability, latency and feedback, each in [0, 1]; a component without data is absent."""
    recent = [o for o in outcomes if o.error not in VALIDATOR_ERRORS][-config.window:]
    for r in feedback:
        if isinstance(r, bool) or not (isinstance(r, numbers.Real) and 1.0 <= r <= 5.0):
            raise ValueError(f"feedback ratings are 1 to 5, got {r!r}")
    found = {
        "availability": _decayed_mean([float(o.answered) for o in recent], config.half_life),
        "latency": _decayed_mean([_latency(o, config) if o.answered else None for o in recent],
                                 config.half_life),
        "feedback": _decayed_mean([(r - 1.0) / 4.0 for r in feedback], config.feedback_half_life),
    }
    return {k: v for k, v in found.items() if v is not None}


def honesty_factor(state: str, config: ReputationConfig) -> float:
    return {"trusted": 1.0, "new": config.new_factor, "probation": config.probation_factor,
            "flagged": 0.0, "disabled": 0.0}[state]


def combined_score(state: str, parts: Mapping[str, float], config: ReputationConfig) -> float:
    """honesty(state) * weighted mean of the components present (0 when none is)."""
    weights = {"availability": config.weight_availability, "latency": config.weight_latency,
               "feedback": config.weight_feedback}
    total = sum(weights[k] for k in parts)
    if total == 0:
        return 0.0
    return honesty_factor(state, config) * sum(weights[k] * v for k, v in parts.items()) / total


# --------------------------------------------------------------------------- assess

def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; states are {', '.join(STATES)}")


def assess(state: str, outcomes: Sequence[Outcome], feedback: Sequence[float] = (),
           config: ReputationConfig = ReputationConfig(), *,
           since: datetime | None = None) -> tuple[Standing, Transition | None]:
    """The host's standing and the transition `state` takes, if any.

    `outcomes`: the host's probes (sorted here by time, stably). `feedback`: its ratings,
    newest last. `since`: start of the evidence window, the `at` of the host's last
    release (required on probation); availability and latency read all outcomes."""
    _check_state(state)
    if state == "probation" and since is None:
        raise ValueError("a host on probation needs `since`, the time of its release")
    ordered = sorted(outcomes, key=lambda o: o.at)
    honesty = _honesty(ordered, since, config)

    transition = None
    if state in ("new", "trusted", "probation") and honesty.crossing is not None:
        reason, evidence = honesty.flag_evidence(config.alpha)
        transition = Transition(state, "flagged", f"flagged: {reason}", evidence,
                                honesty.scored[honesty.crossing].at)
    elif state in ("new", "probation"):
        needed = config.trust_after if state == "new" else config.probation_clean
        done = _first_clean_run(honesty.scored, needed)
        if done is not None:
            run = honesty.scored[done - needed + 1:done + 1]
            log_r = float(honesty.log_r[done])
            transition = Transition(
                state, "trusted",
                f"trusted: {needed} consecutive probes passed ({run[0].probe_id} to {run[-1].probe_id})"
                f"{' since release' if state == 'probation' else ''}, evidence against the host "
                f"{_fmt_e(log_r)}, below 1/alpha = {1 / config.alpha:.0e}",
                {"consecutive_passes": needed, "first_probe": run[0].probe_id,
                 "last_probe": run[-1].probe_id, "log_e": log_r, "log_threshold": honesty.threshold},
                run[-1].at)

    new_state = transition.state_to if transition else state
    parts = components(ordered, feedback, config)
    standing = Standing(new_state, combined_score(new_state, parts, config),
                        {"honesty": honesty_factor(new_state, config), **parts},
                        honesty.summary(since))
    return standing, transition


# --------------------------------------------------------------------------- admin

def _admin(state: str, to: str, allowed: Sequence[str], verb: str, at: datetime, by: str,
           note: str, reason: str) -> Transition:
    _check_state(state)
    if state not in allowed:
        raise InvalidTransition(f"cannot {verb} a host that is {state} (only from {', '.join(allowed)})")
    return Transition(state, to, f"{reason} by {by}" + (f": {note}" if note else ""),
                      {"by": by, "note": note}, at)


def release(state: str, *, at: datetime, by: str = "admin", note: str = "") -> Transition:
    """flagged -> probation. Restarts the evidence: pass `at` as `since` from now on."""
    return _admin(state, "probation", ("flagged",), "release", at, by, note,
                  "released to probation, evidence restarted")


def disable(state: str, *, at: datetime, by: str = "admin", note: str = "") -> Transition:
    """any state but disabled -> disabled (sticky until `enable`)."""
    return _admin(state, "disabled", [s for s in STATES if s != "disabled"], "disable", at, by, note,
                  "disabled")


def enable(state: str, *, at: datetime, by: str = "admin", note: str = "") -> Transition:
    """disabled -> new. The evidence window is unchanged: old evidence still counts."""
    return _admin(state, "new", ("disabled",), "enable", at, by, note, "enabled as new")
