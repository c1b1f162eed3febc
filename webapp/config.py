"""Settings of the web process, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WebSettings:
    """Typed settings with safe development defaults; each maps to one environment variable."""

    max_request_bytes: int = 32 * 1024 * 1024
    """MAX_REQUEST_BYTES: largest request body, also once decompressed; larger bodies get 413."""
    max_data_bytes: int = 8 * 1024 * 1024
    """MAX_DATA_BYTES: largest raw input `POST /v1/data` stores; keep it under the database's packet limit."""
    request_body_timeout_s: float = 30.0
    """REQUEST_BODY_TIMEOUT_S: longest a request body may take to arrive, in all; slower gets 408."""
    log_level: str = "INFO"
    """LOG_LEVEL: level of the platform's own log lines."""
    prediction_cache: bool = True
    """PREDICTION_CACHE: cache synchronous predictions of models whose spec sets `cache_ttl_s` (`on` or `off`)."""
    prediction_cache_local_mb: float = 64.0
    """PREDICTION_CACHE_LOCAL_MB: memory each web process gives its own copy of the latest entries (0: none)."""
    bind: str = "127.0.0.1:8000"
    """BIND: address the web server listens on; only loopback addresses may serve without API keys."""
    api_keys: str = "auto"
    """API_KEYS: `auto` (keys needed unless BIND is loopback and no key exists), `on`, or `off` (loopback only)."""
    rate_limit: str = "1000/second"
    """RATE_LIMIT: requests a key may make, e.g. `100/second`, unless it has its own; empty: no default limit."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WebSettings:
        """Read the settings from environment variables, falling back to the defaults."""
        return cls(
            max_request_bytes=int(env.get("MAX_REQUEST_BYTES", cls.max_request_bytes)),
            max_data_bytes=int(env.get("MAX_DATA_BYTES", cls.max_data_bytes)),
            request_body_timeout_s=float(env.get("REQUEST_BODY_TIMEOUT_S", cls.request_body_timeout_s)),
            log_level=env.get("LOG_LEVEL", cls.log_level).upper(),
            prediction_cache=env.get("PREDICTION_CACHE", "on").lower() not in ("off", "0", "false", "no"),
            prediction_cache_local_mb=float(env.get("PREDICTION_CACHE_LOCAL_MB", cls.prediction_cache_local_mb)),
            bind=env.get("BIND", cls.bind),
            api_keys=env.get("API_KEYS", cls.api_keys).strip().lower(),
            rate_limit=env.get("RATE_LIMIT", cls.rate_limit).strip(),
        )
