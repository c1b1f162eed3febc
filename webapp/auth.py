"""Who may call: `Authorization: Bearer <token>` API keys, the scope each endpoint needs, a rate per key.

Keys are needed unless the server binds only loopback addresses and no key was ever created
(`API_KEYS=auto`); `on` always needs them, `off` never, and is refused unless the bind is loopback.
Whether a key exists is read again every `ttl_s`, and a verified token is remembered as long, so a
checked request costs a dictionary lookup and a count in its rate lease (`webapp.quota`), with no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import threading
import time
from typing import NamedTuple

import sqlalchemy as sa
from flask import Flask, Response, g, request

from webapp.config import WebSettings
from webapp.errors import RequestError
from webapp.keys import ADMIN, SCOPES, ApiKey, KeyStore, parse_token
from webapp.quota import Quota
from webapp.responses import json_response

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
CHALLENGE = 'Bearer realm="ml-serving-platform"'
OPEN = frozenset({"v2.live", "v2.ready"})
"""Endpoints that never need a key: the health probes."""
VERIFIED_MAX = 4096
"""Tokens remembered at most (known and unknown alike), so random tokens cannot grow the memory."""
DATA_PLANE = frozenset({"inference.infer"})
"""Endpoints whose requests the data plane checks itself (`predict`), so their rate is not counted twice."""
ENDPOINT_SCOPES: dict[str, str | None] = {
    "inference.infer": "predict",
    **dict.fromkeys(("catalog.index", "catalog.openapi_document", "tfserving.status", "tfserving.metadata",
                     "v2.server_metadata", "v2.model_metadata", "v2.model_ready"), None),
    "catalog.cache_stats": ADMIN,
    "experiments.report": ADMIN,
    "metrics.scrape": ADMIN,
    **dict.fromkeys(("monitoring.log", "monitoring.drift"), ADMIN),
    **dict.fromkeys(("jobs.submit", "jobs.status", "jobs.cancel", "pipelines.predict", "ensembles.predict"), "submit"),
    **dict.fromkeys(("batch.register", "batch.item", "batch.list_items", "batch.trigger", "batch.run",
                     "batch.history"), "batch"),
    **dict.fromkeys(("data.put", "data.get", "data.warm"), "data"),
}
"""The scope each Flask endpoint needs; None: any valid key (metadata)."""


class AuthError(RequestError):
    """A request refused for who sent it; `headers` go on the answer."""

    status = 401

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}


class Unauthorized(AuthError):
    """No key, or one that is malformed, unknown or revoked."""


class Forbidden(AuthError):
    """A valid key without the scope the endpoint needs."""

    status = 403


class RateLimited(AuthError):
    """A key over its rate; `Retry-After` says in how many seconds its window resets."""

    status = 429


class Identity(NamedTuple):
    """The caller: a key (its scopes widened to all by `admin`), or anonymous (`key_id` None) when auth is off."""

    key_id: int | None
    name: str
    scopes: frozenset[str]
    rate_limit: str | None = None

    @classmethod
    def of(cls, key: ApiKey) -> Identity:
        """The identity of a verified key."""
        return cls(key.id, key.name, frozenset(SCOPES) if ADMIN in key.scopes else key.scopes, key.rate_limit)


ANONYMOUS = Identity(None, "anonymous", frozenset(SCOPES))


def scope_of(endpoint: str | None) -> str | None:
    """The scope a Flask endpoint needs: None for any valid key; `admin` for an endpoint not mapped."""
    return None if endpoint is None else ENDPOINT_SCOPES.get(endpoint, ADMIN)


def is_loopback(bind: str) -> bool:
    """Whether every address of a BIND value (`host:port`, `[v6]:port`, space- or comma-separated) is loopback."""
    addresses = bind.replace(",", " ").split()
    return bool(addresses) and all(_loopback(address) for address in addresses)


def _loopback(address: str) -> bool:
    if address.startswith("["):
        host = address[1:].partition("]")[0]
    else:
        host = address if address.count(":") > 1 else address.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # all interfaces (""), host names, unix: and fd:// sockets: others may reach them


class Auth:
    """The app's key checks, built once: keys from `keys`, rates counted by `quota`."""

    def __init__(self, keys: KeyStore, quota: Quota, mode: str = "auto", bind: str = "127.0.0.1:8000",
                 ttl_s: float = 5.0):
        loopback = is_loopback(bind)
        if mode not in MODES:
            raise ValueError(f"API_KEYS must be one of {', '.join(MODES)}, not {mode!r}")
        if mode == "off" and not loopback:
            raise ValueError(f"API_KEYS=off is refused: BIND {bind!r} is not a loopback address")
        self.keys, self.quota, self.ttl_s = keys, quota, ttl_s
        self.always, self.never = mode == "on" or not loopback, mode == "off"
        self.exists: bool | None = None
        self.recheck_at = 0.0
        self.verified: dict[str, tuple[Identity | None, float]] = {}
        """Token -> (its identity, None if unknown; when to verify it again, monotonic), oldest first."""
        self.lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: WebSettings, engine: sa.Engine, redis_url: str) -> Auth:
        """Auth with the keys of the SQL store at `engine` and rates counted in the Redis at `redis_url`."""
        try:
            quota = Quota(redis_url, settings.rate_limit or None)
        except ValueError as exc:
            raise ValueError(f"RATE_LIMIT={settings.rate_limit!r}: {exc}") from None
        return cls(KeyStore(engine), quota, settings.api_keys, settings.bind)

    def required(self) -> bool:
        """Whether requests need a key now; in auto mode, whether a key exists is read at most every `ttl_s`."""
        if self.always or self.never:
            return self.always
        if time.monotonic() >= self.recheck_at:
            self._recheck()
        return bool(self.exists)

    def known_off(self) -> bool:
        """Whether requests need no key, known without reading the key store (so with no I/O)."""
        return self.never or (not self.always and self.exists is False and time.monotonic() < self.recheck_at)

    def check_at_once(self, header: str | None, scope: str) -> Identity | None:
        """Check a caller with no I/O, if that can be done: its identity (ANONYMOUS when keys are known to be
        off) when its key was verified lately, has `scope` and has room left in its rate's lease here (one
        request is counted); None when the check needs the key store or Redis (nothing is counted; `check`)."""
        if self.known_off():
            return ANONYMOUS
        if not self.always and time.monotonic() >= self.recheck_at:
            return None
        scheme, _, token = (header or "").strip().partition(" ")
        entry = self.verified.get(token.strip()) if scheme.lower() == "bearer" else None  # entries replaced whole
        if entry is None or time.monotonic() >= entry[1] or entry[0] is None or scope not in entry[0].scopes:
            return None
        found = entry[0]
        return found if self.quota.take(found.key_id, found.rate_limit) else None

    def check(self, header: str | None, scope: str | None) -> Identity:
        """The caller sending this Authorization header, allowed `scope` (None: any key will do) and within its
        rate; Unauthorized, Forbidden or RateLimited otherwise."""
        if not self.required():
            return ANONYMOUS
        identity = self.identify(header)
        if scope is not None and scope not in identity.scopes:
            raise Forbidden(f"API key {identity.key_id} lacks the scope {scope!r} this endpoint needs",
                            {"WWW-Authenticate": f'{CHALLENGE}, error="insufficient_scope", scope="{scope}"'})
        wait = self.quota.wait(identity.key_id, identity.rate_limit)
        if wait:
            raise RateLimited(f"API key {identity.key_id} is over its rate limit; retry in {wait} s",
                              {"Retry-After": str(wait)})
        return identity

    def identify(self, header: str | None) -> Identity:
        """The key a `Bearer` Authorization header carries; Unauthorized if none, or not a valid one."""
        token = _bearer(header)
        entry = self.verified.get(token)
        if entry is not None and time.monotonic() < entry[1]:
            found = entry[0]
        else:
            key = self.keys.verify(token)
            found = None if key is None else Identity.of(key)
            self._remember(token, found)
        if found is None:
            raise Unauthorized("the API key is unknown or revoked", {"WWW-Authenticate": _invalid()})
        return found

    def _remember(self, token: str, found: Identity | None) -> None:
        with self.lock:
            self.verified.pop(token, None)
            while len(self.verified) >= VERIFIED_MAX:
                del self.verified[next(iter(self.verified))]  # the oldest, so the first to expire (one ttl for all)
            self.verified[token] = (found, time.monotonic() + self.ttl_s)

    def close(self) -> None:
        """Close the rate limiter's connections (the key store's engine belongs to the app)."""
        self.quota.close()

    def _recheck(self) -> None:
        try:
            exists = self.keys.exists()
        except sa.exc.DBAPIError as exc:
            # only a loopback server asks (any other always needs keys): one that could never read its keys
            # serves its own host without them, as it did before a key existed, until it can
            self.exists = bool(self.exists)
            log.warning("API keys unreadable, auth stays %s: %s", "on" if self.exists else "off", exc)
        else:
            if exists and not self.exists:
                log.info("API keys exist: requests need one from now on")
            self.exists = exists
        self.recheck_at = time.monotonic() + self.ttl_s


def _bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": CHALLENGE})
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or parse_token(token) is None:
        raise Unauthorized("the Authorization header must be 'Bearer <token>', the token as "
                           "`python -m webapp.keys create` printed it", {"WWW-Authenticate": _invalid()})
    return token


def _invalid() -> str:
    return f'{CHALLENGE}, error="invalid_token"'


def install(app: Flask, auth: Auth) -> None:
    """Check the key of every request Flask dispatches against its endpoint's scope, before the view runs."""
    app.extensions["auth"] = auth
    app.before_request(functools.partial(_authorize, auth))
    app.register_error_handler(AuthError, _refused)


def _authorize(auth: Auth) -> None:
    endpoint = request.endpoint
    if endpoint in OPEN:
        g.identity = ANONYMOUS
    elif endpoint not in DATA_PLANE:
        g.identity = auth.check(request.headers.get("Authorization"), scope_of(endpoint))


def _refused(exc: AuthError) -> Response:
    return json_response({"error": str(exc)}, exc.status, exc.headers)
