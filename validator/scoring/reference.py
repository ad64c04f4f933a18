"""The reference model: the claimed model, recomputed on the validator's own hardware.

Two jobs: teacher-forced scoring (one batched forward pass over prompt + answer tokens,
reduced on the device to the few numbers per step the aligner and the tests need, so a
262k-entry vocabulary never leaves the GPU) and a fixed-seed re-run of each probe.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from validator.models.checkpoints import Budgets, derive_budgets, kv_bytes_per_token, load_model
from validator.models.registry import ModelSpec
from validator.models.sampling import Settings, kept_prefix_sizes, order_scales, sample_next
from validator.scoring.alternatives import alternative_stats
from validator.scoring.tokens import TokenTable

log = logging.getLogger(__name__)

# lambda grid for the Chernoff bounds on the sampled log-prob statistic (scoring.py)
LAMBDAS_LOW = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
LAMBDAS_HIGH = np.array([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0])
_STEP_SLICE = 256  # steps reduced at once on a CPU; a GPU takes more (step_slice)
_TOPK_FAST = 4096  # top-p supports almost always fit in this many tokens; checked per row
# A pass computes every row to its longest row's length: a batch closes before padding
# would pass this share of its real positions (a pass costs rows x width; sorted by
# length, a batch of mixed answers was 40-70% padding, the most of the decoder's time).
PAD_SHARE = 0.2
_WARP_FIELDS = ("boundary", "log_z", "entropy", "variance", "mgf_low", "mgf_high",
                "alt_boundary", "alt_log_z", "alt_beyond")


def _too_padded(width: int, rows: int, real: int) -> bool:
    """Whether `rows` rows computed to `width` positions (the longest, joining a batch
    that holds `real` positions) would pad past PAD_SHARE."""
    return width * rows > (1 + PAD_SHARE) * (real + width)


@dataclass
class StepFeatures:
    """What the reference says about each step of one token path (numpy, on the CPU).

    Step i predicts path token i; the last step (len(path)) predicts what follows the
    answer (end of sequence, or more). Candidate columns follow the `cand_ids` given.
    """

    max_logp: np.ndarray  # [S] best log-prob at temperature 1
    argmax: np.ndarray  # [S] the reference's own choice
    cand_logp: np.ndarray  # [S, C] log-prob (temperature 1) of each candidate
    # sampled settings only, one column per order in sampling.ORDERS:
    boundary: np.ndarray | None = None  # [S, 2] log-prob of the least likely kept token
    log_z: np.ndarray | None = None  # [S, 2] logsumexp over kept tokens of logp / T
    entropy: np.ndarray | None = None  # [S, 2] entropy of the warped distribution q
    variance: np.ndarray | None = None  # [S, 2] variance of log q(token) under q
    mgf_low: np.ndarray | None = None  # [S, 2, L] log E_q[q^-lambda]
    mgf_high: np.ndarray | None = None  # [S, 2, H] log E_q[q^lambda]
    # per explicit alternative (validator.scoring.alternatives.ALTERNATIVES):
    alt_boundary: np.ndarray | None = None  # [S, A] log-prob of its least likely kept token
    alt_log_z: np.ndarray | None = None  # [S, A] logsumexp over its kept tokens of logp / T
    alt_beyond: np.ndarray | None = None  # [S, A, 2] its mass beyond each order's edge


    @staticmethod
    def concat(parts: list["StepFeatures"]) -> "StepFeatures":
        head = parts[0]
        for tail in parts[1:]:
            head = head.spliced(len(head.max_logp), tail)
        return head

    def rows(self, start: int, stop: int) -> "StepFeatures":
        """Steps [start, stop) (features of several paths are reduced together, then split)."""
        return StepFeatures(**{name: None if getattr(self, name) is None else getattr(self, name)[start:stop]
                               for name in self.__dataclass_fields__})

    def spliced(self, steps: int, tail: "StepFeatures") -> "StepFeatures":
        """This path's first `steps` steps followed by `tail` (features of another path
        that shares those first steps and was scored from there on)."""
        out = {}
        for name in self.__dataclass_fields__:
            head, rest = getattr(self, name), getattr(tail, name)
            if head is None or rest is None:
                out[name] = None
                continue
            head = head[:steps]
            if name == "cand_logp" and head.shape[1] != rest.shape[1]:
                width = max(head.shape[1], rest.shape[1])
                head = np.pad(head, ((0, 0), (0, width - head.shape[1])), constant_values=-np.inf)
                rest = np.pad(rest, ((0, 0), (0, width - rest.shape[1])), constant_values=-np.inf)
            out[name] = np.concatenate([head, rest], axis=0)
        return StepFeatures(**out)


@dataclass
class Past:
    """Keys and values of one sequence's positions [0, length), every decoder layer in
    one tensor: a proposal that shares a prefix with a scored path runs only the
    positions after it (the prompt is most of a scored sequence, and the aligner's
    proposals re-ran it). One tensor, not one per layer, so that putting a batch's
    pasts together is one copy per row, not one per row and layer (launches dominate
    on a GPU)."""

    kv: torch.Tensor  # [layers, 2 (keys, values), kv heads, length, head dim]

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def upto(self, n: int) -> "Past":
        return Past(self.kv[:, :, :, :n])


def held_bytes(pasts: Sequence[Past | None]) -> int:
    """Memory the pasts keep alive: each distinct tensor storage once (rows of one pass
    share one)."""
    storages = {}
    for p in pasts:
        if p is not None:
            storage = p.kv.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


class ReferenceModel:
    def __init__(self, spec: ModelSpec, model, tokenizer, device: str):
        self.spec = spec
        self.tokenizer = tokenizer
        self.bind(model, device)
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(x) for x in source)
        for name in spec.extra.get("stop_tokens", ()):  # e.g. Gemma's <end_of_turn>
            eos.add(int(tokenizer.convert_tokens_to_ids(name)))
        self.eos_ids = sorted(eos)
        self.table = TokenTable(tokenizer, self.eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.reruns: dict[str, str] = {}  # probe key -> the reference's own answer

    def bind(self, model, device: str, budgets: Budgets | None = None) -> None:
        """What teacher-forced scoring needs of the model alone (benchmarks/gpu_scoring.py
        scores with a bare model and no tokenizer through this). `budgets`: the memory
        the passes may use (default: the entry's, derived from the device's free memory)."""
        self.model = model
        self.device = device
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        head = model.get_output_embeddings()
        self.vocab_size = head.weight.shape[0]
        self.kv_per_token = kv_bytes_per_token(config, head.weight.element_size())
        if budgets is None:
            spec = getattr(self, "spec", None) or ModelSpec(name=type(model).__name__, checkpoint={})
            budgets = derive_budgets(spec, config, device, head.weight.element_size(), self.vocab_size)
        self.budgets = budgets
        self.max_batch_tokens = budgets.batch_tokens
        # Answers aligned together: every alignment round is one batched pass over the
        # answers still proposing, and a GPU's passes cost launches more than positions.
        self.align_chunk = budgets.align_chunk
        # Steps reduced at once: [steps, vocab] float32 logits of a 262k vocabulary add up
        # fast; a GPU wants few large launches.
        self.step_slice = budgets.logit_rows(self.vocab_size)
        # Prefix reuse needs every layer to attend to every earlier position (a sliding
        # window cache would drop what a proposal needs); other models recompute.
        self.reuse_past = (not getattr(config, "sliding_window", None)
                           and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ()))
        # Keys and values held between passes (kept for proposals; rows past this budget are
        # recomputed in full instead), and the most one pass's own cache may hold.
        self.max_past_bytes = budgets.kept_kv_bytes
        # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated).
        params = inspect.signature(model.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.lock = threading.Lock()  # one forward at a time per model

    @classmethod
    def load(cls, spec: ModelSpec) -> "ReferenceModel":
        """The entry's checkpoint on its device in its dtype (validator.models.checkpoints;
        CheckpointUnavailable says what to fix)."""
        model, tokenizer, device = load_model(spec)
        log.info("loaded %s on %s (%s)", spec.name, device, spec.dtype)
        return cls(spec, model, tokenizer, device)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states [rows, hidden] (softcapped where the model caps
        them). A bfloat16 head's own output rounds logits of 20-30 to 0.125-0.25, so a
        low-precision head is applied in float32, a slice of the vocabulary at a time
        (the float32 copy of a whole 256k x 3072 head would be 3 GiB)."""
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        h = hidden.float()
        if weight.dtype == torch.float32:
            logits = torch.nn.functional.linear(h, weight, bias)
        else:
            logits = torch.empty((h.shape[0], weight.shape[0]), dtype=torch.float32, device=h.device)
            block = max(1024, (64 << 20) // (4 * weight.shape[1]))  # 64 MiB of float32 weight at once
            for a in range(0, weight.shape[0], block):
                torch.matmul(h, weight[a : a + block].float().T, out=logits[:, a : a + block])
            if bias is not None:
                logits += bias.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- prompts ---------------------------------------------------------------------
    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 8192))

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The model's own chat template, ending where the assistant's answer starts."""
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def canonical_ids(self, text: str) -> list[int]:
        if not text:
            return []
        # The Rust tokenizer itself where there is one: the aligner asks for the piece
        # between a proposal and the path it rejoins, and the wrapper's call costs ten
        # times the encoding of such a piece (test_canonical_ids_match_the_tokenizer
        # checks that both split alike).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- teacher-forced scoring ------------------------------------------------------
    def step_features(
        self,
        items: Sequence[tuple[list[int], list[int], list[list[int]], Settings, int]],
    ) -> list[StepFeatures]:
        """items: (prompt ids, path ids, candidate ids per step [len(path)+1], settings,
        first step wanted). Features cover steps from the first wanted one to the end.

        Sequences are packed into batches by length; each batch is one forward pass.
        """
        return self.score_paths(items)[0]

    @torch.inference_mode()
    def score_paths(
        self,
        items: Sequence[tuple[list[int], list[int], list[list[int]], Settings, int]],
        pasts: Sequence[Past | None] | None = None,
        keep_past: bool = False,
    ) -> tuple[list[StepFeatures], list[Past | None]]:
        """step_features, optionally continuing each sequence from a Past that holds its
        first positions (at most up to the position that predicts the first wanted step),
        and optionally returning each sequence's Past over all of its positions (None
        where the model cannot reuse one or the memory budget is spent)."""
        pasts = list(pasts) if pasts is not None and self.reuse_past else [None] * len(items)
        keep_past = keep_past and self.reuse_past
        for (prompt, _, _, _, first), past in zip(items, pasts):
            if past is not None and past.length > len(prompt) - 1 + first:
                raise ValueError("a past must end before the position that predicts the first wanted step")

        def new_tokens(i: int) -> int:
            return len(items[i][0]) + len(items[i][1]) - (pasts[i].length if pasts[i] else 0)

        order = sorted(range(len(items)), key=new_tokens)
        out: list[StepFeatures | None] = [None] * len(items)
        kept: list[Past | None] = [None] * len(items)
        # What the given pasts hold stays held through this call: new ones get the rest.
        budget = [max(0, self.max_past_bytes - held_bytes(pasts)) if keep_past else 0]
        batch: list[int] = []
        longest_past = 0  # the pass's own cache: rows x (longest past + longest new part)
        real = 0  # the batch's positions, padding left out
        for idx in order:
            past_len = pasts[idx].length if pasts[idx] else 0
            rows, width = len(batch) + 1, new_tokens(idx)  # ascending: idx is the longest
            if batch and (width * rows > self.max_batch_tokens
                          or _too_padded(width, rows, real)
                          or rows * (max(longest_past, past_len) + width) * self.kv_per_token
                          > self.max_past_bytes):
                self._run_batch(items, batch, out, pasts, kept, budget)
                batch, longest_past, real = [], 0, 0
            batch.append(idx)
            longest_past, real = max(longest_past, past_len), real + width
        if batch:
            self._run_batch(items, batch, out, pasts, kept, budget)
        return out, kept  # type: ignore[return-value]

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[list[int]]) -> list[Past | None]:
        """Keys and values of each prompt's positions before its last token, computed once
        for every prompt given more than once (answers of several hosts to one probe), as
        pasts for score_paths: their first pass then runs only the answers. None for a
        prompt given once (nothing to share), or where the model cannot reuse a past or
        the memory budget is spent."""
        if not self.reuse_past:
            return [None] * len(prompts)
        counts: dict[tuple, int] = {}
        for p in prompts:
            if len(p) > 1:
                counts[tuple(p)] = counts.get(tuple(p), 0) + 1
        shared = sorted((key for key, n in counts.items() if n > 1), key=len)
        made: dict[tuple, Past] = {}
        budget = [self.max_past_bytes]
        batch: list[tuple] = []
        real = 0  # the batch's positions, padding left out
        for key in shared + [None]:  # None: run what is left
            width = len(key) - 1 if key is not None else 0
            if batch and (key is None or width * (len(batch) + 1) > self.max_batch_tokens
                          or _too_padded(width, len(batch) + 1, real)
                          or len(key) * (len(batch) + 1) * self.kv_per_token > self.max_past_bytes):
                with self.lock:
                    _, pasts = self._decode([list(k[:-1]) for k in batch], [None] * len(batch), budget)
                made.update((k, past) for k, past in zip(batch, pasts) if past is not None)
                batch, real = [], 0
            if key is not None:
                batch.append(key)
                real += width
        return [made.get(tuple(p)) for p in prompts]

    def _decode(self, seqs: list[list[int]], pasts: list[Past | None], budget: list | None):
        """The decoder over a batch of sequences, each continuing from its past (None: from
        the start). Returns the last hidden states ([rows, positions, hidden]; row r's own
        positions start at column 0 and run for len(seq) - past length) and, while
        `budget` (bytes, a one-element list) lasts, each row's Past over all its positions."""
        held = [p.length if p is not None else 0 for p in pasts]
        before = max(held)  # past positions, left-padded to a common length
        width = max(len(s) - h for s, h in zip(seqs, held))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), before + width), dtype=torch.long)
        positions = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (s, h) in enumerate(zip(seqs, held)):
            ids[row, : len(s) - h] = torch.tensor(s[h:])
            mask[row, before - h : before + len(s) - h] = 1
            positions[row] = torch.arange(h, h + width)
        cache = self._batched_cache(pasts, before) if before else None
        keep = bool(budget and budget[0] > 0)
        # Without a past the model's own positions (0, 1, ...) are the right ones.
        extra = {self._cache_arg: cache, "position_ids": positions.to(self.device)} if before else {}
        res = self.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               use_cache=keep, **extra)
        kept: list[Past | None] = [None] * len(seqs)
        if keep:
            # [layers, 2, rows, kv heads, positions, head dim]: one copy (a stack of stacks
            # copied twice); rows are views
            layers = _cache_layers(getattr(res, self._cache_arg))
            kv = torch.stack([t for pair in layers for t in pair]).unflatten(0, (len(layers), 2))
            row_bytes = kv[:, :, 0].numel() * kv.element_size()  # a row's share, padding included
            for row, (s, h) in enumerate(zip(seqs, held)):
                if row_bytes <= budget[0]:
                    budget[0] -= row_bytes
                    kept[row] = Past(kv[:, :, row, :, before - h : before + len(s) - h])
            if any(p is None for p in kept):  # a kept view would hold the whole batch's tensor
                kept = [None if p is None else Past(p.kv.clone()) for p in kept]
        return res.last_hidden_state, kept

    def _run_batch(self, items, batch: list[int], out: list, pasts: list | None = None,
                   kept: list | None = None, budget: list | None = None) -> None:
        pasts = pasts or [None] * len(items)
        held = [pasts[i].length if pasts[i] is not None else 0 for i in batch]
        with self.lock:
            hidden, rows_kept = self._decode([items[i][0] + items[i][1] for i in batch],
                                             [pasts[i] for i in batch], budget)
            for idx, past in zip(batch, rows_kept):
                if past is not None:
                    kept[idx] = past
            # Rows whose settings reduce alike share one LM head and one reduction: one
            # large matmul instead of one per row (the per-row launches dominated on a GPU).
            groups: dict[tuple, list[tuple[int, int, int, int]]] = {}
            for row, (idx, skipped) in enumerate(zip(batch, held)):
                prompt, path, _, settings, first = items[idx]
                start = len(prompt) - 1 - skipped  # row position whose output predicts path[0]
                key = (True,) if settings.greedy else (settings.temperature, settings.top_k, settings.top_p)
                groups.setdefault(key, []).append((row, idx, start + first, start + len(path) + 1))
            for members in groups.values():
                settings = items[members[0][1]][3]
                h = torch.cat([hidden[row, a:b] for row, _, a, b in members])
                cands = [c for _, idx, _, _ in members for c in items[idx][2][items[idx][4]:]]
                parts = []
                for a in range(0, h.shape[0], self.step_slice):
                    logits = self.logits(h[a : a + self.step_slice])
                    parts.append(self._reduce(torch.log_softmax(logits, dim=-1),
                                              cands[a : a + self.step_slice], settings))
                feats = parts[0] if len(parts) == 1 else StepFeatures.concat(parts)
                offset = 0
                for _, idx, a, b in members:
                    out[idx] = feats.rows(offset, offset + b - a)
                    offset += b - a

    def _batched_cache(self, pasts: list[Past | None], length: int):
        """One cache for a batch: each row's past right-aligned to `length` positions
        (the attention mask hides the padding on the left)."""
        from transformers import DynamicCache

        some = next(p for p in pasts if p is not None).kv
        layers, _, heads, _, dim = some.shape
        kv = some.new_zeros((layers, 2, len(pasts), heads, length, dim))
        for row, past in enumerate(pasts):
            if past is not None and past.length:
                kv[:, :, row, :, length - past.length :] = past.kv
        cache = DynamicCache()
        for layer in range(layers):
            cache.update(kv[layer, 0], kv[layer, 1], layer)
        return cache

    def _reduce(self, logp: torch.Tensor, cands: list[list[int]], settings: Settings) -> StepFeatures:
        steps = logp.shape[0]
        lens = np.fromiter(map(len, cands), dtype=np.int64, count=len(cands))
        width = max(1, int(lens.max(initial=0)))
        index = np.zeros((steps, width), dtype=np.int64)
        if lens.sum():
            flat = np.fromiter(itertools.chain.from_iterable(cands), dtype=np.int64, count=int(lens.sum()))
            starts = np.repeat(np.cumsum(lens) - lens, lens)
            index[np.repeat(np.arange(steps), lens), np.arange(len(flat)) - starts] = flat
        cand_logp = logp.gather(1, torch.from_numpy(index).to(logp.device))
        max_logp, argmax = logp.max(dim=-1)
        # Everything a step needs in one [steps, columns] tensor, so that the slice costs
        # one device-to-host copy (each copy waits for the GPU); argmax is exact in
        # float32 for any vocabulary below 2^24 tokens.
        parts = [max_logp[:, None], argmax[:, None].to(logp.dtype), cand_logp]
        if not settings.greedy:
            stats = self._warp_stats(logp, settings)
            parts += [stats[name].reshape(steps, -1) for name in _WARP_FIELDS]
        packed = torch.cat(parts, dim=1).cpu().numpy()
        feats = StepFeatures(max_logp=packed[:, 0], argmax=packed[:, 1].astype(np.int64),
                             cand_logp=packed[:, 2 : 2 + width])
        col = 2 + width
        if not settings.greedy:
            for name in _WARP_FIELDS:
                shape = stats[name].shape[1:]
                size = math.prod(shape)
                setattr(feats, name, packed[:, col : col + size].reshape(steps, *shape))
                col += size
        return feats

    def _warp_stats(self, logp: torch.Tensor, settings: Settings) -> dict[str, torch.Tensor]:
        vocab = logp.shape[-1]
        cap = settings.top_k if 0 < settings.top_k < vocab else vocab
        k = min(cap, _TOPK_FAST) if settings.top_p < 1.0 else cap
        stats = self._support_stats(logp, settings, cap, k)
        if k < cap:  # rows whose support reaches the fast cut are redone over everything
            redo = (stats["boundary_size"] >= k).any(dim=-1)
            if bool(redo.any()):
                full = self._support_stats(logp[redo], settings, cap, cap)
                for key in stats:
                    stats[key][redo] = full[key]
        stats.update(alternative_stats(logp, settings, stats["boundary"]))
        return stats

    @staticmethod
    def _support_stats(logp: torch.Tensor, settings: Settings, cap: int, k: int) -> dict:
        """Per order: the kept prefix of the k best tokens and the statistics of the
        warped distribution q over it (all log-probs in temperature-1 units)."""
        t = settings.temperature
        top = torch.topk(logp, k, dim=-1).values
        source = logp if cap == logp.shape[-1] else top  # the tokens top-k leaves
        scales = order_scales(settings)
        # At temperature 1 the two orders warp alike: compute once, copy (identical).
        alike = scales[0] == scales[1]
        norms = [torch.logsumexp(source * s, dim=-1) for s in scales[: 1 if alike else 2]]
        norm = torch.stack(norms * 2 if alike else norms, -1)
        sizes = kept_prefix_sizes(top, norm, settings)
        top = top[:, : int(sizes.max())]  # statistics only need the kept prefix
        cols = torch.arange(top.shape[1], device=top.device)
        lam_low = torch.tensor(LAMBDAS_LOW, dtype=top.dtype, device=top.device)
        lam_high = torch.tensor(LAMBDAS_HIGH, dtype=top.dtype, device=top.device)
        out: dict[str, list] = {key: [] for key in
                                ("boundary", "log_z", "entropy", "variance", "mgf_low", "mgf_high", "boundary_size")}
        for o in range(1 if alike else 2):
            n = sizes[:, o]
            kept = cols[None, :] < n[:, None]
            scaled = torch.where(kept, top / t, torch.full_like(top, -math.inf))
            lz = torch.logsumexp(scaled, dim=-1)
            logq = torch.where(kept, scaled - lz[:, None], torch.zeros_like(top))
            q = torch.where(kept, torch.exp(logq), torch.zeros_like(top))
            out["boundary"].append(top.gather(1, (n - 1)[:, None]).squeeze(1))
            out["log_z"].append(lz)
            ent = -(q * logq).sum(-1)
            out["entropy"].append(ent)
            out["variance"].append(((q * logq * logq).sum(-1) - ent * ent).clamp(min=0))
            # log E_q[q^-lam] = logsumexp((1 - lam) log q) over the kept tokens, and so on
            neg = torch.full_like(logq[:, :, None], -math.inf)
            out["mgf_low"].append(torch.logsumexp(
                torch.where(kept[:, :, None], (1 - lam_low) * logq[:, :, None], neg), dim=1))
            out["mgf_high"].append(torch.logsumexp(
                torch.where(kept[:, :, None], (1 + lam_high) * logq[:, :, None], neg), dim=1))
            out["boundary_size"].append(n)
        return {key: torch.stack(v * 2 if alike else v, 1) for key, v in out.items()}

    # -- re-run ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[list[int]], settings: Sequence[Settings],
                 seeds: Sequence[int], batch_size: int = 32) -> list[list[int]]:
        """Fixed-seed generation, one torch.Generator per probe, so a probe's re-run does
        not depend on which other probes shared its batch. A batch holds at most
        `batch_size` probes, and fewer where their prompts would pass the budget of
        positions per pass or their keys and values (prompt and answer) the kept budget."""
        results: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -settings[i].max_tokens)
        batch: list[int] = []

        def fits(rows: list[int]) -> bool:
            width = max(len(prompts[i]) for i in rows)
            limit = max(settings[i].max_tokens for i in rows)
            return (len(rows) <= batch_size and len(rows) * width <= self.max_batch_tokens
                    and len(rows) * (width + limit) * self.kv_per_token <= self.max_past_bytes)

        for idx in order + [None]:
            if batch and (idx is None or not fits(batch + [idx])):
                for i, toks in zip(batch, self._generate_batch(
                        [prompts[i] for i in batch], [settings[i] for i in batch], [seeds[i] for i in batch])):
                    results[i] = toks
                batch = []
            if idx is not None:
                batch.append(idx)
        return results

    def _generate_batch(self, prompts, settings, seeds) -> list[list[int]]:
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row ends at the same column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        done = [False] * n
        out: list[list[int]] = [[] for _ in range(n)]
        limit = max(s.max_tokens for s in settings)
        cache = None
        step_ids = ids
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.lock:
            for step in range(limit):
                # The decoder alone and the head on the last position only: a prompt's
                # [positions x vocabulary] logits are never built.
                res = self.model.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                       use_cache=True, **{self._cache_arg: cache})
                cache = getattr(res, self._cache_arg)
                logits = self.logits(res.last_hidden_state[:, -1, :])
                nxt = []
                for row in range(n):
                    if done[row]:
                        nxt.append(self.pad_id)
                        continue
                    tok = sample_next(logits[row], settings[row], gens[row])
                    if tok in self.eos_ids:
                        done[row] = True
                    else:
                        out[row].append(tok)
                        if len(out[row]) >= settings[row].max_tokens:
                            done[row] = True
                    nxt.append(tok)
                if all(done):
                    break
                step_ids = torch.tensor(nxt, device=self.device)[:, None]
                mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], -1)
                positions = positions[:, -1:] + 1
        return out
