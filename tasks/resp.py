"""A Redis connection for the hot path of a request: commands written at once, replies read only when wanted.

redis-py's own connection does the connecting (address or socket path, TLS, authentication, database); the
commands and replies then go over its socket as bytes this module packs and parses (RESP2), which costs a
request a few microseconds where redis-py's general machinery costs tens. A command whose reply nobody
needs (`wanted` false) is written and the request goes on; its reply is read, and an error in it
logged, on the way to the next wanted one. Each thread has its own `Line` (`Lines`), so one request's
commands and replies never interleave with another's; after a fork the child opens its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Sequence
from typing import NoReturn

import redis

log = logging.getLogger(__name__)
CRLF = b"\r\n"


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


def parse(buffer: bytes | bytearray, at: int = 0) -> tuple[object, int]:
    """One reply from `buffer` at offset `at`, and the offset after it; an error reply is returned as a
    `redis.ResponseError`. Raises `Incomplete` when the reply has not fully arrived."""
    end = buffer.find(CRLF, at)
    if end < 0:
        raise Incomplete
    kind, line, after = buffer[at:at + 1], buffer[at + 1:end], end + 2
    if kind == b"+":
        return bytes(line), after
    if kind == b":":
        return int(line), after
    if kind == b"-":
        return redis.ResponseError(bytes(line).decode(errors="replace")), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise Incomplete
        return bytes(buffer[after:after + size]), after + size + 2
    if kind == b"*":
        count, items = int(line), []
        for _ in range(max(count, 0)):
            item, after = parse(buffer, after)
            items.append(item)
        return (items if count >= 0 else None), after
    raise redis.InvalidResponse(f"unexpected reply type {kind!r}")


class Line:
    """One connection, owned by one thread."""

    def __init__(self, client: redis.Redis):
        self.connection = client.connection_pool.make_connection()
        self.buffer = bytearray()
        self.owed: collections.deque[bool] = collections.deque()
        """One entry per reply not read yet, in order: whether someone waits for it."""

    def send(self, payload: bytes, wanted: Sequence[bool]) -> None:
        """Write `payload`, commands whose replies `reply` hands out where `wanted` says so, else skips.
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
                if wanted and to_wanted:
                    return True, value
                if isinstance(value, redis.ResponseError):  # e.g. out of memory: that store was lost
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
