"""Engines that answer chat requests the way hosts do: honest ones on other stacks and
precisions, and the damaged models cheats run. The host behaviours built on them are
the strategies of validator.network.simulator; every answer comes from a real model.

- TransformersEngine: transformers' own `generate()` in any dtype, with SDPA or eager
  attention, batching up to N requests of the same settings with left padding (the
  other prompts in a batch change the padded rows' arithmetic, as on a real host), on
  the reference's device; optionally with some decoder layers removed (a cheaper, worse
  model claiming to be the real one).
- LlamaCppEngine: llama.cpp (llama-cpp-python) on a GGUF file: an independent engine,
  quantised matmuls, its own sampler order.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import re
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

from validator.models.registry import ModelSpec
from validator.models.sampling import Settings

log = logging.getLogger(__name__)

# torch's CPU random generator is one per process and transformers' generate() samples
# from it: held from seeding to the last sampled token, so that engines sampling in other
# threads (the simulated network runs one per engine) cannot draw from this seeded stream.
_TORCH_RNG = threading.Lock()


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    settings: Settings
    seed: int = 0


class Engine(Protocol):
    name: str

    def generate(self, requests: Sequence[Request]) -> list[str]: ...


def render_chat(template: str, messages: Sequence[dict], bos: str = "", eos: str = "") -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, trimmed blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=True, bos_token=bos, eos_token=eos)


class TransformersEngine:
    def __init__(self, spec: ModelSpec, dtype: str = "float32", drop_layers: Sequence[int] = (),
                 name: str | None = None, batch_size: int = 32, attention: str = "sdpa"):
        from validator.models.checkpoints import load_model

        self.model, self.tokenizer, self.device = load_model(spec, dtype=dtype, attention=attention)
        self.tokenizer.padding_side = "left"
        if drop_layers:
            self._drop_layers(set(drop_layers))
        self.name = name or transformers_engine_name(dtype, attention, batch_size) + (
            f"-minus{len(drop_layers)}" if drop_layers else "")
        self.batch_size = batch_size

    def _drop_layers(self, drop: set[int]) -> None:
        import torch

        layers = self.model.model.layers
        kept = [layer for i, layer in enumerate(layers) if i not in drop]
        for new_idx, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
            layer.self_attn.layer_idx = new_idx
        self.model.model.layers = torch.nn.ModuleList(kept)
        self.model.config.num_hidden_layers = len(kept)
        if getattr(self.model.config, "layer_types", None):
            self.model.config.layer_types = [t for i, t in enumerate(self.model.config.layer_types)
                                             if i not in drop]

    def generate(self, requests: Sequence[Request]) -> list[str]:
        import torch

        out: list[str] = [""] * len(requests)
        groups: dict[Settings, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(replace(r.settings, seed=None), []).append(i)
        for settings, idxs in groups.items():
            for b in range(0, len(idxs), self.batch_size):
                chunk = idxs[b : b + self.batch_size]
                prompts = [self.tokenizer.apply_chat_template(
                    requests[i].messages, add_generation_prompt=True, tokenize=False) for i in chunk]
                enc = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
                kwargs = dict(max_new_tokens=settings.max_tokens, repetition_penalty=1.0,
                              pad_token_id=self.tokenizer.pad_token_id or self.model.generation_config.eos_token_id)
                if settings.greedy:
                    kwargs.update(do_sample=False)
                else:
                    kwargs.update(do_sample=True, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p)
                with torch.inference_mode(), (contextlib.nullcontext() if settings.greedy else _TORCH_RNG):
                    torch.manual_seed(batch_seed([requests[i] for i in chunk]))
                    ids = self.model.generate(**enc, **kwargs)
                new = ids[:, enc["input_ids"].shape[1]:]
                for i, row in zip(chunk, new):
                    out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out


def batch_seed(requests: Sequence[Request]) -> int:
    """The seed of torch's generator for one batch: a digest of its requests' seeds and
    messages. A request alone in its batch is answered the same whatever else the engine
    serves; and requests without a seed (the API has none: every probe arrives with seed
    0) still draw from different streams, as a host's sampler does, rather than every
    one replaying stream 0."""
    what = json.dumps([[r.seed, r.messages] for r in requests], sort_keys=True)
    return int.from_bytes(hashlib.sha256(what.encode()).digest()[:8], "big") >> 1


def _close_llama(ref: weakref.ref) -> None:
    llm = ref()
    if llm is not None:
        llm.close()


class LlamaCppEngine:
    def __init__(self, gguf: str | Path, chat_template: str | None = None, name: str = "llama.cpp",
                 n_ctx: int = 4096, threads: int = 2):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, verbose=False)
        # llama-cpp-python frees the model in __del__, which at interpreter exit can run
        # after its module's globals are gone ("TypeError: 'NoneType' object is not
        # callable" after every run): free it while they still exist.
        atexit.register(_close_llama, weakref.ref(self.llm))
        self.template = chat_template or self.llm.metadata.get("tokenizer.chat_template")
        if not self.template:
            raise ValueError(f"{gguf} carries no chat template; pass one")
        # special=True: without it llama-cpp-python detokenizes control tokens to b"", and a
        # template's {{ bos_token }} vanished (Gemma without <bos> answers gibberish).
        self.bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode("utf-8", "replace")
        self.eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
        self.name = name

    def prompt_tokens(self, messages: Sequence[dict]) -> list[int]:
        text = render_chat(self.template, messages, self.bos, self.eos)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, requests: Sequence[Request]) -> list[str]:
        out = []
        for r in requests:
            s = r.settings
            self.llm.reset()
            res = self.llm.create_completion(
                prompt=self.prompt_tokens(r.messages), max_tokens=s.max_tokens,
                temperature=0.0 if s.greedy else s.temperature, top_k=s.top_k, top_p=s.top_p,
                min_p=0.0, repeat_penalty=1.0, seed=r.seed)
            out.append(res["choices"][0]["text"])
        return out


def requantise(model, bits: int = 4, group: int = 32) -> None:
    """Round every decoder weight matrix to `bits`-bit symmetric integers in groups of
    `group` (round-to-nearest, what a lazy re-quantisation does), in place."""
    import torch

    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    g = w.reshape(-1, group)
                    scale = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                    w.copy_((torch.round(g / scale).clamp(-levels, levels) * scale).reshape(w.shape))


def fp8_weights(model) -> None:
    """Round every decoder weight matrix to float8 e4m3 with one scale per output row
    (what an FP8 weight-quantised deployment stores), in place; the arithmetic stays in
    the model's dtype (an FP8 GPU kernel would round activations too)."""
    import torch

    top = float(torch.finfo(torch.float8_e4m3fn).max)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
                    w.copy_((w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale)


# Honest transformers engines: DTYPE[-eager][-batchN] (SDPA attention and batches of up
# to 32 unless named); `transformers_engine_name` gives the name the engine reports.
TRANSFORMERS = re.compile(r"^(fp32|bf16|fp16)(-eager)?(?:-batch([1-9][0-9]*))?$")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ENGINES = ("fp32", "bf16", "fp16", "DTYPE-eager", "DTYPE-batchN", "DTYPE-eager-batchN", "llama.cpp",
           "minus-layers", "requantised", "fp8-weights")
_shared: dict[tuple, Engine] = {}
_shared_lock = threading.Lock()
_loading = threading.Lock()


def _variant(attention: str, batch_size: int) -> str:
    return ("-eager" if attention == "eager" else "") + (f"-batch{batch_size}" if batch_size != 32 else "")


def transformers_engine(dtype: str, attention: str = "sdpa", batch_size: int = 32) -> str:
    """The engine key (for load_engine) of transformers in `dtype` with `attention`."""
    return {v: k for k, v in DTYPES.items()}[dtype] + _variant(attention, batch_size)


def transformers_engine_name(dtype: str, attention: str = "sdpa", batch_size: int = 32) -> str:
    """transformers-DTYPE[-eager][-batchN]: what a calibration file and an engine call it."""
    return f"transformers-{dtype}" + _variant(attention, batch_size)


def load_engine(registry, model: str, name: str) -> Engine:
    """A new engine `name` (see ENGINES) for `model`."""
    spec = registry.get(model)
    honest = TRANSFORMERS.match(name)
    if honest:
        dtype, eager, batch = honest.groups()
        return TransformersEngine(spec, DTYPES[dtype], attention="eager" if eager else "sdpa",
                                  batch_size=int(batch or 32))
    if name == "llama.cpp":
        return LlamaCppEngine(spec.gguf_path(), chat_template=spec.chat_template)
    if name == "minus-layers":  # four layers from the middle
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(spec.load_source()).num_hidden_layers
        return TransformersEngine(spec, "float32", drop_layers=range(layers // 2, layers // 2 + 4))
    if name == "requantised":
        engine = TransformersEngine(spec, "float32", name="transformers-requantised-q4")
        requantise(engine.model, bits=4)
        return engine
    if name == "fp8-weights":
        engine = TransformersEngine(spec, "float32", name="transformers-fp8-weights")
        fp8_weights(engine.model)
        return engine
    raise KeyError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


def shared_engine(registry, model: str, name: str) -> Engine:
    """Engines by (model, name), loaded once per process and shared by everything that
    answers as a host (tests, examples, the simulated network)."""
    key = (str(registry.path), model, name)
    with _shared_lock:
        if key in _shared:
            return _shared[key]
    # One load at a time: transformers builds a model on the meta device under a
    # process-wide context, and two loads in two threads (engines loaded on first
    # request, each in its own thread) got each other's meta tensors.
    with _loading:
        with _shared_lock:
            if key in _shared:
                return _shared[key]
        engine = load_engine(registry, model, name)
        with _shared_lock:
            return _shared.setdefault(key, engine)
