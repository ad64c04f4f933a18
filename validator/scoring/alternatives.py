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
from typing import Sequence

import numpy as np
import torch

from validator.models.sampling import ALTERNATIVES, ORDERS, Settings, alternative_settings, alternative_name

EDGE_GAP = 0.25  # nats beyond an order's support edge that count as beyond it (one of verdict.EDGE_GAPS)
EPS = 0.05  # share of the null mixed into each alternative
_TOPK_FAST = 4096  # kept prefixes almost always fit; rows that reach it are redone in full


def alternative_stats(logp: torch.Tensor, asked: Settings, null_edge: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per step and alternative: `alt_boundary` [S, A] the log-prob (temperature 1) of the
    least likely token it keeps (+inf where it does not apply), `alt_log_z` [S, A] the
    logsumexp of logp / T over its kept tokens, `alt_beyond` [S, A, 2] its mass beyond each
    order's edge (`null_edge` [S, 2], the asked settings' boundaries) by more than EDGE_GAP."""
    steps, vocab = logp.shape
    k = min(vocab, _TOPK_FAST)
    top = torch.topk(logp, k, dim=-1).values
    cols = torch.arange(k, device=logp.device)
    far = null_edge - EDGE_GAP  # [S, 2]
    count = len(ALTERNATIVES)
    boundary = torch.full((steps, count), math.inf, dtype=logp.dtype, device=logp.device)
    log_z = torch.zeros((steps, count), dtype=logp.dtype, device=logp.device)
    beyond = torch.zeros((steps, count, 2), dtype=logp.dtype, device=logp.device)
    for a, alt in enumerate(ALTERNATIVES):
        s = alternative_settings(alt, asked)
        if s is None:
            continue
        order = ORDERS.index(alt[0])
        cap = s.top_k if 0 < s.top_k < vocab else vocab
        if s.top_p >= 1.0:  # kept: the top-k (or everything); no sort beyond it needed
            kept_logp = top[:, :cap] if cap <= k else logp
            lz = torch.logsumexp(kept_logp / s.temperature, dim=-1)
            boundary[:, a] = kept_logp.min(dim=-1).values
        else:
            lz, b, kept_logp = _top_p_support(logp, top, cols, s, order, cap)
            boundary[:, a] = b
        log_z[:, a] = lz
        q = torch.exp(kept_logp / s.temperature - lz[:, None])
        q = torch.where(torch.isfinite(kept_logp), q, torch.zeros_like(q))
        for o in range(2):
            beyond[:, a, o] = torch.where(kept_logp < far[:, o : o + 1], q, torch.zeros_like(q)).sum(-1)
    return {"alt_boundary": boundary, "alt_log_z": log_z, "alt_beyond": beyond.clamp(0.0, 1.0)}


def _top_p_support(logp, top, cols, s: Settings, order: int, cap: int):
    """The kept prefix of one top-p alternative: its log normaliser at 1/T, its boundary,
    and the kept log-probs ([S, width], -inf past the prefix)."""
    scale = 1.0 / s.temperature if order == 0 else 1.0
    source = logp if cap >= logp.shape[-1] else top[:, :cap]
    norm = torch.logsumexp(source * scale, dim=-1, keepdim=True)
    width = min(cap, top.shape[1])
    head = top[:, :width]
    probs = torch.exp(head * scale - norm)
    n = ((torch.cumsum(probs, -1) - probs) < s.top_p).sum(-1).clamp(min=1)
    if bool((n >= width).any()) and width < cap:  # the prefix reaches the fast cut: sort it all
        head = torch.topk(logp, cap, dim=-1).values
        probs = torch.exp(head * scale - norm)
        n = ((torch.cumsum(probs, -1) - probs) < s.top_p).sum(-1).clamp(min=1)
        cols = torch.arange(cap, device=logp.device)
    else:
        cols = cols[:width]
    kept = torch.where(cols[None, :] < n[:, None], head, torch.full_like(head, -math.inf))
    lz = torch.logsumexp(kept / s.temperature, dim=-1)
    return lz, head.gather(1, (n - 1)[:, None]).squeeze(1), kept


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


def describe(log_e: Sequence[float]) -> str:
    """The alternative that fits best, for a person."""
    return alternative_name(ALTERNATIVES[int(np.argmax(log_e))])
