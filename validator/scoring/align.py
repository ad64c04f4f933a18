"""Align a host's text to the reference's tokens.

The host returns text; the same text has many token segmentations, and re-tokenising
it canonically is not what an engine generated (docs/methodology.md: an honest token
looked 8.7 nats off that way). We start from the canonical segmentation, score it with one
batched forward pass, and walk it: wherever another token that also matches the text
is clearly more likely under the reference (under the warped distribution for sampled
settings), we propose the alternative path (that token, then the canonical rest),
score it, and keep whichever path explains the rest of the text better. Proposals
from all answers in a batch are scored together, so the work is one forward pass per
answer plus one per real ambiguity. Whitespace an API stripped at either end is
allowed back as "implied" tokens that cover no text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from validator.scoring.reference import Past, ReferenceModel, StepFeatures
from validator.models.sampling import Settings

OUTSIDE_SUPPORT_PENALTY = 30.0  # nats; keeps out-of-support tokens ordered but unattractive
BRANCH_MARGIN = 0.05  # nats; below this an alternative is a tie, not worth a pass
MAX_BRANCHES = 12  # per answer: bounds the work a hostile answer can cause
MAX_IMPLIED = 2  # stripped whitespace tokens allowed at each end
TROUBLE_GAP = 0.5  # nats off the best (greedy) or the support (sampled): re-examine the last steps
LOOK_BACK = 3  # steps re-examined before a suspicious token
# Segmentation artefacts in honest answers are rare and a proposal fixes them; in an
# answer full of suspicious tokens proposals keep losing (the tokens are evidence, not
# artefacts), so proposing stops after a few losses.
MAX_REJECTED = 2
MAX_TROUBLED = 6  # an honest answer showed 4 artefact tokens in 62; cheats show 20-60%
TROUBLED_SHARE = 0.2


@dataclass
class AlignItem:
    prompt: list[int]
    text: str
    settings: Settings
    allow_stripped_whitespace: bool = True
    support_tolerance: float = 1.0  # nats, for the warped measure; from calibration


@dataclass
class Path:
    tokens: list[int]
    ends: list[int]  # bytes of the text covered after each token
    cands: list[list[int]]  # per step; cands[i][0] is tokens[i]; last step: EOS ids first
    feats: StepFeatures | None = None
    # (feats, measure of every candidate [steps, columns], suspicious steps [tokens]) for
    # the walk, computed once per pass instead of once per step (see Aligner._views)
    views: tuple | None = None


@dataclass
class Alignment:
    tokens: list[int]
    ends: list[int]
    implied: list[bool]
    feats: StepFeatures
    eos_columns: int  # the first this many candidates of the last step are EOS ids
    branches: int
    passes: int
    text_bytes: bytes = b""

    @property
    def token_logp(self) -> np.ndarray:
        return self.feats.cand_logp[: len(self.tokens), 0]

    @property
    def eos_logp(self) -> float:
        return float(self.feats.cand_logp[len(self.tokens), : self.eos_columns].max())


@dataclass
class _State:
    item: AlignItem
    data: bytes
    path: Path
    step: int = 0
    branches: int = 0
    passes: int = 0
    pending: Path | None = None
    pending_step: int = 0
    pending_refilled: bool = False  # the pending proposal is a refill of one that lost (_refill)
    compare: tuple[int, int] = (0, 0)
    tried: set = field(default_factory=set)
    rejected: int = 0
    reject_budget: int = 0
    done: bool = False
    lead_implied: int = 0
    past: Past | None = None  # keys and values of prompt + path, while proposals may come
    complete_from: int = 0  # > 0: the path's features stop here; the next pass adds the rest
    memo: dict = field(default_factory=dict)  # candidates by position, see _make_path


def measure(feats: StepFeatures, step: int | slice, columns: slice, settings: Settings,
            tolerance: float) -> np.ndarray:
    """How attractive each candidate is at a step (or, for a slice of steps, at each of
    them: [steps, columns]): the log-prob at temperature 1 for greedy settings; for
    sampled settings the log-prob under the warped distribution, the better of the two
    orders, with tokens just outside the support clipped to its edge and tokens far
    outside penalised."""
    logp = feats.cand_logp[step, columns]
    if settings.greedy:
        return logp
    best = np.full(logp.shape, -np.inf)
    for o in range(2):
        edge = feats.boundary[step, o, None]  # [1] for one step, [steps, 1] for a slice
        clipped = np.maximum(logp, edge) if tolerance > 0 else logp
        logq = np.where(logp >= edge - tolerance,
                        clipped / settings.temperature - feats.log_z[step, o, None], -np.inf)
        best = np.maximum(best, logq)
    return np.where(np.isfinite(best), best, logp - OUTSIDE_SUPPORT_PENALTY)


def troubled(feats: StepFeatures, steps: slice, settings: Settings) -> np.ndarray:
    """Tokens the reference finds suspicious (greedy: well below its choice; sampled: well
    outside the support, as at the edge is normal): maybe an earlier segmentation choice
    (locally best, globally wrong) put them there."""
    logp = feats.cand_logp[steps, 0]
    if settings.greedy:
        return feats.max_logp[steps] - logp > TROUBLE_GAP
    return logp < feats.boundary[steps].min(axis=-1) - TROUBLE_GAP


class Aligner:
    def __init__(self, ref: ReferenceModel):
        self.ref = ref
        self.table = ref.table

    def align(self, items: Sequence[AlignItem]) -> list[Alignment]:
        states = []
        for item in items:
            data = item.text.encode("utf-8", errors="surrogatepass")
            memo: dict = {}
            path = self._make_path(item, data, [], [], self._canonical(data, item.settings.greedy), memo)
            states.append(_State(item=item, data=data, path=path, memo=memo))
        need = list(states)
        # The first pass starts from each shared prompt's keys and values, computed once.
        given = self.ref.prefill([s.item.prompt for s in states])
        while need:
            feats, pasts = self.ref.score_paths([self._request(s) for s in need], pasts=given, keep_past=True)
            for s, f, past in zip(need, feats, pasts):
                s.passes += 1
                if s.pending is not None:
                    s.pending.feats = s.path.feats.spliced(s.pending_step, f)
                    self._resolve(s, past)
                elif s.complete_from:
                    s.path.feats = s.path.feats.spliced(s.complete_from, f)
                    s.past, s.complete_from = past, 0
                else:
                    s.path.feats = f
                    s.past = past
                    # Far more suspicious tokens than segmentation artefacts ever explain:
                    # the answer is off, and re-segmenting it would only cost passes.
                    count = int(self._views(s)[1].sum())
                    s.done = count > max(MAX_TROUBLED, TROUBLED_SHARE * len(s.path.tokens))
                    # One or two suspicious tokens look like an artefact: try harder there.
                    s.reject_budget = MAX_REJECTED + 3 if count <= 2 else MAX_REJECTED
            need = []
            for s in states:
                if not s.done and not s.complete_from and s.pending is None:
                    self._walk(s)
                if s.pending is not None or s.complete_from:
                    need.append(s)
                else:
                    s.past = None  # free what no proposal needs
            given = [self._request_past(s) for s in need]

        return [self._result(s) for s in states]

    @staticmethod
    def _request(s: _State) -> tuple:
        """What the next pass computes for a state. A proposal shares the current path's
        steps before the branch point and is compared only up to where the two paths
        rejoin, so the pass computes just that stretch; a kept proposal's later steps come
        in the next pass (most proposals lose, and their tails would be wasted)."""
        if s.pending is not None:
            stop = s.compare[0]
            return (s.item.prompt, s.pending.tokens[: stop - 1], s.pending.cands[:stop],
                    s.item.settings, s.pending_step)
        return (s.item.prompt, s.path.tokens, s.path.cands, s.item.settings, s.complete_from)

    @staticmethod
    def _request_past(s: _State) -> Past | None:
        """The positions before the one that predicts the first requested step are the
        current path's (prompt + shared prefix): their keys and values are reused."""
        if s.past is None or (s.pending is None and not s.complete_from):
            return None
        first = s.pending_step if s.pending is not None else s.complete_from
        return s.past.upto(len(s.item.prompt) - 1 + first)

    # -- paths -----------------------------------------------------------------------
    def _canonical(self, data: bytes, merge_runs: bool) -> list[int]:
        """The tokenizer's own segmentation when it reproduces the bytes, else the
        fewest-tokens segmentation (for text that starts mid-character, say)."""
        try:
            text = data.decode("utf-8")
            ids = self.ref.canonical_ids(text)
            if b"".join(self.table.bytes[t] for t in ids) == data:
                return self._merge_whitespace_runs(ids) if merge_runs else ids
        except UnicodeDecodeError:
            pass
        return self.table.segment(data) or []

    def _merge_whitespace_runs(self, ids: list[int]) -> list[int]:
        """Models emit runs of whitespace ("\n\n") as one token where the tokenizer
        writes several; greedy settings start from the fewest tokens for each run (the
        commonest segmentation artefact in honest answers, measured on the calibration
        set; a likelier split is proposed by the walk). Sampled settings start split
        and propose the merge (_likelier_merged_run): a merged start hid the runs a
        sampling model had split, as no token there looks suspicious."""
        out: list[int] = []
        run: list[int] = []
        for t in ids + [-1]:
            if t >= 0 and self.table.bytes[t] and not self.table.bytes[t].strip():
                run.append(t)
                continue
            if len(run) > 1:
                out += self.table.segment(b"".join(self.table.bytes[x] for x in run)) or run
            else:
                out += run
            run = []
            if t >= 0:
                out.append(t)
        return out

    def _make_path(self, item: AlignItem, data: bytes, tokens: list[int], ends: list[int],
                   rest: list[int], memo: dict, head: list[list[int]] = (), tail: list[list[int]] = ()) -> Path:
        """memo: the answer's candidates by (byte position, leading whitespace allowed);
        a proposal shares most positions with the path it changes, and it passes that
        path's candidate lists for its first len(head) steps and last len(tail) token
        steps (the same tokens at the same bytes; a tail only where text precedes it, as
        the leading whitespace allowed at byte 0 depends on the steps before)."""
        tokens = list(tokens)
        ends = list(ends)
        pos = ends[-1] if ends else 0
        for t in rest:
            pos += len(self.table.bytes[t])
            tokens.append(t)
            ends.append(pos)
        cands: list[list[int]] = list(head)
        strip = item.allow_stripped_whitespace
        leading = ends[: len(head)].count(0)
        prev = ends[len(head) - 1] if head else 0
        for i in range(len(head), len(tokens) - len(tail)):
            t = tokens[i]
            lead = strip and prev == 0 and leading < MAX_IMPLIED
            found = memo.get((prev, lead))
            if found is None:
                found = memo[prev, lead] = [c.token for c in self.table.candidates(data, prev, lead=lead, trail=strip)]
            cands.append([t] + [c for c in found if c != t])
            if ends[i] == 0:
                leading += 1
            prev = ends[i]
        cands += tail
        prev = ends[-1] if ends else 0
        trailing = 0  # tokens that cover nothing after the text's last byte
        for i in range(len(tokens) - 1, -1, -1):
            if ends[i] != len(data) or (i and ends[i - 1] != len(data)):
                break
            trailing += 1
        last = list(self.table.eos_ids)
        if strip and trailing < MAX_IMPLIED and prev == len(data):
            last += self.table.whitespace
        cands.append(last)
        return Path(tokens, ends, cands)

    # -- the walk --------------------------------------------------------------------
    @staticmethod
    def _views(s: _State) -> tuple[np.ndarray, np.ndarray]:
        """The current path's measure of every candidate at every step, and its suspicious
        tokens: array operations once per pass rather than once per step (the aligner's
        Python is a large share of a GPU's scoring time)."""
        path, item = s.path, s.item
        if path.views is None or path.views[0] is not path.feats:
            everything = slice(None)
            path.views = (path.feats,
                          measure(path.feats, everything, everything, item.settings, item.support_tolerance),
                          troubled(path.feats, slice(0, len(path.tokens)), item.settings))
        return path.views[1], path.views[2]

    def _walk(self, s: _State) -> None:
        path, item = s.path, s.item
        measured, suspicious = self._views(s)
        while s.step <= len(path.tokens):
            i = s.step
            cands = path.cands[i]
            if s.branches >= MAX_BRANCHES or s.rejected >= s.reject_budget:
                break
            m = measured[i, : len(cands)]
            if i < len(path.tokens):
                # Greedy: the host emitted its argmax, so a clearly likelier token that also
                # matches the text is probably what it emitted. Sampled: a likelier token
                # proves nothing (measured: 148 of 155 such proposals lost), so only a
                # suspicious token sends us looking back.
                best = int(np.argmax(m))
                if (item.settings.greedy and best != 0 and m[best] > m[0] + BRANCH_MARGIN
                        and self._untried(s, i, cands[best])):
                    self._propose(s, i, cands[best])
                    return
                merged = None if item.settings.greedy else self._likelier_merged_run(s, i, measured)
                if merged is not None:
                    self._propose(s, i, merged)
                    return
                if suspicious[i] and self._look_back(s, i, measured):
                    return
            elif not item.settings.length_stop(len(path.tokens)):
                # An early stop: is whitespace the API stripped more likely than ending?
                n_eos = len(self.table.eos_ids)
                if len(cands) > n_eos:
                    best = n_eos + int(np.argmax(m[n_eos:]))
                    if m[best] > m[:n_eos].max() + BRANCH_MARGIN:
                        self._propose(s, i, cands[best])
                        return
            s.step += 1
        s.done = True

    def _likelier_merged_run(self, s: _State, i: int, measured: np.ndarray) -> int | None:
        """Sampled settings start a whitespace run split, as the tokenizer writes it, and
        a sampling model emits both "\n\n" and "\n" + "\n". This pass already holds both
        sides: the merged token's probability at step i and the pair's at steps i and
        i + 1. Returns the merged token if it is the likelier (and untried), so the
        proposal costs a pass only where the evidence favours it."""
        path, table = s.path, self.table
        if i + 1 >= len(path.tokens):
            return None
        start = path.ends[i - 1] if i else 0
        if not start < path.ends[i] < path.ends[i + 1]:  # an implied token: no text to merge
            return None
        a, b = table.bytes[path.tokens[i]], table.bytes[path.tokens[i + 1]]
        if a.strip() or b.strip():
            return None
        m = measured[i]
        pair = m[0] + measured[i + 1, 0]
        for t in table.exact.get(a + b, ()):
            if t in path.cands[i] and m[path.cands[i].index(t)] > pair + BRANCH_MARGIN and self._untried(s, i, t):
                return t
        return None

    def _untried(self, s: _State, i: int, token: int) -> bool:
        key = (s.path.ends[i - 1] if i else 0, token)
        if key in s.tried:
            return False
        s.tried.add(key)
        return True

    def _look_back(self, s: _State, i: int, measured: np.ndarray) -> bool:
        """Propose, at one of the last few steps up to i, the most likely token that ends
        on another byte than the current one (a different segmentation there)."""
        path = s.path
        best = None
        for k in range(max(0, i - LOOK_BACK), i + 1):
            start = path.ends[k - 1] if k else 0
            cands = path.cands[k]
            m = measured[k, : len(cands)]
            for c in np.argsort(-m[1:]) + 1:
                token = cands[int(c)]
                if start + self._covered(s.data, start, token) == path.ends[k]:
                    continue
                if (start, token) in s.tried:
                    continue
                gain = float(m[c] - m[0])
                if best is None or gain > best[0]:
                    best = (gain, k, token)
                break
        if best is None:
            return False
        _, k, token = best
        self._untried(s, k, token)
        self._propose(s, k, token)
        return True

    def _covered(self, data: bytes, start: int, token: int) -> int:
        """Bytes of the text a candidate token covers at `start`."""
        tb = self.table.bytes[token]
        if data.startswith(tb, start):
            return len(tb)
        if start == 0 and tb.lstrip() and data.startswith(tb.lstrip(), 0):
            return len(tb.lstrip())
        if data[start:] and tb.rstrip() == data[start:]:
            return len(data) - start
        return 0  # pure whitespace the API stripped

    def _propose(self, s: _State, i: int, token: int, then: Sequence[int] = ()) -> None:
        """The path with `token` (and the tokens `then`) from step i, rejoining the
        current path at its next token boundary, so the two differ only locally and later
        steps keep their own walk."""
        path = s.path
        start = path.ends[i - 1] if i else 0
        covered = self._covered(s.data, start, token)
        new_end = start + covered + sum(len(self.table.bytes[t]) for t in then)
        if covered == 0:
            fill, rejoin = [], i  # the current path resumes right after the new token
        else:
            rejoin = next(j for j in range(i, len(path.tokens)) if path.ends[j] >= new_end) + 1
            greedy = s.item.settings.greedy
            fill = list(then) + self._canonical(s.data[new_end : path.ends[rejoin - 1]], greedy)
            if new_end < path.ends[rejoin - 1] and rejoin < len(path.tokens):
                # The new token splits one of the path's: the piece it leaves is a word's
                # fragment, which the tokenizer joins to what follows (" al" + "gunas" is
                # "gun" + "as", not "g" + "unas"). Re-segment through the next token when
                # that differs from keeping the old boundary.
                joined = list(then) + self._canonical(s.data[new_end : path.ends[rejoin]], greedy)
                if joined != fill + [path.tokens[rejoin]]:
                    fill, rejoin = joined, rejoin + 1
        tokens = path.tokens[:i] + [token]
        ends = path.ends[:i] + [new_end]
        tail = path.cands[rejoin : len(path.tokens)] if rejoin and path.ends[rejoin - 1] else []
        s.pending = self._make_path(s.item, s.data, tokens, ends, fill + path.tokens[rejoin:], s.memo,
                                    head=path.cands[:i], tail=tail)
        s.pending_step = i
        s.pending_refilled = bool(then)
        # Compare the two paths up to and including the first token after they rejoin.
        s.compare = (i + 1 + len(fill) + 1, rejoin + 1)
        s.branches += 1

    def _resolve(self, s: _State, past: Past | None) -> None:
        """Keep the path that explains the differing stretch of text at lower cost."""
        i = s.pending_step
        new_stop, old_stop = s.compare
        if self._cost(s.pending, i, new_stop, s.item) < self._cost(s.path, i, old_stop, s.item):
            s.path, s.past = s.pending, past
            if new_stop <= len(s.path.tokens):
                s.complete_from = new_stop  # its steps from here on come in the next pass
        elif self._refill(s):
            return  # the same proposal with another fill is pending
        else:
            s.rejected += 1
        s.pending = None
        s.step = i  # look at this step again: another untried alternative may fit better

    def _refill(self, s: _State) -> bool:
        """A proposal that splits a word fills the rest of it as the tokenizer would,
        which is not always what the engine emitted (" un" + "at" + "table" where the
        tokenizer writes " un" + "att" + "able"): when the proposal lost on a suspicious
        token of its own fill, propose it once more with that token's likeliest
        alternative that ends elsewhere, if the reference finds it likelier."""
        p, i, item = s.pending, s.pending_step, s.item
        stop = s.compare[0] - 1  # the fill's steps are i + 1 .. stop - 1
        if s.pending_refilled or s.branches >= MAX_BRANCHES or stop <= i + 1:
            return False
        steps = slice(i + 1, stop)
        measured = measure(p.feats, steps, slice(None), item.settings, item.support_tolerance)
        for j in np.flatnonzero(troubled(p.feats, steps, item.settings)) + i + 1:
            start = p.ends[j - 1]
            m = measured[j - i - 1, : len(p.cands[j])]
            for c in np.argsort(-m[1:]) + 1:
                if m[c] <= m[0] + BRANCH_MARGIN:
                    break
                tb = self.table.bytes[p.cands[j][c]]
                if tb and s.data.startswith(tb, start) and start + len(tb) != p.ends[j]:
                    self._propose(s, i, p.tokens[i], then=p.tokens[i + 1 : j] + [p.cands[j][c]])
                    return True
            return False  # only the first suspicious token of the fill
        return False

    def _cost(self, path: Path, start: int, stop: int, item: AlignItem) -> float:
        """Cost of steps [start, stop) of a path; step len(tokens) is the stop itself."""
        feats = path.feats
        total = 0.0
        n = len(path.tokens)
        # After an answer cut by max_tokens nothing is expected, so its end is not scored.
        last = n if item.settings.length_stop(n) else n + 1
        for i in range(start, min(stop, last)):
            cols = slice(0, 1) if i < n else slice(0, len(self.table.eos_ids))
            m = measure(feats, i, cols, item.settings, item.support_tolerance).max()
            total += (feats.max_logp[i] - m) if item.settings.greedy else -m
        return float(total)

    def _result(self, s: _State) -> Alignment:
        p = s.path
        implied = [(p.ends[i] == (p.ends[i - 1] if i else 0)) for i in range(len(p.tokens))]
        return Alignment(tokens=p.tokens, ends=p.ends, implied=implied, feats=p.feats,
                         eos_columns=len(self.table.eos_ids), branches=s.branches,
                         passes=s.passes, text_bytes=s.data)
