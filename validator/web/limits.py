"""What one caller of `validator serve` may cost it.

- Request bodies are capped before anything reads or parses them: `BodyLimits` is pure
  ASGI around the whole app (Starlette's RequestBodyLimitMiddleware counts the bytes as
  they arrive): a Content-Length over the cap gets 413 without a byte read, a body
  without one (chunked) gets 413 at the first byte past the cap. The /login form has
  a cap of its own (a token and a path are a few hundred bytes).
- The calls that spend model time (POST /validator/v1/llm; the probe page and API when
  they recompute with the scorer) are rate-limited per caller, a token or, without one,
  the client's address: `serve.model_calls_per_minute` in any 60 s (a moving window,
  from the `limits` library); past it, 429 with Retry-After.
"""

from __future__ import annotations

import math
import time

from fastapi import HTTPException, Request
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from validator.web.auth import Principal

LOGIN_PATH = "/login"
RATE_LIMITED = {429: {"description": "Too many calls that spend model time from this caller "
                                     "(serve.model_calls_per_minute); Retry-After says when to retry."}}


class BodyLimits:
    """Pure ASGI middleware: the request body cap for each path (default `max_bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int]) -> None:
        self.default = RequestBodyLimitMiddleware(app, max_body_size=max_bytes)
        self.per_path = {path: RequestBodyLimitMiddleware(app, max_body_size=n)
                         for path, n in per_path.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limited = self.per_path.get(scope.get("path", ""), self.default)
        await limited(scope, receive, send)


class RateLimited(HTTPException):
    def __init__(self, retry_after_s: int, per_minute: int) -> None:
        super().__init__(429, f"at most {per_minute} calls that spend model time per minute per "
                              f"caller (serve.model_calls_per_minute); retry in {retry_after_s} s",
                         headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ModelTimeLimiter:
    """Counts the calls that spend model time, per caller. `per_minute` 0: no limit."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._item = RateLimitItemPerMinute(per_minute) if per_minute else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def spend(self, caller: str) -> None:
        """Count one call for `caller`; RateLimited (429) when it is one too many."""
        if self._item is None or self._limiter.hit(self._item, caller):
            return
        reset_at, _ = self._limiter.get_window_stats(self._item, caller)
        raise RateLimited(max(1, math.ceil(reset_at - time.time())), self.per_minute)

    def spender(self, request: Request, who: Principal):
        """A callable that counts one call of this request's caller (for code that
        decides late whether it spends model time)."""
        caller = (f"ip:{request.client.host if request.client else '?'}" if who.role == "public"
                  else f"token:{who.name}")
        return lambda: self.spend(caller)
