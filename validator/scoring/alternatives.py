"""Explicit alternatives: the sampler settings a host that bends the request might use.

A host that samples a little hotter than asked, or with top-p a little wider, can sit
between the two honest sampler orders (validator.models.sampling.ORDERS): each of its
answers is explained by one order or the other, so per-answer evidence and a statistic
that takes the better order per answer see nothing (at top-p 0.5 the orders keep quite
different tokens). A likelihood ratio against an explicit alternative does see it: under
the host's own distribution p the ratio p / q grows by KL(p || q) per token against
either order q.

Per answer and per honest order o, for each alternative a (ALTERNATIVES: temperature
offsets, top-p widened, top-k ignored in either order; top-k and top-p ignored), the
scorer sums over the sampled tokens the log of a per-token e-value:

    beyond o's support edge by more than EDGE_GAP nats:  M / r0
    otherwise:  (1 - M) / (1 - r0) * ((1 - EPS) * p_a(token | not beyond) / q_o(token) + EPS)

where r0 is the calibrated honest rate of tokens beyond the edge by that much
(Tolerances.edge_rate), m the alternative's mass beyond it at that step and M = max(m, r0).
Under honest sampling from q_o, with tokens beyond the edge at most r0 of the time, each
factor has expectation at most 1 (docs/methodology.md, "Explicit alternatives"). EPS keeps
a token the alternative cannot produce from zeroing the ratio. A token within EDGE_GAP
of the edge (honest rounding) is scored at the edge's log-prob, as the log-prob statistic
does. validator.reputation pools these per host.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from validator.models.sampling import ALTERNATIVES, ORDERS, Settings, alternative_settings

EDGE_GAP = 0.25  # nats beyond an order's support edge that count as beyond it (one of verdict.EDGE_GAPS)
EPS = 0.05  # share of the null mixed into each alternative
# An alternative keeps at most a head of the most likely tokens (any alternative gives a
# valid e-value, so restricting it costs only power in a tail samplers rarely reach):
# each row is reduced over its sorted head of HEADS[0] tokens, widened to HEADS[1] where a
# top-p alternative's kept prefix reaches the head's end. An alternative without top-p
# keeps the row's head (its top-k of it).
HEADS = (256, 4096)


def alternative_stats(logp: torch.Tensor, asked: Settings, null_edge: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per step and alternative: `alt_boundary` [S, A] the log-prob (temperature 1) of the
    least likely token it keeps (+inf where it does not apply), `alt_log_z` [S, A] the
    logsumexp of logp / T over its kept tokens, `alt_beyond` [S, A, 2] its mass beyond each
    order's edge (`null_edge` [S, 2], the asked settings' boundaries) by more than EDGE_GAP.
    `logp`: log-softmax rows (temperature 1)."""
    steps, vocab = logp.shape
    count = len(ALTERNATIVES)
    out = {"alt_boundary": torch.full((steps, count), math.inf, dtype=logp.dtype, device=logp.device),
           "alt_log_z": torch.zeros((steps, count), dtype=logp.dtype, device=logp.device),
           "alt_beyond": torch.zeros((steps, count, 2), dtype=logp.dtype, device=logp.device)}
    bent = [(a, alternative_settings(alt, asked), ORDERS.index(alt[0])) for a, alt in enumerate(ALTERNATIVES)]
    bent = [(a, s, order) for a, s, order in bent if s is not None]
    rows = torch.arange(steps, device=logp.device)
    part = logp  # the rows being reduced (all, then those whose head is widened)
    for i, width in enumerate(HEADS):
        width = min(width, vocab)
        last = i == len(HEADS) - 1 or width == vocab
        head = torch.topk(part, width, dim=-1).values
        widen = torch.zeros(len(rows), dtype=torch.bool, device=logp.device)
        far = null_edge[rows] - EDGE_GAP
        whole: dict[float, torch.Tensor] = {}  # logsumexp of logp x scale over the vocabulary
        for a, s, order in bent:
            norm = None
            if s.top_p < 1.0 and not 0 < s.top_k < vocab:  # top-p sees the whole vocabulary's mass
                scale = 1.0 / s.temperature if order == 0 else 1.0
                if scale not in whole:
                    whole[scale] = (torch.zeros(len(rows), dtype=logp.dtype, device=logp.device) if scale == 1.0
                                    else torch.logsumexp(part * scale, dim=-1))
                norm = whole[scale]
            b, lz, beyond, full = _one(head, s, order, far, norm)
            out["alt_boundary"][rows, a] = b
            out["alt_log_z"][rows, a] = lz
            out["alt_beyond"][rows, a] = beyond
            if not last:
                widen |= full
        if last or not bool(widen.any()):
            break
        rows, part = rows[widen], part[widen]
    out["alt_beyond"].clamp_(0.0, 1.0)
    return out


