"""A Redis connection for the hot path of a request: commands written at once, replies read only when wanted.

redis-py's own connection does the connecting (address or socket path, TLS, authentication, database); the
commands and replies then go over its socket as bytes this module packs and parses (RESP2, or RESP3, which
redis-py negotiates from version 8 on: its types come back as the nearest Python ones), which costs a
request a few microseconds where redis-py's general machinery costs tens. A command whose reply nobody
needs (`wanted` false) is written and the request goes on; its reply is read, and an error in it
logged, on the way to the next wanted one; one whose reply is wanted later is given a function, which is
handed the reply when it is read so. Each thread has its own `Line` (`Lines`), so one request's
commands and replies never interleave with another's; after a fork the child opens its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import NoReturn

import redis

log = logging.getLogger(__name__)
CRLF = b"\r\n"
Wanted = bool | Callable[[object], None]
"""Whether a command's reply is waited for, or the function the reply goes to once it is read (`Line`)."""


def encode(*commands: tuple[object, ...]) -> bytes:
    """The RESP bytes of `commands`; arguments are bytes, str or int."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Incomplete(Exception):
    """The buffer ends inside a reply."""


class Push(list):
    """An out-of-band RESP3 message (e.g. a client-side caching invalidation): not a command's reply."""


_LINES: dict[bytes, Callable[[bytes | bytearray], object]] = {
    b"+": bytes,
    b":": int,
    b"(": int,  # a big number
    b"-": lambda line: redis.ResponseError(bytes(line).decode(errors="replace")),
    b"_": lambda line: None,
    b"#": lambda line: line == b"t",
    b",": float,
}
"""The replies held on their first line, by type byte, and how each becomes a value."""


def parse(buffer: bytes | bytearray, at: int = 0) -> tuple[object, int]:
    """One reply from `buffer` at offset `at`, and the offset after it; an error reply is returned as a
    `redis.ResponseError`, a RESP3 push as a `Push`. Raises `Incomplete` when the reply has not fully arrived."""
    end = buffer.find(CRLF, at)
    if end < 0:
        raise Incomplete
    kind, line, after = bytes(buffer[at:at + 1]), buffer[at + 1:end], end + 2
    if (value := _LINES.get(kind)) is not None:
        return value(line), after
    if kind in (b"$", b"=", b"!"):  # a string; a verbatim one (after its format, "txt:"); an error so sent
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise Incomplete
        data = bytes(buffer[after + (4 if kind == b"=" else 0):after + size])
        return (redis.ResponseError(data.decode(errors="replace")) if kind == b"!" else data), after + size + 2
    if kind in (b"*", b"~", b">", b"%", b"|"):  # an array, set, push, map or attributes (the last two as pairs)
        return _items(buffer, kind, int(line), after)
    raise redis.InvalidResponse(f"unexpected reply type {kind!r}")


def _items(buffer: bytes | bytearray, kind: bytes, count: int, at: int) -> tuple[object, int]:
    """The rest of an aggregate reply of `count` items (pairs for a map or attributes) from offset `at`."""
    items = []
    for _ in range(max(count, 0) * (2 if kind in (b"%", b"|") else 1)):
        item, at = parse(buffer, at)
        items.append(item)
    if kind == b"|":  # attributes annotate the reply after them, which is what is returned
        return parse(buffer, at)
    if count < 0:
        return None, at
    if kind == b"%":
        return dict(zip(items[::2], items[1::2], strict=True)), at
    return (Push(items) if kind == b">" else items), at


