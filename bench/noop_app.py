"""The loopback floor: a plain ASGI app that reads the request body and answers a fixed small JSON body.

The benchmark serves it with our worker class and count, so it shares our HTTP stack but does no work:

    gunicorn bench.noop_app:app -k deploy.worker.WebWorker -w 2 --no-control-socket --keep-alive 30

Its latency is what an inference route pays for the HTTP round trip before doing anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

ANSWER = b'{"floor":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def app(scope: dict, receive: Receive, send: Send) -> None:
    """Answer every request with ANSWER once its body is in; complete the lifespan events."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": ANSWER})


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
