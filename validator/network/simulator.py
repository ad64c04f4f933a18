"""A simulated Flexstack network on loopback: hosts that answer the text-completion API
honestly on other engines, dishonestly in the ways hosts cheat, or brokenly in the ways
servers break, behind the Flexstack text-completion API (login, token refresh, model
list, completions plain or streamed; docs/flexstack-api.md).

One uvicorn server listens on one port per host, plus one for the gateway; the port a
request arrives on says which host it is for. Every model-backed host draws its answers
from validator.network.engines, so each model is loaded once per process and shared.

A strategy is a plug-in: subclass `Strategy`, give it a `name`, its `engines` (the
default `answer` generates with the first) and an `Options` model, override `answer`
(the text a host returns) or, for faults, `respond` (the whole HTTP response), and
decorate it with `@strategy`. A new cheat is a few lines.

The strategies are the one catalogue of host behaviours: validator.network.catalogue
names the configurations the tests, calibration and benchmarks use and runs their
`answer` without HTTP (OfflineNetwork), so recorded answers come from this same code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import random
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs
from typing import Any, AsyncIterator, ClassVar, Literal

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from validator.network.engines import Request as EngineRequest
from validator.network.engines import shared_engine, transformers_engine
from validator.configs import resolve
from validator.models.registry import Registry
from validator.models.sampling import Settings, SettingsError

log = logging.getLogger(__name__)

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


# --------------------------------------------------------------------------- config

class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str
    password: str
    token_ttl_s: float = Field(7_776_000, gt=0)  # what the real API hands out (90 days)


class HostConfig(BaseModel):
    """One host. Keys other than these are the strategy's options."""
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=NAME)
    strategy: str
    model: str | None = None  # the model the host claims; default: the network's
    port: int | None = Field(None, ge=0, le=65535)


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("gateway", pattern=NAME)
    hosts: list[str] | None = None  # None: every host
    policy: Literal["round-robin", "random"] = "round-robin"
    seed: int = 0
    port: int | None = Field(None, ge=0, le=65535)


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2-135m"
    bind: str = "127.0.0.1"
    credentials: Credentials | None = None  # None: any bearer token, or none, is accepted
    models: str | None = None  # model registry file; default the shipped models.yaml
    hosts: list[HostConfig] = Field(min_length=1)
    gateway: GatewayConfig | None = None

    @classmethod
    def load(cls, path: str | Path) -> "NetworkConfig":
        path = resolve(path)
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read network file {path}: {exc}") from exc
        except ValidationError as exc:
            raise ValueError(f"network file {path}: {exc}") from exc


# --------------------------------------------------------------------------- strategies

@dataclass(frozen=True)
class Call:
    """One well-formed completion request, as a host sees it."""
    host: str
    messages: list[dict]
    configs: dict
    settings: Settings
    stream: bool
    started: float
    client: str


class Strategy:
    """How one host answers. Subclasses set `name`, optionally `Options` and
    `engines` (engine names from validator.network.engines to load before serving), and
    `ordered` when an answer depends on the calls before it (the offline runner then
    makes its calls one at a time, in order, instead of all at once)."""

    name: ClassVar[str]
    engines: ClassVar[tuple[str, ...]] = ()
    ordered: ClassVar[bool] = False

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, network: "Network", host: HostConfig):
        self.network, self.host = network, host
        self.model = host.model or network.config.model
        try:
            self.options = self.Options.model_validate(host.model_extra or {})
        except ValidationError as exc:
            raise ValueError(f"host {host.name!r} (strategy {self.name}): {exc}") from exc

    def load(self) -> None:
        for engine in self.engines:
            self.network.engine(self.model, engine)

    async def generate(self, call: Call, engine: str, settings: Settings | None = None) -> str:
        return await self.network.generate(self.model, engine, call.messages,
                                           settings or call.settings)

    async def answer(self, call: Call) -> str:
        """By default: the host's one engine, with the request's own settings."""
        if not self.engines:
            raise NotImplementedError(f"strategy {self.name} names no engine and no answer()")
        return await self.generate(call, self.engines[0])

    async def respond(self, call: Call, request: Request) -> Response:
        return render(call, await self.answer(call))


