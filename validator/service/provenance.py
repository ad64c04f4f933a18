"""What produced a verdict, stored with every score so that it can be explained or
reproduced months later: the reference checkpoint's identity (a file hash, or the hub
revision it was loaded at), the calibration file's hash, the verdict rule and the
validator's version."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import threading
from pathlib import Path
from typing import Any

from validator import __version__
from validator.models.registry import ModelSpec, cache_dir
from validator.scoring.verdict import VerdictRule

_HASH_FILES = ("*.safetensors", "*.bin", "*.gguf", "config.json", "tokenizer.json", "tokenizer.model",
               "tokenizer_config.json", "generation_config.json")
_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) in the cache: a 15 GB
    checkpoint is read once, not at every start."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    with _lock:
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        known[key] = digest.hexdigest()
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(index)
        return known[key]


def _dir_digest(root: Path) -> str:
    """One hash over the weight, config and tokenizer files of a checkpoint directory."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in _HASH_FILES for p in root.glob(pattern) if p.is_file()})
    for p in files:
        digest.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()


def checkpoint_identity(spec: ModelSpec, loaded_revision: str | None = None) -> dict[str, Any]:
    """The reference's identity. `loaded_revision`: the hub commit the weights were
    loaded at (transformers records it as config._commit_hash)."""
    ckpt = spec.checkpoint
    if "hub" in ckpt:
        return {"kind": "hub", "id": ckpt["hub"], "revision": loaded_revision or ckpt.get("revision")}
    if "dir" in ckpt:
        path = Path(spec.load_source())
        return {"kind": "dir", "path": str(path), "sha256": _dir_digest(path)}
    gguf = spec.gguf_path()
    try:
        version = importlib.metadata.version(ckpt["package"].replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"kind": "package", "package": ckpt["package"], "version": version, "file": gguf.name,
            "sha256": file_sha256(gguf)}


def calibration_identity(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None  # built-in tolerances: the verdict says so in its metrics
    return {"file": path.name, "sha256": file_sha256(path)}


def provenance(spec: ModelSpec, rule: VerdictRule, loaded_revision: str | None = None) -> dict[str, Any]:
    return {"model": spec.name, "dtype": spec.dtype,
            "checkpoint": checkpoint_identity(spec, loaded_revision),
            "calibration": calibration_identity(spec.calibration),
            "verdict_rule": dataclasses.asdict(rule), "validator": __version__}



def describe(body: dict[str, Any] | None) -> str:
    """One line for people: which reference, calibration, rule and validator scored."""
    if not body:
        return "not recorded (scored before provenance was stored, or an error)"
    ck = body.get("checkpoint") or {}
    if ck.get("kind") == "hub":
        ref = f"{ck.get('id')}@{(ck.get('revision') or 'unknown revision')[:12]}"
    elif ck.get("kind") == "package":
        ref = f"{ck.get('package')} {ck.get('version') or ''} {ck.get('file')} sha256:{str(ck.get('sha256'))[:12]}"
    else:
        ref = f"{ck.get('path')} sha256:{str(ck.get('sha256'))[:12]}"
    cal = body.get("calibration")
    cal_text = f"{cal['file']} sha256:{cal['sha256'][:12]}" if cal else "built-in tolerances (uncalibrated)"
    rule = body.get("verdict_rule") or {}
    return (f"{body.get('model')} ({body.get('dtype')}) from {ref}; calibration {cal_text}; "
            f"rule fail<{rule.get('fail_below')} pass>={rule.get('pass_from')}; validator {body.get('validator')}")
