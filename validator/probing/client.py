"""Async client for the Flexstack text-completion API: one probe is one `complete` call.

Every failure of a host comes back as a `CallRecord` with an error class from `Err`;
only bad arguments raise. A host's response is untrusted in every byte (any status, any
header, any body): whatever it sends ends in the record, and an exception nobody foresaw
(a bug of ours) becomes `client_bug`, never an exception out of `complete`.

Redirects are never followed (whatever the `httpx.AsyncClient` passed in is set to do):
a probe goes to the host's URL and nowhere else. Following one would let a host send the
probe, and its token, to any address, the validator's own loopback services included;
a redirect is recorded as `redirect` with its target.

Compressed bodies (gzip, deflate) are inflated here, never more than the cap at a time:
httpx inflates each network read whole, so 64 KiB of gzip would become 64 MiB at once.

The per-call deadline (`Timeouts.total`) is enforced here with
asyncio.timeout, because httpx's read timeout only bounds the gap between two chunks: a
host trickling one byte a second would otherwise hold a probe forever.

Requests look like the network's own Python client's (`Wire`, docs/probes.md): its
headers in its order, its body fields, no `?stream` on a plain call, no Authorization
header without a token. API facts used here are in docs/flexstack-api.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import reprlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlencode

import httpx

from validator.models.sampling import Settings

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
_ERROR_BODY_CAP = 64 * 1024  # enough of an error body for its message
_DETAIL_CAP = 2000  # characters of a record's detail: what went wrong, not the whole body


class Err:
    """Error classes of a CallRecord (stable strings: they are stored and aggregated)."""

    CONNECT = "connect_error"  # TCP connect refused / timed out (after retries)
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"  # request sent, no response headers in time
    TOTAL_TIMEOUT = "total_timeout"  # the whole call (all attempts) ran past Timeouts.total
    HTTP_4XX = "http_4xx"  # client error other than 401/429; detail has the server's message
    # The validator's own credentials refused: 401 after refresh / login, login or refresh
    # refused, or no way to re-authenticate. The validator's error, not the host's: it
    # never counts against a host's availability (validator.reputation.VALIDATOR_ERRORS).
    AUTH_FAILED = "auth_failed"
    RATE_LIMITED = "rate_limited"  # 429 after retries
    SERVER_ERROR = "server_error"  # 5xx after retries
    MALFORMED_JSON = "malformed_json"  # non-streamed body is not JSON we can parse (bad
    #                                    syntax, nested too deeply, a number of >4300 digits)
    BAD_ENVELOPE = "bad_envelope"  # JSON, but no string data.data.response, status not
    #                                "success", non-empty errors, or task not COMPLETED
    OVERSIZED = "oversized"  # answer over Timeouts.max_bytes; reading stopped at the cap
    INVALID_UTF8 = "invalid_utf8"  # answer is not valid UTF-8 (or holds lone surrogates)
    STREAM_CUT = "stream_cut"  # connection closed before the body (or response) completed
    PROTOCOL_ERROR = "protocol_error"  # any other transport failure (bad HTTP, a header the
    #                                    parser refuses, broken compression, pool timeout...)
    REDIRECT = "redirect"  # a 3xx: never followed (module docstring); detail has the target
    CLIENT_BUG = "client_bug"  # an exception nobody foresaw: a bug of ours, fix it; detail
    #                            has its type. The call still ends as a record.


# Failures worth another attempt; everything else is the host's answer and is kept.
_TRANSIENT = {Err.CONNECT, Err.RATE_LIMITED, Err.SERVER_ERROR}


@dataclass(frozen=True)
class Timeouts:
    """Per-call limits. Seconds unless named otherwise."""

    connect: float = 5.0
    first_byte: float = 60.0  # from sending the request until the response headers
    total: float = 180.0  # hard deadline for the whole call, retries and re-auth included
    max_bytes: int = 1 << 20  # cap on the answer's size
    retries: int = 2  # extra attempts after a transient failure
    # Retry n waits U(b, 2b) with b = min(cap, base * 2^n), and at least a Retry-After:
    # the network's client never retries, so the same prompt twice within seconds would
    # mark a probe.
    backoff_base: float = 15.0
    backoff_cap: float = 60.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "total", "backoff_base", "backoff_cap"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Timeouts.{name} must be > 0")
        if self.max_bytes < 1 or self.retries < 0:
            raise ValueError("Timeouts.max_bytes must be >= 1 and retries >= 0")


@dataclass
class CallRecord:
    """What one call produced. `ok` is True exactly when `error` is None."""

    ok: bool
    text: str | None = None
    status: int | None = None  # HTTP status of the last attempt
    error: str | None = None  # an Err constant
    detail: str = ""
    ttfb_s: float | None = None  # request sent -> response headers, last attempt
    total_s: float = 0.0  # the whole call, retries included
    bytes: int = 0  # body bytes read in the last attempt
    attempts: int = 0
    stream: bool = False
    configs_echo: dict | None = None  # data.configs of a non-streamed answer
    served_by: str | None = None  # the host a gateway routed us to (Attribution)


def _requests_headers() -> tuple[tuple[str, str], ...]:
    """The headers `requests` puts on every request, in its order (the network's Python
    client, the `flexstack` package, posts with `requests`): the installed version's
    own, else those of requests 2.32."""
    try:
        from requests.utils import default_headers
        return tuple(default_headers().items())
    except ImportError:
        return (("User-Agent", "python-requests/2.32.3"), ("Accept-Encoding", "gzip, deflate"),
                ("Accept", "*/*"), ("Connection", "keep-alive"))


@dataclass(frozen=True)
class Wire:
    """What a request looks like on the wire. Default: as the network's own Python client
    sends it: `requests`' headers, then Authorization (only with a token), Content-Length
    and Content-Type; the body `{"messages", "configs": {"model", "temperature", "top_k",
    "top_p", "max_new_tokens"}}` in that order; `?stream=true` on a streamed call and no
    query on a plain one. `max_tokens_fields` may add the documented `max_tokens` name
    for hosts that read only that one."""

    headers: tuple[tuple[str, str], ...] = field(default_factory=_requests_headers)
    max_tokens_fields: tuple[str, ...] = ("max_new_tokens",)

    def __post_init__(self) -> None:
        if not self.max_tokens_fields:
            raise ValueError("Wire.max_tokens_fields needs at least one field name")
        reserved = {"host", "authorization", "content-length", "content-type", "transfer-encoding"}
        if any(k.lower() in reserved for k, _ in self.headers):
            raise ValueError(f"Wire.headers may not set {', '.join(sorted(reserved))} (the client does)")

    def configs(self, model: str, settings: Settings) -> dict[str, Any]:
        return {"model": model, "temperature": settings.temperature, "top_k": settings.top_k,
                "top_p": settings.top_p, **{f: settings.max_tokens for f in self.max_tokens_fields}}


def _fail(rec: CallRecord, error: str, detail: str) -> None:
    if len(detail) > _DETAIL_CAP:
        detail = detail[:_DETAIL_CAP - 20] + f"... [{len(detail)} chars]"
    rec.error, rec.detail, rec.text = error, detail, None


class AuthSession:
    """The credentials and tokens of one account. Clients that share a session (the hosts
    of one network account, and the daemon's rounds one after another) log in and
    refresh once for all of them."""

    def __init__(self, token: str | None = None, refresh_token: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.token, self.refresh_token = token, refresh_token
        self.username, self.password = username, password
        self.expires_at: float | None = None  # monotonic; None = unknown, assume valid
        self.lock = asyncio.Lock()  # one refresh at a time, shared by all calls


@dataclass(frozen=True)
class Attribution:
    """Where a gateway names the host that served an answer: a response header, and/or a
    field of the JSON body as a dotted path (read when the header gives nothing; a
    streamed plain-text answer has no body fields)."""

    header: str | None = "X-Served-By"
    body_field: str | None = None

    def from_body(self, obj: Any) -> str | None:
        if not self.body_field:
            return None
        for part in self.body_field.split("."):
            if not isinstance(obj, dict):
                return None
            obj = obj.get(part)
        return obj if isinstance(obj, str) and obj else None


def _on_session(name: str) -> property:
    return property(lambda self: getattr(self.session, name),
                    lambda self, value: setattr(self.session, name, value))


class FlexstackClient:
    """Async client for one Flexstack base URL. Pass a shared `http` client (or a
    `transport`) to pool connections across many hosts; size its limits above the
    concurrency, since waiting for a pool slot counts against the first-byte window."""

    def __init__(self, base_url: str, *, token: str | None = None,
                 refresh_token: str | None = None, username: str | None = None,
                 password: str | None = None, session: "AuthSession | None" = None,
                 attribution: "Attribution | None" = None, timeouts: Timeouts | None = None,
                 http: httpx.AsyncClient | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 limits: httpx.Limits | None = None, wire: Wire | None = None) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if session is not None and any(x is not None for x in (token, refresh_token, username, password)):
            raise ValueError("pass either a session or token/refresh_token/username/password, not both")
        if http is not None and (transport is not None or limits is not None):
            raise ValueError("pass either an httpx.AsyncClient or transport/limits, not both")
        self.base_url = str(url).rstrip("/")
        self.session = session or AuthSession(token, refresh_token, username, password)
        self.attribution = attribution or Attribution()
        self.timeouts = timeouts or Timeouts()
        self.wire = wire or Wire()
        self._owns_http = http is None
        # keepalive_expiry stays under common server idle timeouts (uvicorn: 5 s) so we
        # rarely reuse a connection the host has already closed. trust_env off: probes
        # must not silently go through an operator's proxy; pass your own client for that.
        self._http = http or httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=False,
            limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=50,
                                          keepalive_expiry=4.0))
        # Read/write are unbounded in httpx on purpose: our own timers own them.
        self._httpx_timeout = httpx.Timeout(connect=self.timeouts.connect, read=None,
                                            write=None, pool=self.timeouts.first_byte)

    # The account's state lives on the session (shared between clients).
    token = _on_session("token")
    refresh_token = _on_session("refresh_token")
    username = _on_session("username")
    password = _on_session("password")
    _expires_at = _on_session("expires_at")
    _auth_lock = _on_session("lock")

    async def __aenter__(self) -> "FlexstackClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close our connection pool (a client passed in is left to its owner)."""
        if self._owns_http:
            await self._http.aclose()

    # ----------------------------------------------------------------- public calls

    async def complete(self, messages: list[dict], settings: Settings, model: str = "gemma-7b",
                       stream: bool = False) -> CallRecord:
        """POST /ai/text_completion; the answer text is exact (streamed bytes are joined
        raw, so blank lines survive) or the record says why there is none."""
        _check_messages(messages)
        if not isinstance(settings, Settings):
            raise TypeError(f"settings must be a Settings, got {type(settings).__name__}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        # json.dumps as `requests` encodes a `json=` body (same separators, ASCII escapes)
        content = json.dumps({"messages": messages,
                              "configs": self.wire.configs(model, settings)}).encode()

        def build() -> httpx.Request:
            return self._request("/ai/text_completion" + ("?stream=true" if stream else ""),
                                 content=content, content_type="application/json")

        # A non-streamed body also carries JSON escaping and the echoed request: allow
        # for both before calling it oversized (the answer itself is checked after).
        cap = self.timeouts.max_bytes if stream else (
            2 * self.timeouts.max_bytes + 2 * len(content) + _ERROR_BODY_CAP)
        return await self._call(build, self._parse_completion, stream=stream, authed=True, cap=cap)

    async def login(self) -> CallRecord:
        """POST /user/login with HTTP Basic auth; stores the tokens on success."""
        if self.username is None:
            raise ValueError("login() needs username and password")
        async with self._auth_lock:
            return await self._login()

    async def refresh(self) -> CallRecord:
        """POST /user/refresh_token; stores the new tokens on success."""
        if not self.refresh_token:
            raise ValueError("refresh() needs a refresh token (log in first)")
        async with self._auth_lock:
            return await self._refresh()

    # ----------------------------------------------------------------- auth

    async def _login(self) -> CallRecord:
        basic = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return await self._call(lambda: self._request("/user/login", auth=f"Basic {basic}"),
                                self._parse_tokens, stream=False, authed=False,
                                cap=_ERROR_BODY_CAP)

    async def _refresh(self) -> CallRecord:
        form = urlencode({"refresh_token": self.refresh_token or ""}).encode()
        return await self._call(lambda: self._request("/user/refresh_token", content=form,
                                                      content_type="application/x-www-form-urlencoded"),
                                self._parse_tokens, stream=False, authed=False,
                                cap=_ERROR_BODY_CAP)

    def _expired(self) -> bool:
        return self._expires_at is not None and time.monotonic() >= self._expires_at

    def _can_renew(self) -> bool:
        return bool(self.refresh_token) or self.username is not None

    async def _renew(self, used: str | None) -> CallRecord | None:
        """Refresh, else log in; None on success. Skipped when another call already
        replaced the token we used (50 concurrent 401s must not mean 50 refreshes)."""
        async with self._auth_lock:
            if self.token is not None and self.token != used and not self._expired():
                return None
            fail = CallRecord(ok=False, error=Err.AUTH_FAILED,
                              detail="no refresh token or credentials to re-authenticate")
            if self.refresh_token:
                fail = await self._refresh()
                if fail.ok:
                    return None
            if self.username is not None:
                fail = await self._login()
                if fail.ok:
                    return None
            return fail

    def _parse_tokens(self, rec: CallRecord, body: bytes, response: httpx.Response) -> None:
        obj = _load_json(rec, body)
        if obj is None:
            return
        data = obj.get("data") if isinstance(obj, dict) else None
        if obj.get("status", "success") != "success" or obj.get("errors") or not (
                isinstance(data, dict) and isinstance(data.get("access_token"), str)
                and data["access_token"]):
            return _fail(rec, Err.BAD_ENVELOPE, "no data.access_token in the auth response: "
                         + _describe(obj))
        self.token = data["access_token"]
        if isinstance(data.get("refresh_token"), str) and data["refresh_token"]:
            self.refresh_token = data["refresh_token"]  # a refresh may not rotate it
        ttl = data.get("expires_in")
        # Renew a little early: a token that expires in flight costs a 401 round trip.
        self._expires_at = (time.monotonic() + ttl - min(60.0, 0.1 * ttl)
                            if isinstance(ttl, (int, float)) and not isinstance(ttl, bool)
                            else None)

    # ----------------------------------------------------------------- one call

    def _request(self, path: str, *, auth: str | None = None, content: bytes = b"",
                 content_type: str | None = None) -> httpx.Request:
        """A POST laid out as `requests` lays it out: its headers, Authorization (none
        without a token), Content-Length, Content-Type. Built directly rather than by the
        httpx client, whose own default headers and cookies would go out too."""
        headers = list(self.wire.headers)
        auth = auth or (f"Bearer {self.token}" if self.token else None)
        if auth:
            headers.append(("Authorization", auth))
        headers.append(("Content-Length", str(len(content))))
        if content_type:
            headers.append(("Content-Type", content_type))
        return httpx.Request("POST", self.base_url + path, headers=headers, content=content,
                             extensions={"timeout": self._httpx_timeout.as_dict()})

    async def _call(self, build: Callable[[], httpx.Request], parse: Callable, *, stream: bool,
                    authed: bool, cap: int) -> CallRecord:
        rec = CallRecord(ok=False, stream=stream)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.timeouts.total):
                await self._attempts(rec, build, parse, authed, t0 + self.timeouts.total, cap)
        except TimeoutError:
            rec.configs_echo = None
            _fail(rec, Err.TOTAL_TIMEOUT, f"not finished within {self.timeouts.total}s "
                  f"(attempt {rec.attempts}, {rec.bytes} body bytes read)")
        except Exception as e:  # noqa: BLE001 - whatever a host sends ends as a record
            log.exception("client_bug calling %s", self.base_url)
            rec.configs_echo = None
            _fail(rec, Err.CLIENT_BUG, f"{type(e).__name__} in the client: {_exc_text(e)}")
        rec.total_s = time.monotonic() - t0
        rec.ok = rec.error is None
        return rec

    async def _attempts(self, rec: CallRecord, build: Callable[[], httpx.Request],
                        parse: Callable, authed: bool, deadline: float, cap: int) -> None:
        """Attempts until success, a lasting failure, or retries run out."""
        retry, reauthed = 0, False
        while True:
            if authed and (self.token is None or self._expired()) and self._can_renew():
                fail = await self._renew(self.token)
                if fail is not None:
                    rec.status = fail.status
                    return _fail(rec, fail.error or Err.AUTH_FAILED, "auth: " + fail.detail)
            used = self.token
            rec.attempts += 1
            hint = await self._attempt(rec, build(), parse, cap)
            if rec.status == 401 and authed and not reauthed:
                reauthed = True  # the token may just have expired: renew, retry once
                fail = await self._renew(used)
                if fail is None:
                    continue
                rec.status = fail.status or rec.status
                return _fail(rec, fail.error or Err.AUTH_FAILED,
                             f"HTTP 401, then re-auth failed: {fail.detail}")
            # A connection closed before any response is the keep-alive race (the host
            # dropped an idle pooled connection): retry it. A cut body is evidence: keep it.
            transient = rec.error in _TRANSIENT or (rec.error == Err.STREAM_CUT
                                                    and rec.status is None)
            if not transient or retry >= self.timeouts.retries:
                return
            t = self.timeouts
            step = min(t.backoff_cap, t.backoff_base * 2 ** retry)
            delay = max(hint or 0.0, random.uniform(step, 2 * step))
            if delay >= deadline - time.monotonic():
                rec.detail += f"; not retried: waiting {delay:.1f}s would pass the deadline"
                return
            retry += 1
            await asyncio.sleep(delay)

    async def _attempt(self, rec: CallRecord, request: httpx.Request, parse: Callable,
                       cap: int) -> float | None:
        """One HTTP exchange; fills `rec` and returns a Retry-After hint in seconds."""
        rec.status = rec.ttfb_s = rec.served_by = rec.configs_echo = rec.error = None
        rec.text, rec.detail, rec.bytes = None, "", 0
        loop, t = asyncio.get_running_loop(), self.timeouts
        sent = loop.time()
        try:
            # Until the request goes out the window is connect + first_byte; httpcore's
            # trace hook tells us when it does, and the first-byte clock restarts there.
            async with asyncio.timeout(t.connect + t.first_byte) as window:
                async def trace(event: str, info: dict) -> None:
                    nonlocal sent
                    if event.endswith("send_request_headers.started"):
                        sent = loop.time()
                        window.reschedule(sent + t.first_byte)

                request.extensions["trace"] = trace
                response = await self._http.send(request, stream=True, follow_redirects=False)
        except TimeoutError:
            return _fail(rec, Err.FIRST_BYTE_TIMEOUT,
                         f"no response headers within {t.first_byte}s of sending")
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            return _fail(rec, Err.CONNECT, f"{type(e).__name__}: {e}")
        except httpx.HTTPError as e:
            return _fail(rec, _transport_error(e), f"before the response: {type(e).__name__}: {e}")

        rec.ttfb_s = loop.time() - sent
        rec.status = response.status_code
        if self.attribution.header:
            rec.served_by = response.headers.get(self.attribution.header)
        success = 200 <= response.status_code < 300
        try:
            body, over = await _read_capped(response, cap if success else _ERROR_BODY_CAP, rec)
        except httpx.HTTPError as e:
            return _fail(rec, _transport_error(e), f"body cut after {rec.bytes} bytes: {e}")
        except zlib.error as e:
            return _fail(rec, Err.PROTOCOL_ERROR, f"body is not valid "
                         f"{response.headers.get('content-encoding', '')!r}: {e}")
        finally:
            await response.aclose()  # after a cap this drops the connection, as it should

        if success:
            if over:
                return _fail(rec, Err.OVERSIZED, f"body over {cap} bytes; stopped reading")
            return parse(rec, body, response)
        code, message = response.status_code, f"HTTP {response.status_code}: {_error_detail(body)}"
        if code == 401:
            return _fail(rec, Err.AUTH_FAILED, message)
        if 300 <= code < 400:
            return _fail(rec, Err.REDIRECT, f"HTTP {code} to "
                         f"{response.headers.get('location', '(no Location)')!r}, not followed")
        if code == 429 or code >= 500:
            _fail(rec, Err.RATE_LIMITED if code == 429 else Err.SERVER_ERROR, message)
            return _retry_after(response) if code in (429, 503) else None
        return _fail(rec, Err.HTTP_4XX if code >= 400 else Err.PROTOCOL_ERROR, message)

    def _parse_completion(self, rec: CallRecord, body: bytes, response: httpx.Response) -> None:
        ctype = response.headers.get("content-type", "")
        envelope = not rec.stream
        if rec.stream and "json" in ctype:
            # The docs say streams are plain text; a JSON envelope here is an error report
            # or a host ignoring stream=true. Anything else stays raw text.
            with contextlib.suppress(ValueError, RecursionError):
                obj = json.loads(body)
                envelope = isinstance(obj, dict) and "data" in obj and "status" in obj
        if envelope:
            obj = _load_json(rec, body)
            if obj is None:
                return
            if rec.served_by is None:
                rec.served_by = self.attribution.from_body(obj)
            try:
                text, rec.configs_echo = _unwrap(obj)
            except ValueError as e:
                return _fail(rec, Err.BAD_ENVELOPE, str(e))
            try:
                size = len(text.encode("utf-8"))  # lone surrogates from \ud800 escapes fail
            except UnicodeEncodeError as e:
                return _fail(rec, Err.INVALID_UTF8, f"answer is not valid Unicode: {e}")
            if size > self.timeouts.max_bytes:
                return _fail(rec, Err.OVERSIZED, f"answer of {size} bytes is over "
                             f"{self.timeouts.max_bytes}")
        else:
            text = _decode(rec, body)
        rec.text = text


# --------------------------------------------------------------------- helpers

def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and set(m) == {"role", "content"}
                and m["role"] in ROLES and isinstance(m["content"], str)):
            raise ValueError(f"each message needs exactly role in {ROLES} and string content, "
                             f"got {m!r}")


