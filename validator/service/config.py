"""The validator's own configuration (configs/validator.yaml), checked by pydantic so a
typo is an error at start, not a silent default months later."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from validator.probing.client import Timeouts
from validator.models.registry import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "validator.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundsConfig(_Strict):
    interval_s: float = Field(900, gt=0)  # a round every interval; round number = time // interval
    jitter_s: float = Field(60, ge=0)  # each round starts up to this late (APScheduler jitter)
    spread_s: float = Field(120, ge=0)  # hosts within a round start at random offsets up to this
    probes_per_host: int = Field(4, ge=1)
    concurrency: int = Field(32, ge=1)  # probes in flight at once, over all hosts
    claim_batch: int = Field(50, ge=1)  # hosts claimed per database round trip
    lease_s: float = Field(1800, gt=0)  # a host's round returns to the pool after this


class ScoringConfig(_Strict):
    interval_s: float = Field(10, gt=0)
    batch: int = Field(64, ge=1)  # answers scored together (across hosts)
    lease_s: float = Field(900, gt=0)
    rerun: bool = False  # also re-run each probe for similarity metrics (costs a generation)


class ClientConfig(_Strict):
    connect_s: float = Field(5, gt=0)
    first_byte_s: float = Field(60, gt=0)
    total_s: float = Field(180, gt=0)
    max_bytes: int = Field(1 << 20, ge=1)
    retries: int = Field(2, ge=0)

    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.connect_s, first_byte=self.first_byte_s, total=self.total_s,
                        max_bytes=self.max_bytes, retries=self.retries)


class LlmWeights(_Strict):
    """Weights of the /validator/v1/llm components (a pair's score is the weighted mean of
    the components it has; the network's methodology weighs cosine similarity, an LLM
    judge and human feedback equally)."""
    cosine: float = Field(0.25, ge=0)  # response vs ground truth, sentence embeddings
    judge: float = Field(0.25, ge=0)  # the reference model's p-value for the response
    feedback: float = Field(0.25, ge=0)  # stored human ratings of the named host
    reference_similarity: float = Field(0.0, ge=0)  # response vs the reference's own answer (reported)

    @model_validator(mode="after")
    def _some_weight(self) -> "LlmWeights":
        if not any(self.model_dump().values()):
            raise ValueError("the llm weights must not all be 0")
        return self


class LlmEndpointConfig(_Strict):
    model: str | None = None  # registry name when a request names none (default smollm2-135m)
    public: bool = False  # callable without a token (the network's own example sends none)
    rerun: bool = True  # generate the reference's own answer (reference_similarity)
    max_pairs: int = Field(64, ge=1)  # pairs per request
    max_chars: int = Field(20_000, ge=1)  # per prompt, response or ground truth
    max_tokens: int = Field(1024, ge=1)  # largest configs.max_tokens accepted (bounds the re-run)
    weights: LlmWeights = LlmWeights()


class ServeConfig(_Strict):
    host: str = "127.0.0.1"  # bind address of `validator serve`
    port: int = Field(8080, ge=0, le=65535)
    public_reads: bool = False  # API reads, dashboard and /metrics without a token
    # Request bodies past these get 413 before anything parses them (validator.web.limits);
    # the default fits /validator/v1/llm at its own caps in any usual encoding.
    max_body_bytes: int = Field(16 << 20, ge=1)
    max_login_bytes: int = Field(16 << 10, ge=1)  # the /login form: a token and a path
    # Calls that spend model time (POST /validator/v1/llm, a probe's page or API read that
    # recomputes with the scorer) per token, or per client address without one; 0: no limit.
    model_calls_per_minute: int = Field(30, ge=0)
    llm: LlmEndpointConfig = LlmEndpointConfig()


class HostEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str
    model: str
    token_env: str | None = None


class ValidatorConfig(_Strict):
    database: str = "validator.db"  # a file path (SQLite) or a SQLAlchemy URL
    instance: str | None = None  # this validator's name in leases; default host-pid
    secret: str | None = None  # probe derivation key; prefer secret_env
    secret_env: str = "VALIDATOR_SECRET"
    prompts: str = "configs/prompts/general.yaml"
    settings_mix: str = "default"
    models: str | None = None  # model registry file
    rounds: RoundsConfig = RoundsConfig()
    scoring: ScoringConfig = ScoringConfig()
    client: ClientConfig = ClientConfig()
    reputation: dict = Field(default_factory=dict)  # validator.reputation.ReputationConfig keys
    hosts: list[HostEntry] = Field(default_factory=list)  # added to the database at start
    serve: ServeConfig = ServeConfig()  # `validator serve`: REST API, dashboard, /metrics

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ValidatorConfig":
        path = Path(path or DEFAULT_CONFIG)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            config = cls.model_validate(raw)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        except ValidationError as exc:
            raise ValueError(f"config {path}: {exc}") from exc
        if "://" not in config.database:  # a file path: relative to where the command runs
            config.database = str(Path(config.database).expanduser().resolve())
        return config

    @property
    def database_url(self) -> str:
        return self.database if "://" in self.database else f"sqlite:///{self.database}"

    def instance_name(self) -> str:
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"

    def probe_secret(self) -> str:
        secret = self.secret or os.environ.get(self.secret_env)
        if not secret:
            raise ValueError(f"no probe secret: set {self.secret_env} or `secret:` in the config")
        return secret
