"""Engines that answer chat requests the way hosts do: honest ones on other stacks and
precisions, and the cheats hosts use. Calibration, the tests and the simulated network
use them; every answer comes from a real model.

- TransformersEngine: transformers' own `generate()` in any dtype, optionally with
  some decoder layers removed (a cheaper, worse model claiming to be the real one).
- LlamaCppEngine: llama.cpp (llama-cpp-python) on a GGUF file: an independent engine,
  quantised matmuls, its own sampler order.
- SettingsOverride: any engine, with the request's sampling settings replaced (a
  hotter temperature, greedy decoding when sampling was asked, ...).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import random
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

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
                 name: str | None = None, batch_size: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = spec.load_source()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if spec.chat_template:
            self.tokenizer.chat_template = spec.chat_template
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype)).eval()
        if drop_layers:
            self._drop_layers(set(drop_layers))
        self.name = name or f"transformers-{dtype}" + (f"-minus{len(drop_layers)}" if drop_layers else "")
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
                enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                kwargs = dict(max_new_tokens=settings.max_tokens, repetition_penalty=1.0,
                              pad_token_id=self.tokenizer.pad_token_id or self.model.generation_config.eos_token_id)
                if settings.greedy:
                    kwargs.update(do_sample=False)
                else:
                    kwargs.update(do_sample=True, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p)
                with torch.inference_mode(), (contextlib.nullcontext() if settings.greedy else _TORCH_RNG):
                    torch.manual_seed(requests[chunk[0]].seed)
                    ids = self.model.generate(**enc, **kwargs)
                new = ids[:, enc["input_ids"].shape[1]:]
                for i, row in zip(chunk, new):
                    out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
        return out


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


class SettingsOverride:
    """An engine that answers with other sampling settings than the request's."""

    def __init__(self, engine: Engine, transform: Callable[[Settings], Settings], name: str):
        self.engine, self.transform, self.name = engine, transform, name

    def generate(self, requests: Sequence[Request]) -> list[str]:
        return self.engine.generate([replace(r, settings=self.transform(r.settings)) for r in requests])


def hotter(settings: Settings) -> Settings:
    """A temperature well above the requested one (greedy requests get sampling at 1.0)."""
    return replace(settings, temperature=max(1.0, settings.temperature + 0.8))


def greedy(settings: Settings) -> Settings:
    return replace(settings, temperature=0.0)


def truncate(text: str, rng: random.Random, low: float = 0.3, high: float = 0.7) -> str:
    """Cut an answer short at a word boundary between `low` and `high` of its length."""
    cut = int(len(text) * rng.uniform(low, high))
    space = text.rfind(" ", 0, cut)
    return text[: space if space > 0 else cut]


def answer_records(engine: Engine, probes: Sequence[tuple[object, Settings]], host: str,
                   model: str) -> list[dict]:
    """Ask an engine every (prompt, settings) probe; audit records of its answers."""
    requests = [Request(p.messages, s, s.seed or 0) for p, s in probes]
    answers = engine.generate(requests)
    return [{"id": f"{host}/{p.id}/{i}", "host": host, "model": model, "messages": p.messages,
             "configs": s.as_configs(), "response": a}
            for i, ((p, s), a) in enumerate(zip(probes, answers))]


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


ENGINES = ("fp32", "bf16", "llama.cpp", "other", "minus-layers", "requantised")
_shared: dict[tuple, Engine] = {}
_shared_lock = threading.Lock()


