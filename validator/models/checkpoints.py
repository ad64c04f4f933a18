"""One loading path for every checkpoint kind, the chat template a claimed model renders
prompts with, and the memory budgets of the reference's passes.

- load_model / load_tokenizer: a hub id, a local transformers directory or a GGUF in an
  installed package (converted to a transformers directory once, see registry.py), in
  the entry's dtype, on its device (`cuda:N` honoured). What an operator can fix (no
  CUDA build of torch, a gated or missing checkpoint, a wrong path) comes back as one
  line naming the fix (CheckpointUnavailable), never a traceback.
- chat_template / render_chat: the template of an entry without loading its weights,
  rendered the way transformers renders it, so a probe that the reference would refuse
  is known before it is sent.
- Budgets: positions per forward pass, keys and values kept between passes, and rows of
  float32 [rows x vocabulary] logits reduced at once; from the entry's `budgets` in
  models.yaml, else derived from the device's free memory once the weights are loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from validator.models.registry import ModelSpec, RegistryError

log = logging.getLogger(__name__)


class CheckpointUnavailable(RuntimeError):
    """A checkpoint this machine cannot load; the message is one line naming the fix."""


# -- devices ---------------------------------------------------------------------------
def resolve_device(spec: ModelSpec) -> str:
    """The entry's device: `auto` is CUDA when torch has it, else the CPU; an explicit
    CUDA device this torch cannot use is an error naming the fix."""
    import torch

    device = spec.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise CheckpointUnavailable(
                f"model {spec.name!r}: device {device} but torch {torch.__version__} ({build}) has no "
                "usable GPU: install the CUDA build of torch (https://pytorch.org/get-started/locally/) "
                "or set the entry's device to cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CheckpointUnavailable(
                f"model {spec.name!r}: device {device} but only {torch.cuda.device_count()} GPU(s) are "
                "visible (CUDA_VISIBLE_DEVICES?): set the entry's device in models.yaml")
    elif device != "cpu":
        raise CheckpointUnavailable(f"model {spec.name!r}: unknown device {device!r} (auto, cpu, cuda or cuda:N)")
    return device


def free_memory(device: str) -> int:
    """Bytes free on `device` now (CUDA: the driver's count; CPU: MemAvailable)."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- loading ---------------------------------------------------------------------------
def _source(spec: ModelSpec) -> str:
    ckpt = spec.checkpoint
    if "dir" in ckpt:
        path = Path(ckpt["dir"]).expanduser()
        if not path.is_dir():
            raise CheckpointUnavailable(
                f"model {spec.name!r}: checkpoint directory {path} does not exist: set the entry's "
                "checkpoint.dir in models.yaml to a directory holding config.json and the weights")
        if not (path / "config.json").exists():
            raise CheckpointUnavailable(
                f"model {spec.name!r}: {path} has no config.json: not a transformers checkpoint "
                "(save it with save_pretrained, or convert it)")
        return str(path)
    try:
        return spec.load_source()
    except RegistryError as exc:
        raise CheckpointUnavailable(str(exc)) from None


def _explain(spec: ModelSpec, exc: BaseException) -> str:
    """One line for the operator: what is missing and how to get it."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain, cause = [], exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    hub = spec.checkpoint.get("hub")
    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if any(isinstance(c, GatedRepoError) for c in chain) or "gated repo" in str(exc):
        return (f"model {spec.name!r}: {hub} is gated: accept its licence at https://huggingface.co/{hub} "
                f"with your account and set HF_TOKEN to a read token of that account ({token})")
    if any(isinstance(c, RepositoryNotFoundError) for c in chain):
        return (f"model {spec.name!r}: the hub has no repository {hub} this token may read ({token}): "
                "check the id in models.yaml and HF_TOKEN")
    if any(isinstance(c, LocalEntryNotFoundError) for c in chain):
        return (f"model {spec.name!r}: {hub} is not in the local cache and the hub cannot be reached "
                f"(offline, or HF_HUB_OFFLINE set): download it once with network access ({token}), "
                "or point the entry at a local copy with checkpoint.dir")
    return f"model {spec.name!r}: cannot load {hub or spec.checkpoint}: {type(exc).__name__}: {exc}".splitlines()[0]


def load_tokenizer(spec: ModelSpec, source: str | None = None):
    from transformers import AutoTokenizer

    source = source or _source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise CheckpointUnavailable(_explain(spec, exc)) from exc
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    return tokenizer


def load_model(spec: ModelSpec, *, dtype: str | None = None, device: str | None = None,
               attention: str | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, device): the entry's checkpoint in `dtype` (default: the
    entry's) on `device` (default: the entry's), evaluation mode. `attention`: a
    transformers attn_implementation (sdpa, eager), default transformers' choice."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(spec)
    source = _source(spec)
    tokenizer = load_tokenizer(spec, source)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype or spec.dtype)}
    if attention:
        kwargs["attn_implementation"] = attention
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise CheckpointUnavailable(_explain(spec, exc)) from exc
    try:
        model = model.to(device).eval()
    except torch.OutOfMemoryError as exc:
        raise CheckpointUnavailable(
            f"model {spec.name!r}: its weights do not fit in {device}'s free memory "
            f"({free_memory(device) / 2**30:.1f} GiB free): free the GPU or use a larger one") from exc
    return model, tokenizer, device


# -- chat templates --------------------------------------------------------------------
def chat_template(spec: ModelSpec) -> str | None:
    """The template a claimed model's prompts are rendered with, found without loading
    weights: the registry's own, else the checkpoint's (a directory's tokenizer files,
    the hub's cached tokenizer_config.json, a GGUF's metadata). None when none is found."""
    if spec.chat_template:
        return spec.chat_template
    ckpt = spec.checkpoint
    try:
        if "dir" in ckpt:
            return _template_in_dir(Path(ckpt["dir"]).expanduser())
        if "hub" in ckpt:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ckpt["hub"], "tokenizer_config.json")
            return _template_in_dir(Path(cached).parent) if isinstance(cached, str) else None
        if ckpt.get("file"):  # a GGUF shipped as a file: its metadata holds the template
            path = spec.gguf_path()
            return _gguf_template(str(path), path.stat().st_mtime)
    except (OSError, ValueError, RegistryError, ImportError, KeyError, IndexError):
        log.debug("no chat template found for %s", spec.name, exc_info=True)
    return None


@functools.lru_cache(maxsize=16)
def _gguf_template(path: str, mtime: float) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).get_field("tokenizer.chat_template")  # reads every tensor's header: seconds
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _template_in_dir(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


class TemplateRefused(ValueError):
    """The chat template raised (e.g. a system turn the model does not take)."""


def render_chat(template: str, messages: Sequence[dict], bos: str = "<bos>", eos: str = "<eos>") -> str:
    """`template` rendered as transformers' apply_chat_template renders it (a sandboxed
    Jinja environment with trimmed blocks and raise_exception)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateRefused(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=True,
                                                bos_token=bos, eos_token=eos)
    except TemplateError as exc:
        raise TemplateRefused(f"the chat template fails: {exc}") from exc


