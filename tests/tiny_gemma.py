"""A two-layer, random-weight GemmaForCausalLM (gemma-7b's own architecture class, with
gemma-7b's multi-head attention and head width in miniature) saved as a transformers
directory with Gemma's tokenizer, and a registry whose `tiny-gemma` entry is a `dir:`
checkpoint with gemma-7b's chat template: the path an operator's local gemma-7b takes,
at a size the default test run affords. (gemma-7b's weights are never downloaded here.)

Random weights answer random tokens; two changes keep them answerable the way a trained
model's are: the tied embeddings are scaled so that one token usually dominates a step
(as in a trained model, not a near-uniform draw over 262k tokens), and every token but
whole ASCII words after a space (WORD) gets a zero embedding, so a logit of 0 against
the peaks of the words: its answers re-tokenize into the tokens it wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from validator.models.registry import Registry

NAME = "tiny-gemma"
LAYERS = 2
EMBED_SCALE = 25.0  # logits of about N(0, 4^2): the best token is usually well ahead
# The tokens it writes: whole words after a space, which the tokenizer splits back into
# the same tokens (random sequences of other pieces re-tokenize differently, and a
# trained model's answers mostly do not).
WORD = r"\u2581[A-Za-z]{2,}"


def gemma_tokenizer():
    """Gemma's tokenizer (262k SentencePiece vocabulary) from the installed gemma-3-270m
    package, via its converted transformers directory (converted once per machine)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Registry.load().get("gemma-3-270m").load_source())


def build(directory: Path, seed: int = 0) -> Path:
    """Write the tiny model and the tokenizer into `directory` (a `dir:` checkpoint)."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    tokenizer = gemma_tokenizer()
    tokenizer.chat_template = None  # the registry entry supplies gemma-7b's
    config = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = GemmaForCausalLM(config).eval()
    words = {i for tok, i in tokenizer.get_vocab().items() if re.fullmatch(WORD, tok)}
    quiet = torch.tensor(sorted(set(range(len(tokenizer))) - words))
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.mul_(EMBED_SCALE)
        weight[quiet] = 0.0
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def registry_file(directory: Path, checkpoint: Path, **entry) -> Path:
    """A registry with `tiny-gemma` (the tiny checkpoint, gemma-7b's template and stop
    tokens, on the CPU) and the shipped entries (the cheats' other model)."""
    shipped = Registry.load()
    raw = yaml.safe_load(shipped.path.read_text())
    gemma7b = raw["models"]["gemma-7b"]
    raw["models"] = {
        NAME: {"checkpoint": {"dir": str(checkpoint)}, "dtype": "float32", "device": "cpu",
               "stop_tokens": gemma7b["stop_tokens"], "chat_template": gemma7b["chat_template"],
               "calibration": str(directory / "calibration" / f"{NAME}.json"), **entry},
        "gemma-3-270m": {**raw["models"]["gemma-3-270m"], "calibration": None},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