def shared_engine(registry, model: str, name: str, other_model: str = "gemma-3-270m") -> Engine:
    """Engines by (model, name), loaded once per process and shared by everything that
    answers as a host (tests, examples, the simulated network)."""
    key = (str(registry.path), model, name, other_model if name == "other" else None)
    with _shared_lock:
        if key in _shared:
            return _shared[key]
    spec = registry.get(model)
    if name == "fp32":
        e: Engine = TransformersEngine(spec, "float32")
    elif name == "bf16":
        e = TransformersEngine(spec, "bfloat16")
    elif name == "llama.cpp":
        e = LlamaCppEngine(spec.gguf_path(), chat_template=spec.chat_template)
    elif name == "other":
        other = registry.get(other_model)
        e = LlamaCppEngine(other.gguf_path(), chat_template=other.chat_template, name=other.name)
    elif name == "minus-layers":
        layers = shared_engine(registry, model, "fp32").model.config.num_hidden_layers
        e = TransformersEngine(spec, "float32", drop_layers=range(layers // 2, layers // 2 + 4))
    elif name == "requantised":
        e = TransformersEngine(spec, "float32", name="transformers-requantised-q4")
        requantise(e.model, bits=4)
    else:
        raise KeyError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    with _shared_lock:
        return _shared.setdefault(key, e)


# -- hosts, honest and not: what calibration, the tests, the examples and benchmarks run --
class HostFactory:
    """Builds the answers of named host behaviours for a model, sharing loaded engines."""

    HONEST = ("honest-transformers-fp32", "honest-transformers-bf16", "honest-llama.cpp",
              "honest-llama.cpp-stripped")
    CHEATS = ("cheat-other-model", "cheat-layers-removed", "cheat-hotter",
              "cheat-greedy-when-sampling", "cheat-truncated", "cheat-replayed")

    def __init__(self, registry, model: str, other_model: str = "gemma-3-270m", seed: int = 11):
        self.registry = registry
        self.model = model
        self.spec = registry.get(model)
        self.other_model = other_model
        self.seed = seed
        self._memo: dict[tuple, list[dict]] = {}

    def engine(self, name: str) -> Engine:
        """A named engine for this factory's model (see ENGINES), loaded once per process."""
        return shared_engine(self.registry, self.model, name, other_model=self.other_model)

    def records(self, host: str, probes: Sequence[tuple[object, Settings]]) -> list[dict]:
        """Answers of `host` (a name from HONEST or CHEATS) to the probes. Cheats that
        need sampled probes (greedy-when-sampling) answer only those."""
        key = (host, tuple((getattr(p, "id", id(p)), s) for p, s in probes))
        if key not in self._memo:
            self._memo[key] = self._records(host, probes)
        return [dict(r) for r in self._memo[key]]

    def _records(self, host: str, probes: Sequence[tuple[object, Settings]]) -> list[dict]:
        rng = random.Random(self.seed)
        kind = host
        if kind == "honest-transformers-fp32":
            return answer_records(self.engine("fp32"), probes, host, self.model)
        if kind == "honest-transformers-bf16":
            return answer_records(self.engine("bf16"), probes, host, self.model)
        if kind == "honest-llama.cpp":
            return answer_records(self.engine("llama.cpp"), probes, host, self.model)
        if kind == "honest-llama.cpp-stripped":  # as an API that strips whitespace returns them
            return [{**r, "host": host, "response": r["response"].strip()}
                    for r in self.records("honest-llama.cpp", probes)]
        if kind == "cheat-other-model":
            return answer_records(self.engine("other"), probes, host, self.model)
        if kind == "cheat-layers-removed":
            return answer_records(self.engine("minus-layers"), probes, host, self.model)
        if kind == "cheat-hotter":
            return answer_records(SettingsOverride(self.engine("fp32"), hotter, host), probes, host, self.model)
        if kind == "cheat-greedy-when-sampling":
            sampled = [p for p in probes if not p[1].greedy]
            return answer_records(SettingsOverride(self.engine("fp32"), greedy, host), sampled, host, self.model)
        if kind == "cheat-truncated":  # long honest answers cut short, without end of sequence
            return [{**r, "host": host,
                     "response": truncate(r["response"], rng) if len(r["response"]) > 60 else r["response"]}
                    for r in self.records("honest-llama.cpp", probes)]
        if kind == "cheat-replayed":  # each probe gets the honest answer of another probe
            honest = self.records("honest-transformers-fp32", probes)
            shift = max(1, len(honest) // 3)
            return [{**r, "host": host, "response": honest[(i + shift) % len(honest)]["response"]}
                    for i, r in enumerate(honest)]
        raise KeyError(f"unknown host behaviour {host!r}")