# -- memory budgets --------------------------------------------------------------------
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """An int (bytes) or a size such as "4GiB", "512 MiB", "2GB"."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise RegistryError(f"not a size: {value!r} (bytes, or e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


# Caps of the derived budgets: beyond these a larger pass stops paying (measured in
# benchmarks/gpu_scoring.py on an H200; the CPU figures are the ones the tests ran with).
_CAPS = {"cpu": {"batch_tokens": 8192, "kept_kv_bytes": 4 << 30, "logit_rows": 256},
         "cuda": {"batch_tokens": 65536, "kept_kv_bytes": 16 << 30, "logit_rows": 1 << 20}}


@dataclass(frozen=True)
class Budgets:
    """What one reference may hold beyond its weights, per call."""

    batch_tokens: int  # positions (rows x columns, padding included) per forward pass
    kept_kv_bytes: int  # keys and values held between passes (aligner pasts), and the most
    # one pass's own cache (a batch's pasts and new positions, a re-run's cache) may hold
    logit_bytes: int  # float32 [rows x vocabulary] logits (and their log-softmax) at once
    align_chunk: int  # answers aligned together (each alignment round is one batched pass)
    source: str  # where the figures came from, for logs and `validator models`

    def logit_rows(self, vocab: int) -> int:
        return max(1, self.logit_bytes // (4 * vocab))

    def as_dict(self) -> dict:
        return {"batch_tokens": self.batch_tokens, "kept_kv_bytes": self.kept_kv_bytes,
                "logit_bytes": self.logit_bytes, "align_chunk": self.align_chunk, "source": self.source}


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values one position holds across all decoder layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_hidden_layers * 2 * heads * dim * dtype_bytes)


def activation_bytes_per_token(config, dtype_bytes: int) -> int:
    """A decoder layer's working set per position (hidden states, attention projections,
    the MLP's gate, up and product), the larger of which a pass holds at its peak."""
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return int(dtype_bytes * (4 * config.hidden_size + 3 * heads * dim + 3 * inter))


def derive_budgets(spec: ModelSpec, config, device: str, dtype_bytes: int, vocab: int,
                   free: int | None = None) -> Budgets:
    """The entry's `budgets` (models.yaml), each figure not given derived from the
    device's free memory (measured now, after the weights are loaded): `memory_fraction`
    of it (default 0.8) is shared out as an eighth to keys and values held between
    passes (a pass's own cache is bounded by the same figure: a quarter in all), a
    sixteenth to logits, and half to the activations of one pass's positions; each
    within the caps above (CPU figures: the ones the default test run uses)."""
    given = dict(spec.extra.get("budgets") or {})
    unknown = set(given) - {"batch_tokens", "kept_kv_bytes", "logit_bytes", "align_chunk", "memory_fraction"}
    if unknown:
        raise RegistryError(f"model {spec.name!r}: unknown budgets {sorted(unknown)}")
    kind = "cpu" if device == "cpu" else "cuda"
    caps = _CAPS[kind]
    fraction = float(given.get("memory_fraction", 0.8))
    if not 0 < fraction <= 1:
        raise RegistryError(f"model {spec.name!r}: budgets.memory_fraction must be in (0, 1]")
    free = free_memory(device) if free is None else free
    usable = int(free * fraction)
    per_token = activation_bytes_per_token(config, dtype_bytes)
    derived = {
        "kept_kv_bytes": min(caps["kept_kv_bytes"], usable // 8),
        "logit_bytes": 4 * vocab * max(1, min(caps["logit_rows"], (1 << 27) // vocab if kind == "cuda"
                                              else caps["logit_rows"], usable // 16 // (4 * vocab))),
        "batch_tokens": max(256, min(caps["batch_tokens"], usable // 2 // per_token) // 256 * 256),
        "align_chunk": 64 if kind == "cpu" else 256,
    }
    out = {}
    for key, value in derived.items():
        if key in given:
            out[key] = parse_bytes(given[key]) if key.endswith("bytes") else int(given[key])
            if out[key] <= 0:
                raise RegistryError(f"model {spec.name!r}: budgets.{key} must be positive")
        else:
            out[key] = value
    told = sorted(set(given) & set(derived))
    source = ("models.yaml" if len(told) == len(derived) else
              f"{'models.yaml (' + ', '.join(told) + ') and ' if told else ''}"
              f"{fraction:g} of {free / 2**30:.1f} GiB free on {device}")
    return Budgets(**out, source=source)
