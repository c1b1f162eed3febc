"""The loopback floor: an app on our HTTP stack that reads the request body and answers a fixed small JSON body.

The benchmark serves it the way our platform is served, so it shares our HTTP stack but does no work:

    gunicorn bench.noop_app:app -k deploy.worker.WebWorker -w 2 --no-control-socket

It is a `webapp.asgi.Bridge` whose every POST is an inference route, so the worker's protocol answers it as
it answers ours (`deploy.worker.DataPlaneProtocol`); anything else goes through ASGI. Its latency is what an
inference route pays for the HTTP round trip before doing anything.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from webapp.asgi import Bridge, Response
from webapp.dataplane import Route

ANSWER = b'{"floor":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ANY = re.compile(".*")


class NoPlane:
    """A data plane with one route, every path, and nothing to do after an answer."""

    def route(self, path: str) -> Route:
        return self.answer, ANY.fullmatch(path)

    def answer(self, *args: object) -> None:  # never called: the floor answers in `Floor.infer`
        raise NotImplementedError

    def after(self) -> None:
        pass


class Floor(Bridge):
    """Every request answered with ANSWER once its body is in; the lifespan events completed."""

    def __init__(self) -> None:  # no Flask app, no thread pool
        self.dataplane, self.limit = NoPlane(), 32 << 20  # type: ignore[assignment]

    def infer(self, route: Route, method: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        return 200, HEADERS, ANSWER

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await read_body(receive)
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": ANSWER})


app = Floor()


async def read_body(receive: Receive) -> bytes:
    """Read the whole request body."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge start-up and shutdown: there is nothing to set up."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
