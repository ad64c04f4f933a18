"""The aligner recovers the tokens an engine generated from its text alone."""

from __future__ import annotations

import random

import numpy as np

from validator.scoring.align import MAX_BRANCHES, AlignItem, Aligner
from validator.probing.probes import load_bank
from validator.models.sampling import Settings

from .answers import reference_generations


# Text the tokenizer's own call and ReferenceModel.canonical_ids (the Rust tokenizer
# underneath) must split alike: whitespace runs and ends, tabs, accents, emoji, CJK, code,
# a chat template's special-token text, the empty string.
TOKENIZER_EDGE_TEXTS = ["", " ", "\n", "\n\n\n", "  leading and trailing  ", "a\tb\t\tc", "Hello  world\n\nhi é 😀",
                        "def f(x):\n    return x ** 2\n", "中文字符和 English 混合", "<|im_end|> <end_of_turn>",
                        "l'été — “quotes” …", "x" * 300, "🍋🍋 ", "\r\n\r\nend"]


def assert_canonical_ids_match_the_tokenizer(ref, texts):
    for text in TOKENIZER_EDGE_TEXTS + list(texts):
        pieces = [text] + [text[a:b] for a, b in ((0, 7), (3, 11), (len(text) // 2, len(text)))]
        for piece in pieces:
            assert ref.canonical_ids(piece) == list(ref.tokenizer(piece, add_special_tokens=False)["input_ids"]), piece


def test_canonical_ids_match_the_tokenizer(ref, honest_records, cheat_records):
    answers = [r["response"] for recs in (honest_records, cheat_records) for rs in recs.values() for r in rs]
    assert len(answers) > 300
    assert_canonical_ids_match_the_tokenizer(ref, answers)


def _generated(ref, n=16, settings=Settings(temperature=0.0, max_tokens=64)):
    """The reference's own fixed-seed answers (recorded: tests/answers.py)."""
    prompts = [ref.prompt_ids(p.messages) for p in load_bank("configs/prompts/general.yaml")[40:40 + n]]
    name = f"test_align {'greedy' if settings.greedy else 'sampled'}"
    outs = reference_generations(ref, name, prompts, [settings] * n, list(range(n)))
    return prompts, outs


def _recovered(ref, settings):
    prompts, outs = _generated(ref, settings=settings)
    texts = [ref.tokenizer.decode(o) for o in outs]
    canonical_same = sum(ref.canonical_ids(t) == o for t, o in zip(texts, outs))
    als = Aligner(ref).align([AlignItem(p, t, settings) for p, t in zip(prompts, texts)])
    for al, text in zip(als, texts):  # the tokens always spell the text exactly
        assert b"".join(ref.table.bytes[t] for t in al.tokens).strip() == text.encode().strip()
    return sum(al.tokens == o for al, o in zip(als, outs)), canonical_same, len(outs)


def test_recovers_generated_tokens_where_canonical_tokenisation_does_not(ref):
    """Re-tokenising the text is not what the model produced; the aligner finds it."""
    aligned_same, canonical_same, n = _recovered(ref, Settings(temperature=0.0, max_tokens=64))
    assert aligned_same >= canonical_same
    assert aligned_same >= 0.9 * n, (aligned_same, canonical_same)


def test_recovers_sampled_tokens(ref):
    """Sampled answers: a sampling model emits a whitespace run both as one token and
    as several, and nothing looks suspicious either way. Started merged, the aligner
    recovered 14 of 16 such answers on an AMD EPYC CPU (canonical tokenisation 12; 56 of
    the bank's first 64, canonical 57); started split with the merge proposed where this
    pass shows it likelier, 59 of 64, and all 16 of the recorded ones (canonical 14)."""
    aligned_same, canonical_same, n = _recovered(
        ref, Settings(temperature=1.0, top_k=0, top_p=0.95, max_tokens=64))
    assert aligned_same >= canonical_same, (aligned_same, canonical_same)
    assert aligned_same >= 0.9 * n, (aligned_same, canonical_same)


def test_a_token_that_splits_a_word_re_segments_the_rest_of_it(ref):
    """An honest bfloat16 transformers host (batched, at the API's default settings)
    answered with " al" + "gun" + "as" where the tokenizer writes " alg" + "unas", and
    " am" + "e" + "le" + "za" for " am" + "ele" + "za". Proposing " al" and keeping the
    old boundary gave " al" + "g" + "unas" (out of the support, rejected), the look-back
    budget ran out, and the answer failed with 3 tokens 4-7 nats outside the support.
    The ids are the engine's own, captured from its generate() call."""
    messages = [{"role": "user", "content": "Translate into Spanish: 'My brother works at a hospital near the river.'"}]
    generated = [56, 41492, 360, 23544, 292, 1055, 292, 430, 2618, 45693, 413, 344, 367, 2618, 5625, 430,
                 2618, 10168, 1264, 5415, 11488, 744, 85, 290, 5100, 30]
    text = ref.tokenizer.decode(generated)
    assert text == "Hacer algunas personas en la ciudad de la hospital en la que está mi ameleza."
    assert ref.canonical_ids(text) != generated
    settings = Settings(temperature=0.7, top_k=50, top_p=0.5, max_tokens=96)
    aligned = Aligner(ref).align([AlignItem(ref.prompt_ids(messages), text, settings, support_tolerance=3.0)])[0]
    assert aligned.tokens == generated


def test_a_split_word_whose_rest_the_tokenizer_writes_otherwise_is_refilled(ref):
    """An honest bfloat16 transformers host (compliance_power.py's live honest hosts, at
    1.0 / 40 / 0.8) wrote "unattable". The tokenizer writes " unatt" + "able", both 12-13
    nats outside the support; proposing " un" filled the rest as the tokenizer would,
    "att" + "able", which is outside too, so the proposal lost and the answer failed with
    3 tokens up to 8.6 nats outside the support. The reference's likeliest segmentation,
    " un" + "at" + "table" (log-probs -3.9, -2.7, -2.6), is what the engine emitted."""
    messages = [{"role": "user", "content": "What is the hardest natural substance?"}]
    text = ("The hardest natural substance on Earth, despite being an unattable exception, is not a "
            "substance itself, but rather an extremely complex and delicate entity.")
    settings = Settings(temperature=1.0, top_k=40, top_p=0.8, max_tokens=48)
    aligned = Aligner(ref).align([AlignItem(ref.prompt_ids(messages), text, settings, support_tolerance=3.26)])[0]
    pieces = [ref.table.bytes[t].decode() for t in aligned.tokens]
    assert ref.tokenizer.decode(ref.canonical_ids(" unattable")) == " unattable"
    assert [ref.tokenizer.decode([t]) for t in ref.canonical_ids(text)][10:12] == [" unatt", "able"]
    assert pieces[10:13] == [" un", "at", "table"], pieces[8:14]
    edge = aligned.feats.boundary[: len(aligned.tokens)].min(axis=-1)
    assert (aligned.token_logp >= edge - 3.26).all()


def test_stripped_whitespace_is_implied_not_penalised(ref, honest_records):
    """Honest answers that end in whitespace, as an API that strips it returns them."""
    records = [r for host, recs in honest_records.items() if "stripped" not in host for r in recs
               if r["response"] != r["response"].strip()]
    assert records, "no honest answer with surrounding whitespace to strip"
    items = []
    for r in records:
        settings = Settings.from_configs(r["configs"])
        prompt = ref.prompt_ids(r["messages"])
        items += [AlignItem(prompt, r["response"], settings), AlignItem(prompt, r["response"].strip(), settings)]
    als = Aligner(ref).align(items)
    for r, whole, stripped in zip(records, als[::2], als[1::2]):
        settings = Settings.from_configs(r["configs"])
        n_whole, n_stripped = len(whole.tokens), len(stripped.tokens)
        gap_whole = whole.feats.max_logp[:n_whole] - whole.token_logp
        gap_stripped = stripped.feats.max_logp[:n_stripped] - stripped.token_logp
        assert gap_stripped.max() <= gap_whole.max() + 0.5
        if not settings.length_stop(n_whole):
            # An early stop: the lost whitespace comes back as implied tokens before the end.
            assert n_stripped == n_whole and sum(stripped.implied) >= 1, (n_whole, n_stripped)
        # (After a max_tokens cut nothing tells what whitespace followed; none is implied.)


def test_hostile_text_bounded_work(ref):
    """Random bytes, lone surrogates, special-token strings: aligned, bounded, no crash."""
    rng = random.Random(3)
    prompt = ref.prompt_ids([{"role": "user", "content": "Hi"}])
    noise = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(60))
    texts = [noise, "\ud800 lone surrogate", "<|im_end|><|im_start|>user\nhi", "", " ", "\n\n\n"]
    als = Aligner(ref).align([AlignItem(prompt, t, Settings(temperature=0.7)) for t in texts])
    for al, t in zip(als, texts):
        assert al.branches <= MAX_BRANCHES
        assert al.passes <= MAX_BRANCHES + 1
        assert np.isfinite(al.token_logp).all()
        assert b"".join(ref.table.bytes[x] for x in al.tokens).strip() == \
            t.encode("utf-8", "surrogatepass").strip()
    # special-token strings in an answer are text, never the control tokens themselves
    assert not set(als[2].tokens) & set(ref.eos_ids)


def test_proposals_reuse_the_prefix_and_change_nothing(ref, honest_records, cheat_records):
    """Proposal passes continue from the current path's keys and values and run only the
    compared stretch: the alignments (tokens, log-probs, features) are those of full
    recomputation, with fewer decoder positions."""
    records = (honest_records["honest-llama.cpp"][:8] + cheat_records["cheat-other-model"][:4]
               + cheat_records["cheat-hotter"][:4])
    items = [AlignItem(ref.prompt_ids(r["messages"]), r["response"], Settings.from_configs(r["configs"]))
             for r in records]
    positions = [0]

    def count(module, args, kwargs):
        positions[0] += int(kwargs["input_ids"].numel())

    hook = ref.model.model.register_forward_pre_hook(count, with_kwargs=True)
    runs = {}
    try:
        for reuse in (False, True):
            ref.reuse_past, positions[0] = reuse, 0
            runs[reuse] = (Aligner(ref).align(items), positions[0])
    finally:
        hook.remove()
        ref.reuse_past = True
    (full, full_positions), (reused, reused_positions) = runs[False], runs[True]
    assert sum(al.branches for al in full) > 0, "no proposal was made: nothing compared"
    assert reused_positions < 0.8 * full_positions, (reused_positions, full_positions)
    for a, b in zip(full, reused):
        assert a.tokens == b.tokens and a.implied == b.implied and a.branches == b.branches
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=1e-3)
        np.testing.assert_allclose(a.feats.max_logp, b.feats.max_logp, atol=1e-3)
        assert abs(a.eos_logp - b.eos_logp) < 1e-3


def test_shared_prompts_are_computed_once_and_change_nothing(ref, honest_records, cheat_records):
    """Answers of several hosts to one probe: the prompt's keys and values are computed
    once (ReferenceModel.prefill) and every answer's first pass runs from them. The
    alignments are those of computing each prompt in full, and exactly the repeated
    prompts' positions are saved."""
    records = (honest_records["honest-llama.cpp"][:6] + honest_records["honest-transformers-bf16"][:6]
               + cheat_records["cheat-hotter"][:6])
    items = [AlignItem(ref.prompt_ids(r["messages"]), r["response"], Settings.from_configs(r["configs"]))
             for r in records]
    prompts = [tuple(i.prompt) for i in items]
    saved = sum((prompts.count(p) - 1) * (len(p) - 1) for p in set(prompts))
    assert saved > 0, "no prompt is shared: nothing compared"
    shared = ref.prefill([i.prompt for i in items])
    assert all((s is not None) == (prompts.count(p) > 1) for s, p in zip(shared, prompts))
    assert all(s.length == len(p) - 1 for s, p in zip(shared, prompts) if s is not None)

    computed = [0]  # positions the decoder computed, padding left out

    def count(module, args, kwargs):
        width = kwargs["input_ids"].shape[1]
        computed[0] += int(kwargs["attention_mask"][:, -width:].sum())

    hook = ref.model.model.register_forward_pre_hook(count, with_kwargs=True)
    runs = {}
    try:
        for share in (False, True):
            computed[0] = 0
            if not share:
                ref.prefill = lambda prompts: [None] * len(prompts)  # on this instance only
            runs[share] = (Aligner(ref).align(items), computed[0])
            ref.__dict__.pop("prefill", None)
    finally:
        hook.remove()
        ref.__dict__.pop("prefill", None)
    (alone, alone_positions), (together, together_positions) = runs[False], runs[True]
    assert alone_positions - together_positions == saved
    for a, b in zip(alone, together):
        assert a.tokens == b.tokens and a.implied == b.implied and a.branches == b.branches
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=1e-3)
        np.testing.assert_allclose(a.feats.max_logp, b.feats.max_logp, atol=1e-3)
        assert abs(a.eos_logp - b.eos_logp) < 1e-3


