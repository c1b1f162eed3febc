"""Our web worker with uvicorn's h11 protocol in place of httptools, to measure what the protocol costs.

    gunicorn -c deploy/gunicorn.conf.py -k bench.h11_worker.H11WebWorker
"""

from __future__ import annotations

from deploy.worker import WebWorker


class H11WebWorker(WebWorker):
    """`deploy.worker.WebWorker` on uvloop with h11, which bounds request heads itself."""

    CONFIG_KWARGS = {"loop": "uvloop", "http": "h11"}
