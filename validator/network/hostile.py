"""Hostile hosts: simulator strategies that attack the validator's client instead of
cheating on the answer. None of them may break a round: each call ends in the host's
record, with the error class the client gives it (validator.probing.client.Err), and
the round goes on for every other host. Each docstring says what the client records
for a non-streamed call and for a streamed one (a stream is plain text, so a body that
is no JSON envelope is simply the answer there, and the scorer judges it).

Most are ordinary responses served by the simulator's uvicorn. What uvicorn will not
send (a response head that never ends, a NUL in a header) is written straight to the
connection's socket: the handler takes over uvicorn's transport for that request
(`_take_over`), writes the bytes, and closes it.

Registered in validator.network.simulator's STRATEGIES when that module imports this one.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field

from validator.network.simulator import (
    STATIC_TEXT, Call, DroppedConnection, Static, Strategy, encode, render, strategy,
)


def _take_over(request: Request) -> asyncio.Transport:
    """The socket behind this request, taken from uvicorn (its request cycle is the
    `receive` callable's owner). Whatever the handler returns afterwards is dropped:
    uvicorn sends nothing on a connection that is closed."""
    transport = getattr(getattr(request.receive, "__self__", None), "transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise RuntimeError("hostile raw strategies need uvicorn's HTTP protocol (its transport)")
    return transport


def _head(status: str, headers: list[bytes], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}".encode(), *headers, b"Content-Length: %d" % len(body),
             b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _media(call: Call) -> str:
    return "text/plain; charset=utf-8" if call.stream else "application/json"


@strategy
class NestedJson(Strategy):
    """A 200 whose JSON nests `depth` arrays deep, bare or inside the expected envelope
    (Python's parser gives up near 1,000 levels; 5,000 nested `[` once escaped the
    client as RecursionError). Non-streamed: malformed_json; streamed: the text."""
    name = "hostile-nested-json"

    class Options(Strategy.Options):
        depth: int = Field(5000, ge=1)
        in_envelope: bool = False

    async def respond(self, call, request):
        nested = b"[" * self.options.depth + b"]" * self.options.depth
        body = (encode(call, "@@") if self.options.in_envelope else b"@@")
        if self.options.in_envelope and call.stream:
            body = json.dumps({"status": "success", "errors": [], "data": "@@"}).encode()
        body = body.replace(b'"@@"', nested).replace(b"@@", nested)
        return Response(body, 200, media_type="application/json")


@strategy
class HugeNumber(Strategy):
    """The answer is a number of `digits` digits inside the envelope (Python refuses to
    convert past 4,300 digits). Non-streamed: malformed_json; streamed: the text."""
    name = "hostile-huge-number"

    class Options(Strategy.Options):
        digits: int = Field(100_000, ge=1)

    async def respond(self, call, request):
        digits = b"9" * self.options.digits
        body = encode(call, "@@").replace(b'"@@"', digits).replace(b"@@", digits)
        return Response(body, 200, media_type="application/json")


@strategy
class WrongType(Strategy):
    """Valid JSON of the wrong type, a different one on each call: a list, a string, a
    number, null, an envelope whose `data` is a list, one whose answer is a number.
    Non-streamed: bad_envelope; streamed: the text."""
    name = "hostile-wrong-type"
    BODIES = ([], "an answer", 42, None, {"status": "success", "data": []},
              {"status": "success", "errors": [], "data": {"data": {"response": 7}}})

    def __init__(self, network, host):
        super().__init__(network, host)
        self.calls = 0

    async def respond(self, call, request):
        body = self.BODIES[self.calls % len(self.BODIES)]
        self.calls += 1
        return Response(json.dumps(body).encode(), 200, media_type="application/json")


@strategy
class HtmlPage(Strategy):
    """A 200 with an HTML page (a proxy's error page, a captive portal). Non-streamed:
    malformed_json; streamed: the text."""
    name = "hostile-html"

    async def respond(self, call, request):
        return Response(b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
                        200, media_type="text/html")


@strategy
class LongHeader(Static):
    """The answer, with an X-Served-By of `length` characters. Up to the HTTP parser's
    limit on a response head (100 KiB) the call is answered and the store cuts the value
    to its column (256 characters once failed the insert on PostgreSQL); past it, the
    client records protocol_error."""
    name = "hostile-long-header"

    class Options(Static.Options):
        length: int = Field(300, ge=1)

    async def respond(self, call, request):
        response = render(call, self.options.text)
        response.headers["X-Served-By"] = ("gpu-" + "x" * self.options.length)[:self.options.length]
        return response


@strategy
class Redirect(Strategy):
    """A 307 to `location` (default: the same URL, a loop). The client never follows a
    redirect: redirect, streamed or not; nothing reaches `location`."""
    name = "hostile-redirect"

    class Options(Strategy.Options):
        location: str | None = None

    async def respond(self, call, request):
        return Response(status_code=307, headers={"Location": self.options.location or str(request.url)})


@strategy
class GzipBomb(Strategy):
    """A 200 with Content-Encoding: gzip: `inflated_mib` MiB of zeros in about a
    thousandth of that. The client inflates no more than its cap: oversized, streamed
    or not."""
    name = "hostile-gzip-bomb"

    class Options(Strategy.Options):
        inflated_mib: int = Field(64, ge=1)

    def __init__(self, network, host):
        super().__init__(network, host)
        self._bomb: bytes | None = None

    def load(self) -> None:
        if self._bomb is None:
            z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            zeros = b"\0" * (1 << 20)
            self._bomb = b"".join(z.compress(zeros) for _ in range(self.options.inflated_mib)) + z.flush()

    async def respond(self, call, request):
        self.load()
        return Response(self._bomb, 200, media_type=_media(call), headers={"Content-Encoding": "gzip"})


@strategy
class LyingLength(Static):
    """Claims a Content-Length of `claimed` bytes, sends the start of the answer, and
    closes the connection. stream_cut, streamed or not."""
    name = "hostile-lying-length"

    class Options(Static.Options):
        claimed: int = Field(10**12, ge=1)

    async def respond(self, call, request):
        head = encode(call, self.options.text)[:20]

        async def cut() -> AsyncIterator[bytes]:
            yield head
            await asyncio.sleep(0.05)
            raise DroppedConnection  # uvicorn drops the connection mid-body

        return StreamingResponse(cut(), media_type=_media(call),
                                 headers={"Content-Length": str(self.options.claimed)})


# ---------------------------------------------------------------- written to the socket

@strategy
class TrickledHeader(Strategy):
    """A status line, then one header trickled a byte every `interval_s`, forever: the
    response head never ends. first_byte_timeout, streamed or not."""
    name = "hostile-trickled-header"

    class Options(Strategy.Options):
        interval_s: float = Field(0.2, gt=0)

    async def respond(self, call, request):
        transport = _take_over(request)
        transport.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
        try:
            while not transport.is_closing():  # until the client gives up
                transport.write(b"z")
                await asyncio.sleep(self.options.interval_s)
        finally:
            transport.close()
        return Response(status_code=499)


@strategy
class BinaryHeader(Strategy):
    """The answer with header bytes that are not UTF-8 (and, with `nul`, a NUL, which no
    HTTP parser accepts). Without NUL: answered, X-Served-By read as Latin-1; with it:
    protocol_error. Streamed or not."""
    name = "hostile-binary-header"

    class Options(Strategy.Options):
        text: str = STATIC_TEXT
        nul: bool = False

    async def respond(self, call, request):
        transport = _take_over(request)
        served_by = b"gpu-\xff\xfe\x80\xc3(-host" + (b"\x00" if self.options.nul else b"")
        headers = [f"Content-Type: {_media(call)}".encode(), b"X-Served-By: " + served_by,
                   b"X-Cafe: caf\xe9 \x01\x1b"]
        transport.write(_head("200 OK", headers, encode(call, self.options.text)))
        transport.close()
        return Response(status_code=499)
