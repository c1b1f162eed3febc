"""The web worker class gunicorn runs: uvicorn's worker on uvloop and httptools, as uvicorn-worker documents.

Two settings of gunicorn's reach uvicorn here: `worker_connections` bounds the connections and requests a
worker holds at once (past it, uvicorn answers 503), and a worker whose gunicorn master is gone (killed)
stops, as gunicorn's own workers do, rather than serve on as an orphan holding the port.
uvicorn applies no limit of its own to a request head or to how long one may take to arrive; in front of
anything but loopback, run a reverse proxy that does (docs/architecture.md, "Exposure").
"""

from __future__ import annotations

import os
import resource
import signal
from typing import Any

from uvicorn_worker import UvicornWorker

PARENT_CHECK_S = 1.0
"""How often a worker tells gunicorn's master it is alive, and checks the master still is."""


class WebWorker(UvicornWorker):
    """gunicorn's worker process serving the ASGI app with uvicorn on uvloop and httptools."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "httptools"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config.limit_concurrency = self.cfg.worker_connections
        self.config.timeout_notify = min(self.timeout, PARENT_CHECK_S)
        _raise_open_files(self.cfg.worker_connections * 2 + 64)

    async def callback_notify(self) -> None:
        """The heartbeat gunicorn's master watches; and, if the master is gone, a graceful stop."""
        if self.ppid != os.getppid():
            self.log.info("master %s gone: stopping worker %s", self.ppid, self.pid)
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's handler: a graceful shutdown
        self.notify()


def _raise_open_files(wanted: int) -> None:
    """Let the process hold `wanted` descriptors (connections), within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