STRATEGIES: dict[str, type[Strategy]] = {}


def strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


@strategy
class HonestTransformers(Strategy):
    """transformers' generate() in `dtype` with `attention`, batching up to `batch`
    requests of the same settings (left padding; offline, the requests that arrive
    together; over HTTP each request runs alone)."""
    name = "honest-transformers"

    class Options(Strategy.Options):
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        attention: Literal["sdpa", "eager"] = "sdpa"
        batch: int = Field(32, ge=1, le=1024)

    @property
    def engines(self):  # type: ignore[override]
        return (transformers_engine(self.options.dtype, self.options.attention, self.options.batch),)


@strategy
class HonestLlamaCpp(Strategy):
    """llama.cpp on the model's GGUF. `strip`: the whitespace around the answer that the
    host's API removes, as some do: none, both ends, the leading end, or either (both or
    the leading end, chosen per request)."""
    name = "honest-llama.cpp"
    engines = ("llama.cpp",)

    class Options(Strategy.Options):
        strip: Literal["none", "both", "leading", "either"] = "none"

    async def answer(self, call):
        text = await self.generate(call, "llama.cpp")
        how = self.options.strip
        if how == "either":
            how = ("both", "leading")[_request_key(call) % 2]
        return {"none": text, "both": text.strip(), "leading": text.lstrip()}[how]


@strategy
class OtherModel(Strategy):
    """A different (smaller, cheaper) model claiming to be the requested one: the
    registry's model `serves`, on llama.cpp."""
    name = "other-model"

    class Options(Strategy.Options):
        serves: str = "gemma-3-270m"

    def load(self) -> None:
        self.network.engine(self.options.serves, "llama.cpp")

    async def answer(self, call):
        return await self.network.generate(self.options.serves, "llama.cpp", call.messages, call.settings)


@strategy
class LayersRemoved(Strategy):
    name = "layers-removed"
    engines = ("minus-layers",)


@strategy
class Requantised(Strategy):
    """The claimed model with its weights re-quantised to 4 bits (round to nearest)."""
    name = "requantised"
    engines = ("requantised",)


@strategy
class Fp8Weights(Strategy):
    """The claimed model with its weights stored in FP8 (e4m3, one scale per row): a
    lower-precision deployment, much closer to the model than a 4-bit re-quantisation."""
    name = "fp8-weights"
    engines = ("fp8-weights",)


@strategy
class SettingsIgnored(Strategy):
    """Answers with its own fixed sampling settings, whatever the request asks."""
    name = "settings-ignored"
    engines = ("fp32",)

    class Options(Strategy.Options):
        temperature: float = 1.0
        top_k: int = 0
        top_p: float = 1.0

    async def answer(self, call):
        o = self.options
        return await self.generate(call, "fp32", replace(
            call.settings, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p))


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


@strategy
class Hotter(Strategy):
    name = "hotter"
    engines = ("fp32",)

    async def answer(self, call):
        return await self.generate(call, "fp32", hotter(call.settings))


@strategy
class GreedyWhenSampling(Strategy):
    name = "greedy-when-sampling"
    engines = ("fp32",)

    async def answer(self, call):
        return await self.generate(call, "fp32", greedy(call.settings))


@strategy
class Truncated(Strategy):
    """Honest answers cut short at a word boundary, without end of sequence."""
    name = "truncated"
    engines = ("llama.cpp",)

    async def answer(self, call):
        text = await self.generate(call, "llama.cpp")
        rng = random.Random(_request_key(call))
        return truncate(text, rng) if len(text) > 60 else text


@strategy
class Replayed(Strategy):
    """Answers each prompt with a stored answer to an earlier, different prompt; only
    a prompt it has nothing for is generated (and stored)."""
    name = "replayed"
    engines = ("llama.cpp",)
    ordered = True

    class Options(Strategy.Options):
        keep: int = Field(64, ge=1)

    def __init__(self, network, host):
        super().__init__(network, host)
        self.stored: OrderedDict[str, str] = OrderedDict()

    async def answer(self, call):
        key = _digest(call.messages)
        for other, text in reversed(self.stored.items()):
            if other != key:
                return text
        text = await self.generate(call, "llama.cpp")
        self.stored[key] = text
        while len(self.stored) > self.options.keep:
            self.stored.popitem(last=False)
        return text