class Line:
    """One connection, owned by one thread."""

    def __init__(self, client: redis.Redis):
        self.connection = client.connection_pool.make_connection()
        self.buffer = bytearray()
        self.owed: collections.deque[Wanted] = collections.deque()
        """One entry per reply not read yet, in order: whether someone waits for it, or who takes it."""

    def send(self, payload: bytes, wanted: Sequence[Wanted]) -> None:
        """Write `payload`, commands whose replies `reply` hands out where `wanted` is true, goes past where it
        is false, and hands to the function it names on the way (to a wanted reply, or settling).
        A connection that fails or times out raises `redis.ConnectionError` or `redis.TimeoutError`."""
        try:
            if self.connection._sock is None:
                self.connection.connect()
            self.connection._sock.sendall(payload)
        except (OSError, redis.RedisError) as exc:
            self._fail(exc)
        self.owed.extend(wanted)

    def reply(self) -> object:
        """The next wanted reply, reading past the unwanted ones before it (within the socket timeout)."""
        found, value = self._through(to_wanted=True)
        if not found:
            raise RuntimeError("no reply is owed")
        return value

    def settle(self) -> None:
        """Read every reply owed, wanted or not: once it returns, Redis has run every command sent."""
        self._through(to_wanted=False)

    def _through(self, to_wanted: bool) -> tuple[bool, object]:
        """Read replies until the next wanted one (with `to_wanted`) or none is owed; whether one was found."""
        try:
            while self.owed:
                wanted = self.owed[0]
                value = self._next()
                self.owed.popleft()
                if callable(wanted):
                    wanted(value)
                elif wanted and to_wanted:
                    return True, value
                elif isinstance(value, redis.ResponseError):  # e.g. out of memory: that store was lost
                    log.warning("a Redis command failed: %s", value)
        except (OSError, redis.RedisError) as exc:
            self._fail(exc)
        return False, None

    def _fail(self, exc: Exception) -> NoReturn:
        """Drop the connection, and raise `exc` as redis-py would: socket errors as its own."""
        self.close()
        if isinstance(exc, redis.RedisError):
            raise exc
        kind = redis.TimeoutError if isinstance(exc, TimeoutError) else redis.ConnectionError
        raise kind(f"Redis unreachable: {exc}") from exc

    def _next(self) -> object:
        while True:
            try:
                value, used = parse(self.buffer)
            except Incomplete:
                chunk = self.connection._sock.recv(65536)
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection") from None
                self.buffer += chunk
                continue
            del self.buffer[:used]
            if not isinstance(value, Push):
                return value

    def close(self) -> None:
        """Drop the connection and what was owed on it; the next `send` connects again."""
        self.connection.disconnect()
        self.buffer.clear()
        self.owed.clear()


class Lines:
    """The calling thread's `Line` to one Redis (a new one after a fork), and calls made on it."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._local = threading.local()
        self._lines: list[Line] = []
        """Every line this process opened and did not close, whichever thread holds it (for `close_all`)."""
        self._pid = os.getpid()

    def get(self) -> Line:
        line = getattr(self._local, "line", None)
        if line is None or self._local.pid != os.getpid():
            line = self._local.line = Line(self.client)
            self._local.pid = os.getpid()
            if self._pid != os.getpid():  # a new process: the parent's lines are not its own
                self._lines, self._pid = [], os.getpid()
            self._lines.append(line)
        return line

    def close(self) -> None:
        """Close the calling thread's line, if it has one (a thread about to end)."""
        line = getattr(self._local, "line", None)
        if line is not None:
            line.close()
            self._local.line = None
            if line in self._lines:
                self._lines.remove(line)

    def close_all(self) -> None:
        """Close every line of this process (its owner is done with Redis, e.g. an app being torn down)."""
        lines, self._lines = self._lines, []
        for line in lines:
            line.close()

    def call(self, *command: object) -> object:
        """One command's reply, as redis-py would give it: a refused command raises its `ResponseError`."""
        line = self.get()
        line.send(encode(command), [True])
        reply = line.reply()
        if isinstance(reply, redis.ResponseError):
            raise reply
        return reply

    def script(self, script: redis.commands.core.Script, keys: Sequence[object], args: Sequence[object]) -> object:
        """Run a registered Lua script by its digest, sending its text once when Redis does not know it."""
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return self.call("EVAL", script.script, len(keys), *keys, *args)
