"""Gunicorn settings of the web process: workers and onnxruntime threads sized to the cores.

Sessions are never created in the master: the app is not preloaded, and each worker loads its
sessions after fork (post_worker_init), so a broken artefact shows in the log at start-up.
"""

import gc
import os
import shutil
import tempfile

from models import Registry, Settings

cores = os.cpu_count() or 1
web_threads = int(os.environ.get("WEB_THREADS", 4))
wsgi_app = f"webapp.asgi:create_asgi_app(threads={web_threads})"
bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", cores))
# event-loop workers (uvicorn on uvloop and httptools) hold the connections; cheap inference runs on the loop,
# the rest on `web_threads` (webapp/asgi.py)
worker_class = "deploy.worker.WebWorker"
worker_connections = int(os.environ.get("WEB_MAX_CONNECTIONS", 4096))  # per worker; past it, 503
preload_app = False
control_socket_disable = True  # one shared default path would collide between instances
keepalive = 30
timeout = 60
graceful_timeout = 20
accesslog = os.environ.get("ACCESS_LOG") or None
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# the workers write their metrics to files there (prometheus-client's multiprocess mode), which GET /metrics
# adds up: a directory of this server's own, made for it when none is given, emptied at start
metrics_dir_made = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if metrics_dir_made:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="web-metrics-")
# processes x onnxruntime threads must not exceed the cores, or they fight over them
os.environ.setdefault("ORT_INTRA_OP_THREADS", str(max(1, cores // workers)))


def when_ready(server) -> None:
    """Report broken specs and artefacts once, from the master, without creating any session."""
    registry = Registry(Settings.from_env())
    names = [m.spec.name for m in registry.models()]
    server.log.info("model repository %s: serving %s", registry.root, ", ".join(names) or "nothing")
    for message in registry.problems.values():
        server.log.error("model repository: %s", message)


def post_worker_init(worker) -> None:
    """Load every session in the new worker, after fork; then freeze what start-up made, so the garbage
    collector's full passes, which would walk every module, class and session object, skip it (these
    passes were what lengthened the slowest requests)."""
    worker.wsgi.flask.extensions["registry"].warm()
    gc.collect()
    gc.freeze()


def on_starting(server) -> None:
    """Empty the metrics directory of an earlier run's files; format the master's log lines as LOG_FORMAT says."""
    from tasks import logs, metrics  # here, once PROMETHEUS_MULTIPROC_DIR is set: prometheus-client reads it on import

    metrics.prepare_directory()
    logs.configure([server.log.error_log, server.log.access_log])


def child_exit(server, worker) -> None:
    """Let a worker that exited stop counting as live; what it counted stays in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics directory made for this server."""
    if metrics_dir_made:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