STATIC_TEXT = "Here is a short answer.\n\nIt has two paragraphs, and a list:\n- one\n- two\n"


@strategy
class Static(Strategy):
    """The same text for every request, no model: cheap load for benchmarks."""
    name = "static"

    class Options(Strategy.Options):
        text: str = STATIC_TEXT

    async def answer(self, call):
        return self.options.text


# Faults: servers breaking. Each is documented with the error class the client records.

@strategy
class SlowFirstByte(Static):
    """Waits `delay_s` before sending anything (client: first_byte_timeout if its
    first-byte window is shorter, else a normal answer with a long ttfb)."""
    name = "slow-first-byte"

    class Options(Static.Options):
        delay_s: float = Field(5.0, ge=0)

    async def respond(self, call, request):
        if await _sleep_unless_gone(request, self.options.delay_s):
            return Response(status_code=499)
        return await super().respond(call, request)


@strategy
class Hang(Strategy):
    """Accepts the request and never answers (client: first_byte_timeout)."""
    name = "hang"

    async def respond(self, call, request):
        await _sleep_unless_gone(request, float("inf"))
        return Response(status_code=499)


@strategy
class ServerError(Static):
    """HTTP 500 with the error envelope on a share of requests (client: server_error)."""
    name = "server-error"

    class Options(Static.Options):
        fail_ratio: float = Field(1.0, ge=0, le=1)
        status: int = Field(500, ge=500, le=599)

    async def respond(self, call, request):
        if self.network.rng.random() < self.options.fail_ratio:
            return JSONResponse(envelope({}, call, status="error", errors=["worker unavailable"],
                                         description="the task queue returned an error"),
                                status_code=self.options.status)
        return await super().respond(call, request)


@strategy
class RateLimited(Static):
    """HTTP 429 with Retry-After on a share of requests (client: rate_limited)."""
    name = "rate-limited"

    class Options(Static.Options):
        fail_ratio: float = Field(1.0, ge=0, le=1)
        retry_after_s: int = Field(1, ge=0)

    async def respond(self, call, request):
        if self.network.rng.random() < self.options.fail_ratio:
            return JSONResponse({"detail": "Too many requests"}, status_code=429,
                                headers={"Retry-After": str(self.options.retry_after_s)})
        return await super().respond(call, request)


@strategy
class MalformedJson(Static):
    """A 200 whose body is broken JSON (non-streamed; client: malformed_json). Streams
    are plain text, so a streamed request gets the answer."""
    name = "malformed-json"

    async def respond(self, call, request):
        if call.stream:
            return await super().respond(call, request)
        return Response(b'{"data": {"is_success": true, "data": {"response": "Here is', 200,
                        media_type="application/json")


@strategy
class StreamCut(Static):
    """Sends part of the body, then drops the connection (client: stream_cut)."""
    name = "stream-cut"

    class Options(Static.Options):
        keep_ratio: float = Field(0.4, gt=0, lt=1)

    async def respond(self, call, request):
        body = encode(call, self.options.text)
        head = body[: max(1, int(len(body) * self.options.keep_ratio))]

        async def cut() -> AsyncIterator[bytes]:
            yield head
            await asyncio.sleep(0.05)
            raise DroppedConnection  # uvicorn closes the socket mid-body

        headers = {} if call.stream else {"Content-Length": str(len(body))}
        return StreamingResponse(cut(), headers=headers, media_type=_media(call))


@strategy
class Oversized(Strategy):
    """An answer of `size_bytes` (client: oversized once past its cap)."""
    name = "oversized"

    class Options(Strategy.Options):
        size_bytes: int = Field(8 << 20, ge=1)

    async def respond(self, call, request):
        size, block = self.options.size_bytes, b"All work and no play. " * 3000

        async def body() -> AsyncIterator[bytes]:
            if not call.stream:
                yield _JSON_HEAD
            left = size
            while left > 0:
                yield block[:left]
                left -= len(block)
                await asyncio.sleep(0)
            if not call.stream:
                yield _JSON_TAIL

        return StreamingResponse(body(), media_type=_media(call))