async def _read_capped(response: httpx.Response, cap: int, rec: CallRecord) -> tuple[bytes, bool]:
    """The body as bytes (content-decoded, never re-split or re-joined by lines); stops
    as soon as it passes `cap`, counted after decoding. Returns (bytes read, passed the
    cap); zlib.error for a body that is not what its Content-Encoding says."""
    parts: list[bytes] = []
    inflaters = _inflaters(response.headers.get("content-encoding", ""))
    # aclosing: a generator left open after `break` would be finalised by a stray task.
    async with contextlib.aclosing(response.aiter_raw()) as chunks:
        async for chunk in chunks:
            for inflate in inflaters:
                chunk = inflate.feed(chunk, cap + 1 - rec.bytes)
            parts.append(chunk)
            rec.bytes += len(chunk)
            if rec.bytes > cap:
                return b"".join(parts), True
    for i, inflate in enumerate(inflaters):  # what each decoder still holds
        tail = inflate.flush()
        for later in inflaters[i + 1:]:
            tail = later.feed(tail, cap + 1 - rec.bytes)
        parts.append(tail)
        rec.bytes += len(tail)
    return b"".join(parts), rec.bytes > cap


class _Inflate:
    """One gzip or deflate layer that never yields more than it is asked for (zlib's
    max_length); the input it has not used is dropped, which is right only because the
    caller stops reading once a call asks for less than it gets."""

    def __init__(self, encoding: str) -> None:
        self.deflate = encoding == "deflate"
        # gzip, or deflate as RFC 9110 defines it (zlib-wrapped); some servers send raw
        # deflate instead, which the first error switches to (as httpx does).
        self._z = zlib.decompressobj(zlib.MAX_WBITS | (32 if not self.deflate else 0))
        self._started = False

    def feed(self, data: bytes, limit: int) -> bytes:
        try:
            out = self._z.decompress(data, max(1, limit))
        except zlib.error:
            if not (self.deflate and not self._started):
                raise
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._z.decompress(data, max(1, limit))
        self._started = self._started or bool(data)
        return out

    def flush(self) -> bytes:
        return self._z.flush() if not self._z.unconsumed_tail else b""


