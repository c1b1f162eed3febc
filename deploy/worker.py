"""The web worker class gunicorn runs: uvicorn's event loop and HTTP protocol, with gunicorn's request limits.

uvicorn's httptools protocol and uvloop carry a one-row prediction's round trip in less time than gunicorn's
own asyncio worker. It takes no limits on the request head, so the protocol here applies gunicorn's: the
request line (`limit_request_line`), the number of header fields (`limit_request_fields`) and the size of
each (`limit_request_field_size`); a head that grows past all of them together is refused while it streams,
before it is parsed whole. A refused request gets a JSON `{"error": ...}` and the connection is closed.

An inference request (`POST` to a data-plane route, `webapp.asgi.Bridge.infer`) is answered by the protocol
itself, as its body completes: no ASGI scope, task, receive or send, and the whole answer in one write. Any
other request, and one that comes while an earlier request of its connection is still being answered, goes
through the ASGI app as uvicorn runs it. Either way a connection's answers go out in the order the requests
came, with the same status lines, default headers, keep-alive and access log lines.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import urllib.parse
from typing import Any, NamedTuple

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from webapp.asgi import Bridge
from webapp.dataplane import Route

REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}
PARENT_CHECK_S = 1.0
"""How often a worker tells gunicorn's master it is alive, and checks the master still is."""


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
        self.start_request()

    def start_request(self) -> None:
        """Go on with a request whose head is within the limits: as uvicorn does."""
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


class Direct(NamedTuple):
    """An inference request the protocol answers itself, while its body comes."""

    route: Route
    keep_alive: bool
    body: list[bytes]


class DataPlaneProtocol(LimitedHttpToolsProtocol):
    """The limited protocol, answering inference requests without the ASGI machinery."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        app = self.app
        while not isinstance(app, Bridge) and hasattr(app, "app"):  # through uvicorn's middleware
            app = app.app
        self.bridge = app if isinstance(app, Bridge) else None
        self.direct: Direct | None = None
        self.direct_size = 0
        self.reading_paused = False
        """Whether reading was paused because the client does not read its answers."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.direct = None

    def start_request(self) -> None:
        if not self._answers_itself():
            super().start_request()

    def _answers_itself(self) -> bool:
        """Whether this request is one the protocol answers (then `direct` holds it)."""
        bridge, parser = self.bridge, self.parser
        if bridge is None or parser.get_method() != b"POST" or parser.should_upgrade():
            return False
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete) or \
                (self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency):
            return False  # answered in turn, or refused with uvicorn's 503
        try:
            path = httptools.parse_url(self.url).path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return False  # uvicorn answers it
        path = urllib.parse.unquote(path) if "%" in path else path
        if self.root_path or (route := bridge.dataplane.route(path)) is None:
            return False
        version = parser.get_http_version()
        self.direct = Direct(route, version != "1.0" and parser.should_keep_alive(), [])
        self.direct_size = 0
        self.scope["method"], self.scope["path"], self.scope["http_version"] = "POST", path, version
        if self.expect_100_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def on_body(self, body: bytes) -> None:
        if self.direct is None:
            super().on_body(body)
            return
        self.direct_size += len(body)
        if self.direct_size <= self.bridge.limit:  # past it, the rest is read and dropped
            self.direct.body.append(body)

    def on_message_complete(self) -> None:
        if self.direct is None:
            super().on_message_complete()
            return
        direct, self.direct = self.direct, None
        if self.direct_size > self.bridge.limit:
            status, headers, content = self.bridge.too_large()
        else:
            status, headers, content = self.bridge.infer(direct.route, "POST", self.headers,
                                                         b"".join(direct.body))
        keep_alive = direct.keep_alive and not self.transport.is_closing()
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        head.append(content)
        self.transport.write(b"".join(head))
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', "{}:{}".format(*self.client) if self.client else "",
                                    "POST", urllib.parse.quote(self.scope["path"]),
                                    self.scope["http_version"], status)
        self.bridge.dataplane.after()  # what the answer left to do (the cache's stores), once it is written
        if not keep_alive:
            self.server_state.total_requests += 1
            self.transport.close()
            return
        self.on_response_complete()  # counted; the keep-alive timeout armed
        if self.flow.write_paused and not self.reading_paused:  # answers pile up unread: read no more for now
            self.reading_paused = True
            self.flow.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.reading_paused:
            self.reading_paused = False
            self.flow.resume_reading()

    def shutdown(self) -> None:
        if self.direct is None:
            super().shutdown()
        else:  # its body is still coming: answer it, then close
            self.direct = self.direct._replace(keep_alive=False)


class WebWorker(UvicornWorker):
    """gunicorn's worker process serving the ASGI app on uvloop with the data-plane protocol."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.cfg  # gunicorn's 0 means no limit
        limits = Limits(cfg.limit_request_line or sys.maxsize, cfg.limit_request_fields or sys.maxsize,
                        cfg.limit_request_field_size or sys.maxsize)
        self.config.http = functools.partial(DataPlaneProtocol, limits=limits)
        self.config.limit_concurrency = cfg.worker_connections
        self.config.timeout_notify = min(self.timeout, PARENT_CHECK_S)

    async def callback_notify(self) -> None:
        """The heartbeat gunicorn's master watches; and, if the master is gone (killed), a clean stop, as
        gunicorn's own workers make: uvicorn's worker would serve on, an orphan holding the port."""
        if self.ppid != os.getppid():
            self.log.info("master %s gone: stopping worker %s", self.ppid, self.pid)
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: a graceful shutdown
        self.notify()
