"""The validator's own configuration: a YAML file (validator/configs/validator.yaml
ships as an example; `validator init` writes a production one), then the environment:
every key can be set by a `VALIDATOR_` variable, nested keys joined by `__`
(VALIDATOR_DATABASE, VALIDATOR_ROUNDS__INTERVAL_S, VALIDATOR_SERVE__LLM__WEIGHTS__JUDGE;
lists as JSON), read by pydantic-settings; the environment wins over the file. Checked
by pydantic, so a typo in a key is an error at start, not a silent default months later.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import EnvSettingsSource
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from validator.probing.client import Timeouts, Wire
from validator.configs import resolve, shipped

DEFAULT_CONFIG = shipped("validator.yaml")
ENV_PREFIX = "VALIDATOR_"


def redact_url(url: str) -> str:
    """A database URL fit to print or log: the password masked (a file path is as is)."""
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "<unparsable database URL>"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoundsConfig(_Strict):
    # A round every interval (the lease over a host's probes); rounds start at a phase
    # keyed by the secret, not at multiples of the interval (docs/probes.md).
    interval_s: float = Field(900, gt=0)
    jitter_s: float = Field(0, ge=0)  # ignored: every probe leaves at its own random time
    # A host's probes leave at independent random times within this much of the round
    # (Poisson arrivals at probes_per_host / spread_s); None: the whole interval. 0: at once.
    spread_s: float | None = Field(None, ge=0)
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
    backoff_s: float = Field(15, gt=0)  # a retry waits U(b, 2b), b = backoff_s * 2^n (at most 60 s)
    # The request's headers, in order (None: those of the network's Python client, which
    # posts with `requests`); and the body fields that carry max_tokens.
    headers: dict[str, str] | None = None
    max_tokens_fields: list[str] = Field(default_factory=lambda: ["max_new_tokens"], min_length=1)

    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.connect_s, first_byte=self.first_byte_s, total=self.total_s,
                        max_bytes=self.max_bytes, retries=self.retries,
                        backoff_base=self.backoff_s, backoff_cap=max(60.0, self.backoff_s))

    def wire(self) -> Wire:
        extra = {} if self.headers is None else {"headers": tuple(self.headers.items())}
        return Wire(max_tokens_fields=tuple(self.max_tokens_fields), **extra)


# Weights of the /validator/v1/llm components (validator.web.llm_endpoint): a pair's score
# is the weighted mean of the components it has. The network's methodology weighs cosine
# similarity, an LLM judge and human feedback equally; fidelity is the reference model's
# evidence that the response is the claimed model's. A plug-in component gets weight 0
# until the config names it.
DEFAULT_LLM_WEIGHTS = {"cosine": 0.25, "judge": 0.25, "feedback": 0.25, "fidelity": 0.25,
                       "reference_similarity": 0.0}


class LlmEndpointConfig(_Strict):
    model: str | None = None  # registry name when a request names none (default smollm2-135m)
    public: bool = False  # callable without a token (the network's own example sends none)
    rerun: bool = True  # generate the reference's own answer (reference_similarity)
    max_pairs: int = Field(64, ge=1)  # pairs per request
    max_chars: int = Field(20_000, ge=1)  # per prompt, response or ground truth
    max_tokens: int = Field(1024, ge=1)  # largest configs.max_tokens accepted (bounds the re-run)
    judge_model: str | None = None  # registry name of the `judge` component's model (default: the reference)
    # Component name -> weight; names not given keep their defaults (DEFAULT_LLM_WEIGHTS).
    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_LLM_WEIGHTS))

    @field_validator("weights")
    @classmethod
    def _weights(cls, given: dict[str, float]) -> dict[str, float]:
        weights = {**DEFAULT_LLM_WEIGHTS, **given}
        bad = [k for k, v in weights.items() if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(f"weights must be finite and >= 0: {', '.join(bad)}")
        if not any(weights.values()):
            raise ValueError("the llm weights must not all be 0")
        return weights


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
    # Reader tokens (and public reads) see a probe and its answer only this long after it
    # was sent, so a host cannot read which of its requests were probes; admins see all.
    probe_delay_s: float = Field(86_400, ge=0)
    llm: LlmEndpointConfig = LlmEndpointConfig()


CREDENTIALS_KEY = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class HostEntry(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str
    model: str
    # Which credentials the validator uses with this host (validator.service.credentials):
    # VALIDATOR_CRED_<KEY>_TOKEN etc. or the secrets file's entry KEY; default: the name.
    credentials: str | None = Field(None, pattern=CREDENTIALS_KEY)
    # True: the URL is a gateway in front of several hosts; each answer is attributed to
    # the host the response names (`attribution`), when that host is known.
    gateway: bool = False


class AttributionConfig(_Strict):
    """Where a gateway's response names the host that served it (docs/production.md,
    "Attribution"): a response header, or a field of the JSON body as a dotted path
    (e.g. data.data.served_by). Both may be set; the header is read first."""
    header: str | None = Field("X-Served-By", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
    body_field: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length=256)


class ValidatorConfig(_Strict):
    database: str = "validator.db"  # a file path (SQLite) or a SQLAlchemy URL
    instance: str | None = None  # this validator's name in leases; default host-pid
    secret: str | None = None  # probe derivation key; prefer secret_env
    secret_env: str = "VALIDATOR_SECRET"
    prompts: str | list[str] = "configs/prompts/general.yaml"  # bank files or directories
    settings_mix: str = "default"
    settings_file: str | None = None  # holds the mixes; default configs/settings.yaml
    models: str | None = None  # model registry file
    rounds: RoundsConfig = RoundsConfig()
    scoring: ScoringConfig = ScoringConfig()
    client: ClientConfig = ClientConfig()
    reputation: dict = Field(default_factory=dict)  # validator.reputation.ReputationConfig keys
    hosts: list[HostEntry] = Field(default_factory=list)  # added to the database at start
    credentials_file: str | None = None  # YAML secrets file of host credentials (mode 0600)
    attribution: AttributionConfig = AttributionConfig()
    serve: ServeConfig = ServeConfig()  # `validator serve`: REST API, dashboard, /metrics

    @classmethod
    def load(cls, path: str | Path | None = None, *, database: str | None = None) -> "ValidatorConfig":
        """The file at `path` (default: the shipped example), overridden by VALIDATOR_
        variables, then by `database` (a command's --db) when given."""
        path = resolve(path or DEFAULT_CONFIG)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"config {path}: expected a mapping of keys, got {type(raw).__name__}")
            env = EnvSettingsSource(cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                    case_sensitive=False)()
            merged = _merge(raw, env)
            if database:
                merged["database"] = database
            config = cls.model_validate(merged)
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        except ValidationError as exc:
            raise ValueError(f"config {path} (and {ENV_PREFIX}* variables): {exc}") from exc
        if "://" not in config.database:  # a file path: relative to where the command runs
            config.database = str(Path(config.database).expanduser().resolve())
        return config

    @property
    def database_url(self) -> str:
        return self.database if "://" in self.database else f"sqlite:///{self.database}"

    @property
    def database_shown(self) -> str:
        """The database URL with its password masked: what is printed and logged."""
        return redact_url(self.database_url)

    def instance_name(self) -> str:
        return self.instance or f"{socket.gethostname()}-{os.getpid()}"

    def probe_mix(self):
        """The settings mix probes are drawn from (only settings a user can send)."""
        from validator.probing.probes import SETTINGS_FILE, load_probe_mix

        return load_probe_mix(self.settings_mix, self.settings_file or SETTINGS_FILE)

    def probe_secret(self) -> str:
        secret = self.secret or os.environ.get(self.secret_env)
        if not secret:
            raise ValueError(f"no probe secret: set {self.secret_env} or `secret:` in the config")
        return secret


def _merge(base: dict, override: dict) -> dict:
    """`base` with `override` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