def _inflaters(content_encoding: str) -> list[_Inflate]:
    """Decoders for a Content-Encoding, outermost first; encodings we do not know pass
    the bytes through as they are (as httpx does)."""
    names = [e.strip().lower() for e in content_encoding.split(",")]
    return [_Inflate("deflate" if n == "deflate" else "gzip")
            for n in reversed(names) if n in ("gzip", "x-gzip", "deflate")]


def _transport_error(e: httpx.HTTPError) -> str:
    """STREAM_CUT when the host closed (or reset) the connection, PROTOCOL_ERROR when
    what it sent is not HTTP (h11 says which in its message)."""
    if isinstance(e, httpx.ReadError):
        return Err.STREAM_CUT
    if isinstance(e, httpx.RemoteProtocolError):
        text = str(e).lower()
        return Err.STREAM_CUT if ("disconnect" in text or "closed" in text) else Err.PROTOCOL_ERROR
    return Err.PROTOCOL_ERROR


_short = reprlib.Repr()  # a host's JSON in a message: bounded in length and in depth
_short.maxlevel, _short.maxstring, _short.maxother = 3, 200, 200
_short.maxlist = _short.maxdict = 8


def _describe(obj: Any) -> str:
    return _short.repr(obj)


def _exc_text(e: BaseException) -> str:
    try:
        return str(e)[:500]
    except Exception:  # noqa: BLE001 - an exception whose message itself fails
        return "(no message)"


