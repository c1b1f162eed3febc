"""The ASGI application the web workers serve: a small router in front of the data plane and the Flask app.

Every request's body is read here first, within MAX_REQUEST_BYTES and a total deadline
(REQUEST_BODY_TIMEOUT_S), so an oversized or trickled upload never holds a thread. Then the inference routes
go to the data plane (`webapp.dataplane`): on the event loop when the request is cheap and free of I/O
(`DataPlane.inline`), else on a thread of the router's own. Every other route goes to the Flask app through
a2wsgi's WSGI adapter, which runs it on a thread pool, so a slow one never stalls the connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from a2wsgi import WSGIMiddleware
from flask import Flask

from webapp import close_app, create_app
from webapp.dataplane import Call, DataPlane, Reply
from webapp.wire import request_id

log = logging.getLogger(__name__)
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
CALL_HEADERS = {
    "content-type": "content_type",
    "content-encoding": "content_encoding",
    "inference-header-content-length": "header_length",
    "authorization": "authorization",
}


class Refused(Exception):
    """A request refused while its body was read: the status and the message to answer it with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Router:
    """An ASGI app: the inference routes to the data plane, everything else to the Flask app."""

    def __init__(self, app: Flask, threads: int = 4):
        self.flask = app
        self.dataplane: DataPlane = app.extensions["dataplane"]
        self.limit: int = app.config["MAX_CONTENT_LENGTH"]
        self.body_timeout_s: float = app.config["REQUEST_BODY_TIMEOUT_S"]
        self.wsgi = WSGIMiddleware(app, workers=threads)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="infer")

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: dict, receive: Receive, send: Send) -> None:
        try:
            body = await self._body(scope, receive)
        except Refused as exc:
            await _answer(send, exc.status, orjson.dumps({"error": str(exc)}), "application/json", close=True)
            return
        if body is None:  # the client went away
            return
        route = self.dataplane.route(scope["path"])
        if route is None:
            await self.wsgi(_with_length(scope, len(body)), _replay(body), send)
            return
        call = _call(scope, body)
        identity = self.dataplane.inline(route, call)
        if identity is not None:
            reply = self.dataplane.respond(route, call, identity)
        else:
            reply = await asyncio.get_running_loop().run_in_executor(self.pool, self.dataplane.respond, route, call)
        await _reply(send, reply)

    async def _body(self, scope: dict, receive: Receive) -> bytes | None:
        """The whole request body; Refused past the size limit or the deadline, None if the client left."""
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise Refused(413, f"request body exceeds the limit of {self.limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        raise Refused(413, f"request body exceeds the limit of {self.limit} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.shutdown(wait=True)
                close_app(self.flask)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _call(scope: dict, body: bytes) -> Call:
    """What the data plane reads of a request (ASGI gives header names in lower case)."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    wanted = {field: headers[name] for name, field in CALL_HEADERS.items() if name in headers}
    return Call(scope["method"], body, **wanted, request_id=request_id(headers.get("x-request-id", "")),
                headers=headers)


def _with_length(scope: dict, length: int) -> dict:
    """The scope of a request whose body has been read whole: its length declared, as a WSGI app needs it
    (a chunked body has none)."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*headers, (b"content-length", b"%d" % length)]}


def _replay(body: bytes) -> Receive:
    """A `receive` that gives the body already read, in one message."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    return receive


async def _reply(send: Send, reply: Reply) -> None:
    status, content, content_type, extra = reply
    await _answer(send, status, content, content_type, extra)


async def _answer(send: Send, status: int, content: bytes, content_type: str,
                  extra: Mapping[str, str] | None = None, close: bool = False) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(content))]
    if extra:
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def create_asgi_app(test_config: Mapping[str, Any] | None = None, threads: int = 4) -> Router:
    """The app from `create_app`, served over ASGI."""
    return Router(create_app(test_config), threads)