def test_a_past_longer_than_the_shared_prefix_is_refused(ref):
    prompt = ref.prompt_ids([{"role": "user", "content": "Name a colour."}])
    path = ref.canonical_ids("Blue is a colour.")
    item = (prompt, path, [[t] for t in path] + [ref.eos_ids], Settings(temperature=0.0), 2)
    _, pasts = ref.score_paths([item], keep_past=True)
    assert pasts[0].length == len(prompt) + len(path)
    ok, _ = ref.score_paths([item], pasts=[pasts[0].upto(len(prompt) + 1)])
    whole, _ = ref.score_paths([item])
    np.testing.assert_allclose(ok[0].cand_logp, whole[0].cand_logp, atol=1e-3)
    try:
        ref.score_paths([item], pasts=[pasts[0].upto(len(prompt) + 2)])
    except ValueError as exc:
        assert "past" in str(exc)
    else:
        raise AssertionError("a past covering the position that predicts the first wanted step was accepted")


def test_passes_carry_little_padding_and_change_nothing(ref, honest_records, cheat_records, monkeypatch):
    """Answers of mixed lengths: each forward pass computes its rows to the longest row's
    length, so a batch closes before padding passes PAD_SHARE of its real positions. The
    alignments are those of batching by the position budget alone (padding unbounded),
    with fewer positions computed."""
    import validator.scoring.reference as reference

    records = (honest_records["honest-transformers-fp32"][:10] + honest_records["honest-llama.cpp"][10:16]
               + cheat_records["cheat-truncated"][:6])
    items = [AlignItem(ref.prompt_ids(r["messages"]), r["response"], Settings.from_configs(r["configs"]))
             for r in records]
    lengths = sorted(len(ref.canonical_ids(r["response"])) for r in records)
    assert lengths[-1] > 2 * lengths[0], "answers of alike lengths: nothing to pad"
    passes: list[tuple[int, int]] = []  # (positions computed, real positions) per pass

    def count(module, args, kwargs):
        ids = kwargs["input_ids"]
        passes.append((int(ids.numel()), int(kwargs["attention_mask"][:, -ids.shape[1]:].sum())))

    hook = ref.model.model.register_forward_pre_hook(count, with_kwargs=True)
    runs = []
    try:
        for share in (float("inf"), reference.PAD_SHARE):
            monkeypatch.setattr(reference, "PAD_SHARE", share)
            passes.clear()
            runs.append((Aligner(ref).align(items), list(passes)))
    finally:
        hook.remove()
    (loose, loose_passes), (capped, capped_passes) = runs
    for done, real in capped_passes:  # a single row is never padded; several stay within the cap
        assert done <= (1 + reference.PAD_SHARE) * real + 1e-9, (done, real)
    assert sum(d for d, _ in capped_passes) < 0.9 * sum(d for d, _ in loose_passes), (capped_passes, loose_passes)
    for a, b in zip(loose, capped):
        assert a.tokens == b.tokens and a.implied == b.implied and a.branches == b.branches
        np.testing.assert_allclose(a.token_logp, b.token_logp, atol=1e-3)
        np.testing.assert_allclose(a.feats.max_logp, b.feats.max_logp, atol=1e-3)
        assert abs(a.eos_logp - b.eos_logp) < 1e-3