@strategy
class InvalidUtf8(Static):
    """An answer holding bytes that are not UTF-8 (client: invalid_utf8)."""
    name = "invalid-utf8"

    async def respond(self, call, request):
        raw = self.options.text.encode() + b"\xff\xfe broken \xc3("
        if call.stream:
            return Response(raw, 200, media_type="text/plain")
        body = encode(call, "@@ANSWER@@").replace(b"@@ANSWER@@", raw)
        return Response(body, 200, media_type="application/json")


class DroppedConnection(Exception):
    """Raised inside a streamed body to make the server drop the connection."""


_JSON_HEAD = b'{"status": "success", "errors": [], "data": {"is_success": true, "data": ' \
             b'{"status": "COMPLETED", "response": "'
_JSON_TAIL = b'"}}}'


# --------------------------------------------------------------------------- rendering

def envelope(data: Any, call: Call | None = None, *, status: str = "success",
             errors: list | None = None, description: str = "") -> dict:
    started = call.started if call else time.time()
    ended = time.time()
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    return {"data": data, "errors": errors or [], "error_description": description,
            "start_time": datetime.fromtimestamp(started).strftime(fmt),
            "end_time": datetime.fromtimestamp(ended).strftime(fmt),
            "host_of_client_call_request": call.client if call else "",
            "total_time_by_second": round(ended - started, 6), "status": status}


def encode(call: Call, text: str) -> bytes:
    """The body an honest server sends: raw text for a stream, else the envelope."""
    if call.stream:
        return text.encode("utf-8")
    model = str(call.configs.get("model", "gemma-7b"))
    echo = {**call.configs, "messages": call.messages,
            "task_type": "LLM-" + model.upper(),
            "queue_name": "llm_" + re.sub(r"\W", "_", model.lower()) + "_queue"}
    return json.dumps(envelope({"is_success": True, "configs": echo, "data": {
        "task_id": uuid.uuid4().hex, "total_tasks": 1, "percent": 100,
        "status": "COMPLETED", "response": text}}, call)).encode("utf-8")


def render(call: Call, text: str) -> Response:
    if not call.stream:
        return Response(encode(call, text), 200, media_type="application/json")

    async def lines() -> AsyncIterator[bytes]:  # chunked by newline, as the API streams
        for line in text.splitlines(keepends=True):
            yield line.encode("utf-8")
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


def _media(call: Call) -> str:
    return "text/plain; charset=utf-8" if call.stream else "application/json"


def _digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def _request_key(call: Call) -> int:
    """A request's identity by what it asks, whatever names its configs used on the wire
    (`max_tokens` or `max_new_tokens`, a `model` field or none): the same probe gets the
    same cut or stripping over HTTP and offline."""
    s = call.settings
    return _digest(call.messages, s.temperature, s.top_k, s.top_p, s.max_tokens)


async def _sleep_unless_gone(request: Request, seconds: float) -> bool:
    """Sleep; True as soon as the client has gone (so a hung handler ends with it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))
    return False


# --------------------------------------------------------------------------- the network

class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class CompletionBody(BaseModel):
    messages: list[Message] = Field(min_length=1)
    configs: dict[str, Any] = Field(default_factory=dict)


class _QuietDrops(logging.Filter):
    """uvicorn logs an app exception when we drop a connection on purpose; skip those."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, DroppedConnection):
                return False
            exc = exc.__cause__ or exc.__context__ or (
                exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else None)
        return True


class Network:
    """The hosts of a network config, each a strategy, and the engines they share.
    Subclasses decide how an engine's generation runs: SimulatedNetwork behind HTTP,
    validator.network.catalogue.OfflineNetwork in batches without it."""

    def __init__(self, config: NetworkConfig, registry: Registry | None = None):
        self.config = config
        self.registry = registry or Registry.load(config.models)
        self.rng = random.Random(0)
        names = [h.name for h in config.hosts]
        if len(set(names)) != len(names):
            raise ValueError("host names must be unique")
        unknown = sorted({h.strategy for h in config.hosts} - set(STRATEGIES))
        if unknown:
            raise ValueError(f"unknown strategies {unknown}; known: {', '.join(sorted(STRATEGIES))}")
        self.hosts: dict[str, Strategy] = {h.name: STRATEGIES[h.strategy](self, h)
                                           for h in config.hosts}

    def engine(self, model: str, name: str):
        return shared_engine(self.registry, model, name)

    async def generate(self, model: str, engine_name: str, messages: list[dict],
                       settings: Settings) -> str:
        raise NotImplementedError

    def load(self) -> None:
        """Load every model the hosts need (before serving, so the first probe is not slow)."""
        for host in self.hosts.values():
            host.load()


