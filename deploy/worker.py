"""The web worker class gunicorn runs: uvicorn's event loop and HTTP protocol, with gunicorn's request limits.

uvicorn's httptools protocol and uvloop carry a one-row prediction's round trip in less time than gunicorn's
own asyncio worker. It takes no limits on the request head, so the protocol here applies gunicorn's: the
request line (`limit_request_line`), the number of header fields (`limit_request_fields`) and the size of
each (`limit_request_field_size`); a head that grows past all of them together is refused while it streams,
before it is parsed whole. A refused request gets a JSON `{"error": ...}` and the connection is closed.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class Limits(NamedTuple):
    """The request-head limits, in bytes and fields, as gunicorn's settings give them."""

    line: int
    fields: int
    field_size: int

    @property
    def head(self) -> int:
        """The most a whole head may take: the line and every field at its largest, with their line ends."""
        return self.line + self.fields * (self.field_size + 2) + 4


class Refused(Exception):
    """A request head over a limit: the status and message to answer it with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over the limits (414, 431)."""

    def __init__(self, *args: Any, limits: Limits, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.limits, self.head_limit = limits, limits.head
        self.refused: Refused | None = None
        self.head_bytes = 0  # bytes received while a head is being read
        self.in_head = True

    def data_received(self, data: bytes) -> None:
        if self.refused is not None:
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > self.head_limit:
                self.refuse(431, f"request head over {self.head_limit} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True

    def on_headers_complete(self) -> None:
        received, self.in_head, self.head_bytes = self.head_bytes, False, 0
        limits = self.limits
        if len(self.url) > limits.line:
            raise self.refuse_later(414, f"request target over {limits.line} bytes")
        if len(self.headers) > limits.fields:
            raise self.refuse_later(431, f"more than {limits.fields} header fields")
        if received > limits.field_size:  # else no field can be over it
            for name, value in self.headers:
                if len(name) + len(value) + 2 > limits.field_size:
                    raise self.refuse_later(431, f"header field {name[:64].decode('latin-1')!r} over "
                                                 f"{limits.field_size} bytes")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """The parser's error: a callback that raised Refused stopped it, so answer that instead."""
        if self.refused is None:
            super().send_400_response(msg)
        else:
            self.refuse(self.refused.status, str(self.refused))

    def refuse_later(self, status: int, message: str) -> Refused:
        """The exception a parser callback raises to stop the parser; the answer goes out once it has."""
        self.refused = Refused(status, message)
        return self.refused

    def refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error and close the connection."""
        self.refused = self.refused or Refused(status, message)
        body = orjson.dumps({"error": message})
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, REASONS[status], len(body)) + body)
        self.transport.close()


class WebWorker(UvicornWorker):
    """gunicorn's worker process serving the ASGI app on uvloop with the limited httptools protocol."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.cfg  # gunicorn's 0 means no limit
        limits = Limits(cfg.limit_request_line or sys.maxsize, cfg.limit_request_fields or sys.maxsize,
                        cfg.limit_request_field_size or sys.maxsize)
        self.config.http = functools.partial(LimitedHttpToolsProtocol, limits=limits)
        self.config.limit_concurrency = cfg.worker_connections
