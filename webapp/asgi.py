"""The ASGI entry point the web workers serve (deploy/worker.py): the Flask app behind a small WSGI bridge.

An event loop holds the keep-alive connections. The inference routes run inline on the loop (they are
short and CPU-bound: a thread hand-off would cost more than the model); every other route runs in a small
thread pool, so a slow one never stalls the connections.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from flask import Flask

from webapp import close_app, create_app
from webapp.dataplane import Call, DataPlane, Route

log = logging.getLogger(__name__)
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]
CALL_HEADERS = {
    b"content-type": "content_type",
    b"content-encoding": "content_encoding",
    b"inference-header-content-length": "header_length",
}


class Bridge:
    """An ASGI app that runs a WSGI app: inference routes inline, the rest on a thread pool."""

    def __init__(self, app: Flask, threads: int = 4):
        self.flask = app
        self.dataplane: DataPlane = app.wsgi_app  # type: ignore[assignment]
        self.limit: int = app.config["MAX_CONTENT_LENGTH"]
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="wsgi")

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict, receive: Receive, send: Send) -> None:
        body = await self._body(receive)
        route = None if body is None else self.dataplane.route(scope["path"])
        if body is None:
            status, headers, content = self.too_large()
        elif route is not None:
            status, headers, content = self.infer(route, scope["method"], scope["headers"], body)
        else:
            loop = asyncio.get_running_loop()
            environ = wsgi_environ(scope, body)
            status, headers, content = await loop.run_in_executor(self.pool, self._call, environ)
        if scope["method"] == "HEAD":
            content = b""
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        if route is not None:
            self.dataplane.after()  # what the answer left to do (the cache's stores), once it is sent

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None once it passes the size limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self) -> Response:
        """The answer to a request whose body passed the size limit."""
        message = orjson.dumps({"error": f"request body exceeds the limit of {self.limit} bytes"})
        return 413, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(message))], message

    def infer(self, route: Route, method: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Answer an inference route straight from the data plane, inline on the loop (`headers` as ASGI
        gives them, names in lower case)."""
        wanted = {}
        for name, value in headers:
            if name in CALL_HEADERS:
                wanted[CALL_HEADERS[name]] = value.decode("latin-1")
        call = Call(method, body, **wanted)
        status, content, content_type, extra = self.dataplane.respond(route, call)
        headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(content))]
        if extra:
            headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
        return status, headers, content

    def _call(self, environ: dict) -> Response:
        """Run the WSGI app to completion and collect its response."""
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
            started["status"], started["headers"] = int(status[:3]), headers

        result = self.flask(environ, start_response)
        try:
            content = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in started["headers"]]
        return started["status"], headers, content

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


def wsgi_environ(scope: dict, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP request whose body has been read."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": str(client[0]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
        elif name not in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            key = f"HTTP_{name}"
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def create_asgi_app(test_config: Mapping[str, Any] | None = None, threads: int = 4) -> Bridge:
    """The Flask app from `create_app`, served over ASGI."""
    return Bridge(create_app(test_config), threads)