class SimulatedNetwork(Network):
    """Hosts (and a gateway) on loopback. Use `with SimulatedNetwork(cfg) as net:` to
    serve from a background thread, or `serve_forever()` from the main thread."""

    def __init__(self, config: NetworkConfig, registry: Registry | None = None):
        super().__init__(config, registry)
        names = list(self.hosts)
        self.gateway_hosts: list[str] = []
        if config.gateway:
            if config.gateway.name in self.hosts:
                raise ValueError(f"gateway name {config.gateway.name!r} is also a host")
            self.gateway_hosts = config.gateway.hosts or names
            missing = set(self.gateway_hosts) - set(names)
            if missing:
                raise ValueError(f"gateway routes to unknown hosts {sorted(missing)}")
            self._round_robin = itertools.cycle(self.gateway_hosts)
            self._gateway_rng = random.Random(config.gateway.seed)
        self.urls: dict[str, str] = {}
        self._by_port: dict[int, str] = {}
        self._sockets: list[socket.socket] = []
        # One thread per engine: engines are not thread-safe, and requests queued for a
        # slow engine must not hold the threads a fast one needs (with one shared pool,
        # threads waiting on a busy engine starved the others into first-byte timeouts).
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # access token -> expiry (time.time)
        self._refresh: set[str] = set()
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # -- models
    async def generate(self, model: str, engine_name: str, messages: list[dict],
                       settings: Settings) -> str:
        engine = self.engine(model, engine_name)
        with self._pools_lock:
            if id(engine) not in self._pools:
                self._pools[id(engine)] = ThreadPoolExecutor(1, thread_name_prefix=f"engine-{engine_name}")
            pool = self._pools[id(engine)]
        request = EngineRequest(messages, settings, settings.seed or 0)
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: engine.generate([request])[0])

    # -- sockets and serving
    def bind(self) -> dict[str, str]:
        """Open one listening socket per host (and the gateway); returns name -> base URL."""
        if self._sockets:
            return self.urls
        wanted = [(h.name, h.port or 0) for h in self.config.hosts]
        if self.config.gateway:
            wanted.append((self.config.gateway.name, self.config.gateway.port or 0))
        for name, port in wanted:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.config.bind, port))
            except OSError as exc:
                sock.close()
                self.close_sockets()
                raise OSError(f"host {name}: cannot listen on {self.config.bind}:{port}: {exc}") from exc
            sock.listen(2048)
            sock.set_inheritable(True)
            actual = sock.getsockname()[1]
            self._sockets.append(sock)
            self._by_port[actual] = name
            self.urls[name] = f"http://{self.config.bind}:{actual}/v1"
        return self.urls

    def close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, url, strategy) per host, then the gateway's."""
        rows = [(n, self.urls[n], s.name) for n, s in self.hosts.items()]
        if self.config.gateway:
            rows.append((self.config.gateway.name, self.urls[self.config.gateway.name],
                         "gateway(" + ",".join(self.gateway_hosts) + ")"))
        return rows

    def _uvicorn(self):
        import uvicorn

        logging.getLogger("uvicorn.error").addFilter(_QuietDrops())
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, timeout_keep_alive=5,
                                backlog=2048)
        self._server = uvicorn.Server(config)
        return self._server

    def serve_forever(self) -> None:
        """Serve from this thread until SIGINT/SIGTERM (uvicorn handles both)."""
        self.bind()

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        # uvicorn drains, then re-raises the signal it caught: end quietly with status 0.
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            asyncio.run(self._uvicorn().serve(sockets=self._sockets))
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.close_sockets()

    def start(self, timeout: float = 30.0) -> "SimulatedNetwork":
        self.bind()
        server = self._uvicorn()
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=self._sockets)),
                                        name="simulated-network", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulated network did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            # Requests still queued for a model (their clients long gone) are cancelled at
            # shutdown; uvicorn would log each as an application error.
            logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._pools_lock:
            for pool in self._pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            self._pools.clear()
        self.close_sockets()

    def __enter__(self) -> "SimulatedNetwork":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- auth
    def _issue(self) -> dict:
        ttl = self.config.credentials.token_ttl_s if self.config.credentials else 7_776_000
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._tokens[access] = time.time() + ttl
        self._refresh.add(refresh)
        return {"access_token": access, "refresh_token": refresh, "expires_in": ttl,
                "token_type": "bearer", "credits": 1000.0}

    def revoke(self, password: str | None = None) -> None:
        """The network revokes every token it issued (and, given `password`, changes the
        account's password, so logging in again fails too)."""
        self._tokens.clear()
        self._refresh.clear()
        if password is not None and self.config.credentials is not None:
            self.config.credentials.password = password

    def _bearer_ok(self, request: Request) -> bool:
        if self.config.credentials is None:  # no accounts: any token, or none
            return True
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return False
        expiry = self._tokens.get(auth[7:].strip())
        return expiry is not None and time.time() < expiry

    def _target(self, request: Request) -> str:
        return self._by_port.get(request.scope.get("server", ("", 0))[1], "")

    # -- HTTP
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="Simulated Flexstack host", docs_url=None, redoc_url=None,
                      openapi_url=None)
        unauthorized = {"detail": "Could not validate credentials"}

        @app.post("/v1/user/login")
        async def login(request: Request):
            auth = request.headers.get("authorization", "")
            creds = self.config.credentials
            try:
                user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            except ValueError:
                user = password = ""
            if not auth.startswith("Basic ") or (creds and (user, password) != (creds.username, creds.password)):
                return JSONResponse({"detail": "Incorrect username or password"}, 401)
            return JSONResponse(envelope({**self._issue(), "username": user}))

        @app.post("/v1/user/refresh_token")
        async def refresh(request: Request):
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            token = form.get("refresh_token", [""])[0]
            if not token or (self.config.credentials and token not in self._refresh):
                return JSONResponse({"detail": "Invalid refresh token"}, 401)
            self._refresh.discard(token)
            return JSONResponse(envelope(self._issue()))

        def models_list():
            return JSONResponse(envelope([
                {"model": m, "metadata": {"source": str(self.registry.models[m].checkpoint.get("hub", ""))
                                          if m in self.registry.models else ""}}
                for m in sorted({s.model for s in self.hosts.values()})]))

        app.get("/v1/ai/models")(models_list)
        app.get("/v1/models/text_completion")(models_list)

        @app.post("/v1/ai/text_completion")
        async def text_completion(request: Request, stream: bool = False):
            if not self._bearer_ok(request):
                return JSONResponse(unauthorized, 401)
            try:  # any content type: clients differ, and the body is what counts
                body = CompletionBody.model_validate_json(await request.body())
            except ValidationError as exc:
                return JSONResponse({"detail": [
                    {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False)]}, 422)
            try:
                settings = Settings.from_configs(body.configs)
            except SettingsError as exc:
                return JSONResponse({"detail": [{"loc": ["body", "configs"], "msg": str(exc),
                                                 "type": "value_error"}]}, 422)
            target = self._target(request)
            served_by = None
            if self.config.gateway and target == self.config.gateway.name:
                served_by = (next(self._round_robin) if self.config.gateway.policy == "round-robin"
                             else self._gateway_rng.choice(self.gateway_hosts))
                target = served_by
            host = self.hosts.get(target)
            if host is None:
                return JSONResponse({"detail": "Not Found"}, 404)
            call = Call(target, [m.model_dump() for m in body.messages], body.configs, settings,
                        stream, time.time(), request.client.host if request.client else "")
            response = await host.respond(call, request)
            if served_by:
                response.headers["X-Served-By"] = served_by
            return response

        return app

from validator.network import hostile  # noqa: E402,F401 - registers the hostile strategies (built on the above)