def _one(head: torch.Tensor, s: Settings, order: int, far: torch.Tensor, norm: torch.Tensor | None):
    """One alternative over sorted heads [R, W]: its boundary, log normaliser at 1/T, mass
    beyond each order's edge (`far` [R, 2]: the edges less EDGE_GAP), and whether its
    kept prefix reached the head's end (a wider head could keep more). `norm`: the mass
    top-p is measured against (log, at the order's scale) where it reaches past the head."""
    width = head.shape[1]
    cap = min(s.top_k, width) if s.top_k > 0 else width
    t = head[:, :cap]
    n = torch.full((len(head),), cap, dtype=torch.long, device=head.device)
    if s.top_p < 1.0:
        scale = 1.0 / s.temperature if order == 0 else 1.0
        probs = torch.softmax(t * scale, dim=-1) if norm is None else torch.exp(t * scale - norm[:, None])
        n = ((torch.cumsum(probs, -1) - probs) < s.top_p).sum(-1).clamp(min=1)
    cols = torch.arange(cap, device=head.device)
    scaled = torch.where(cols[None, :] < n[:, None], t / s.temperature, torch.full_like(t, -math.inf))
    lz = torch.logsumexp(scaled, dim=-1)
    beyond = torch.stack([torch.exp(torch.logsumexp(
        torch.where(t < far[:, o : o + 1], scaled, torch.full_like(t, -math.inf)), dim=-1) - lz) for o in range(2)], -1)
    full = (n >= width) & ((s.top_k <= 0) | (s.top_k > width)) & (s.top_p < 1.0)
    return t.gather(1, (n - 1)[:, None]).squeeze(1), lz, beyond, full


def answer_log_e(token_logp: np.ndarray, asked: Settings, null_edge: np.ndarray, null_log_z: np.ndarray,
                 alt_boundary: np.ndarray, alt_log_z: np.ndarray, alt_beyond: np.ndarray,
                 r0: float) -> np.ndarray:
    """[2, A]: per honest order and alternative, the log e-value of one answer's sampled
    tokens (the steps given: token_logp [S] at temperature 1, null_edge/null_log_z [S, 2]
    the asked settings' boundaries and normalisers, the alternative features [S, A(, 2)]).
    0 where an alternative does not apply."""
    out = np.zeros((2, len(ALTERNATIVES)))
    if not len(token_logp):
        return out
    temps = np.array([s.temperature if s is not None else 1.0
                      for s in (alternative_settings(a, asked) for a in ALTERNATIVES)])
    applies = np.isfinite(alt_boundary[0]) if len(alt_boundary) else np.zeros(len(ALTERNATIVES), bool)
    tok = token_logp[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lp_alt = np.where(tok >= alt_boundary, tok / temps[None, :] - alt_log_z, -np.inf)  # [S, A]
        for o in range(2):
            edge = null_edge[:, o : o + 1]
            lq = np.maximum(tok, edge) / asked.temperature - null_log_z[:, o : o + 1]
            m = np.clip(alt_beyond[:, :, o], 0.0, 1.0 - 1e-9)
            big = np.maximum(m, r0)
            ratio = np.exp(np.minimum(lp_alt - np.log1p(-m) - lq, 50.0))
            inside = np.log1p(-big) - math.log1p(-r0) + np.log((1 - EPS) * ratio + EPS)
            step = np.where(tok < edge - EDGE_GAP, np.log(big / r0), inside)
            out[o] = np.where(applies, step.sum(0), 0.0)
    return out