def _decode(rec: CallRecord, body: bytes) -> str | None:
    try:
        return body.decode("utf-8")  # strict: a host's bad bytes are evidence, not noise
    except UnicodeDecodeError as e:
        return _fail(rec, Err.INVALID_UTF8, f"body is not UTF-8: {e}")


def _load_json(rec: CallRecord, body: bytes) -> Any:
    text = _decode(rec, body)
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError as e:
        return _fail(rec, Err.MALFORMED_JSON, f"{_exc_text(e)}; body starts {text[:120]!r}")
    except RecursionError:
        return _fail(rec, Err.MALFORMED_JSON, f"JSON nested too deeply to parse; body starts "
                     f"{text[:120]!r}")
    if not isinstance(obj, dict):
        return _fail(rec, Err.BAD_ENVELOPE, f"body is JSON {type(obj).__name__}, not an object")
    return obj


def _unwrap(obj: dict) -> tuple[str, dict | None]:
    """(answer, configs echo) of a completion envelope; ValueError says what is wrong."""
    status, errors = obj.get("status", "success"), obj.get("errors") or []
    if status != "success" or errors:
        raise ValueError(f"status={_describe(status)} errors={_describe(errors)} "
                         f"error_description={_describe(obj.get('error_description', ''))}")
    data = obj.get("data")
    if not isinstance(data, dict):
        raise ValueError("envelope has no `data` object")
    if data.get("is_success") is False:
        raise ValueError("data.is_success is false")
    task = data.get("data")
    if not isinstance(task, dict) or not isinstance(task.get("response"), str):
        raise ValueError("data.data.response is missing or not a string")
    if task.get("status", "COMPLETED") != "COMPLETED":
        raise ValueError(f"data.data.status is {_describe(task['status'])}, not 'COMPLETED'")
    configs = data.get("configs", task.get("configs"))
    return task["response"], configs if isinstance(configs, dict) else None


def _error_detail(body: bytes) -> str:
    """The server's own words: FastAPI `detail` (list or string), else the envelope's
    error_description, else the start of the body."""
    text = body.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text[:300]
    if isinstance(obj, dict):
        detail = obj.get("detail")
        if isinstance(detail, list):
            return "; ".join(_validation_error(d) for d in detail[:20])
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return _describe(detail)
        if obj.get("error_description") or obj.get("errors"):
            described = [v if isinstance(v, str) else _describe(v)
                         for v in (obj.get("error_description"), obj.get("errors")) if v]
            return " ".join(described)
    return text[:300]


def _validation_error(d: Any) -> str:
    """One item of FastAPI's 422 detail list: `loc.path: msg`."""
    if not isinstance(d, dict):
        return _describe(d)
    loc = d.get("loc")
    where = ".".join(str(x) if isinstance(x, (str, int)) else _describe(x)
                     for x in (loc if isinstance(loc, list) else [] if loc is None else [loc]))
    msg = d.get("msg", d)
    return f"{where}: {msg if isinstance(msg, str) else _describe(msg)}"


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in its seconds form; the HTTP-date form falls back to backoff."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if value >= 0 else None
