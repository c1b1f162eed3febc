"""API keys on the real MariaDB and Redis: the CLI, digests, when auth is on, scopes, rates and revocation."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from flask import Blueprint, Flask, Response, g
from flask.testing import FlaskClient

from tasks import db
from webapp import errors
from webapp.auth import (
    ANONYMOUS,
    ENDPOINT_SCOPES,
    OPEN,
    Auth,
    Forbidden,
    RateLimited,
    Unauthorized,
    install,
    is_loopback,
)
from webapp.config import WebSettings
from webapp.keys import TOKEN, KeyStore
from webapp.quota import Quota
from webapp.responses import json_response

ROOT = Path(__file__).resolve().parent.parent
ROUTES = (("v2", "/v2/health/live", "live"), ("jobs", "/v1/models/<name>:submit", "submit"),
          ("catalog", "/v1/models", "index"), ("extra", "/v1/extra", "extra"))
"""Routes named as the app's: a health probe, a `submit` one, a metadata one, and one no scope is mapped to."""


@pytest.fixture
def store(database_url: str) -> Iterator[KeyStore]:
    """The key store of the test database, empty before and after (other tests' apps must find no key)."""
    engine = db.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(db.api_keys.delete())
    yield KeyStore(engine)
    with engine.begin() as connection:
        connection.execute(db.api_keys.delete())
    engine.dispose()


@pytest.fixture
def limits_redis(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis, without the rate limiter's counters."""
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys("LIMITS:*") or ["none"])
    yield client
    client.close()


@pytest.fixture
def make_auth(store: KeyStore, redis_url: str, limits_redis: redis.Redis) -> Callable[..., Auth]:
    """Auth on the test stores, its caches short-lived."""
    def make(mode: str = "auto", bind: str = "127.0.0.1:8000", rate: str | None = "1000/second") -> Auth:
        return Auth(store, Quota(redis_url, rate), mode, bind, ttl_s=0.2)
    return make


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": os.environ["DATABASE_URL"]}
    return subprocess.run([sys.executable, "-m", "webapp.keys", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def rows(store: KeyStore) -> list[sa.Row]:
    with store.engine.connect() as connection:
        return connection.execute(sa.select(db.api_keys).order_by(db.api_keys.c.id)).all()


def small_app(auth: Auth) -> FlaskClient:
    app = Flask(__name__)
    errors.register(app)
    for name, rule, endpoint in ROUTES:
        blueprint = Blueprint(name, __name__)
        blueprint.add_url_rule(rule, endpoint, _caller, methods=["GET", "POST"])
        app.register_blueprint(blueprint)
    install(app, auth)
    return app.test_client()


def _caller(**_: str) -> Response:
    return json_response({"key_id": g.identity.key_id})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_command_line_creates_lists_and_revokes_keys(store: KeyStore):
    created = cli("create", "--scope", "predict", "--scope", "submit", "--name", "ci", "--rate", "100/second")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    key_id, secret = TOKEN.fullmatch(token).groups()
    [row] = rows(store)
    assert (row.id, row.name, row.scopes, row.rate_limit, row.revoked_at) == (int(key_id), "ci", "predict submit",
                                                                              "100/second", None)
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(value) for value in row)
    listed = cli("list")
    assert listed.returncode == 0
    assert f"msp_{key_id}_..." in listed.stdout and "predict submit" in listed.stdout and "100/second" in listed.stdout
    assert secret[:6] not in listed.stdout and row.token_hash[:6] not in listed.stdout
    assert cli("revoke", key_id).returncode == 0
    assert rows(store)[0].revoked_at is not None
    assert cli("revoke", key_id).returncode == 1
    assert cli("revoke", str(int(key_id) + 1)).returncode == 1


def test_the_command_line_refuses_unknown_scopes_and_rates(store: KeyStore):
    assert cli("create", "--scope", "everything").returncode == 2
    refused = cli("create", "--scope", "predict", "--rate", "lots")
    assert refused.returncode == 2 and "lots" in refused.stderr
    assert rows(store) == []


def test_a_token_verifies_only_exactly_and_only_its_digest_is_stored(store: KeyStore):
    key, token = store.create(["predict"])
    other, other_token = store.create(["admin"], "ops", "5/minute")
    secret = TOKEN.fullmatch(token)[2]
    assert store.verify(token) == key and store.verify(other_token) == other
    assert (key.scopes, other.rate_limit) == ({"predict"}, "5/minute")
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify(f"msp_{other.id}_{secret}") is None
    assert store.verify(f"msp_{key.id + 100}_{secret}") is None
    assert all(secret not in str(value) for row in rows(store) for value in row)
    with pytest.raises(ValueError, match="scopes"):
        store.create(["predict", "root"])


@pytest.mark.parametrize(("bind", "loopback"), [
    ("127.0.0.1:8000", True), ("127.8.9.1:80", True), ("[::1]:8000", True), ("::1", True), ("localhost:8000", True),
    ("127.0.0.1:8000 [::1]:8000", True), ("0.0.0.0:8000", False), (":8000", False), ("10.0.0.5:8000", False),
    ("[::]:8000", False), ("127.0.0.1:8000,0.0.0.0:9000", False), ("unix:/tmp/web.sock", False), ("", False),
])
def test_loopback_binds(bind: str, loopback: bool):
    assert is_loopback(bind) is loopback


def test_auto_mode_serves_loopback_openly_until_a_key_exists(store: KeyStore, make_auth: Callable[..., Auth]):
    auth = make_auth()
    assert auth.check(None, "predict") is ANONYMOUS
    _, token = store.create(["predict"])
    time.sleep(0.3)
    with pytest.raises(Unauthorized):
        auth.check(None, "predict")
    assert auth.check(f"Bearer {token}", "predict").scopes == {"predict"}
    store.revoke(auth.identify(f"Bearer {token}").key_id)
    time.sleep(0.3)
    with pytest.raises(Unauthorized):  # revoking the last key does not open the server again
        auth.check(None, "predict")


def test_keys_are_needed_off_loopback_or_when_on_and_off_is_refused_off_loopback(store: KeyStore,
                                                                                make_auth: Callable[..., Auth]):
    for auth in (make_auth(bind="0.0.0.0:8000"), make_auth(mode="on")):
        with pytest.raises(Unauthorized) as refused:
            auth.check(None, None)
        assert refused.value.status == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer ")
    store.create(["predict"])
    assert make_auth(mode="off").check(None, "admin") is ANONYMOUS
    with pytest.raises(ValueError, match="loopback"):
        make_auth(mode="off", bind="0.0.0.0:8000")
    with pytest.raises(ValueError, match="API_KEYS"):
        make_auth(mode="maybe")
    settings = WebSettings.from_env({"API_KEYS": " On ", "BIND": "[::1]:9000", "RATE_LIMIT": "7/minute"})
    assert (settings.api_keys, settings.bind, settings.rate_limit) == ("on", "[::1]:9000", "7/minute")
    assert Auth.from_settings(settings, store.engine, "redis://127.0.0.1:1/0").required()
    with pytest.raises(ValueError, match="RATE_LIMIT"):
        Auth.from_settings(WebSettings.from_env({"RATE_LIMIT": "often"}), store.engine, "redis://127.0.0.1:1/0")


def test_an_unreadable_key_store_keeps_the_last_known_state(store: KeyStore, make_auth: Callable[..., Auth],
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture):
    unmigrated = KeyStore(db.create_engine(f"sqlite:///{tmp_path / 'empty.db'}"))
    # a loopback server that never read its keys serves its own host without them, as before any key existed
    assert Auth(unmigrated, Quota("redis://127.0.0.1:1/0", None), ttl_s=0.2).check(None, "predict") == ANONYMOUS
    with pytest.raises(Unauthorized):  # any other needs keys whatever the store says
        Auth(unmigrated, Quota("redis://127.0.0.1:1/0", None), bind="0.0.0.0:8000").check(None, "predict")
    auth = make_auth()
    store.create(["predict"])
    with pytest.raises(Unauthorized):
        auth.check(None, "predict")
    auth.keys = unmigrated
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING), pytest.raises(Unauthorized):
        auth.check(None, "predict")
    assert [r for r in caplog.records if "auth stays on" in r.getMessage()]
    unmigrated.engine.dispose()


def test_flask_routes_answer_401_and_403_with_their_headers(store: KeyStore, make_auth: Callable[..., Auth]):
    client = small_app(make_auth(mode="on"))
    predict, predict_token = store.create(["predict"])
    submit, submit_token = store.create(["submit"])
    _, admin_token = store.create(["admin"])
    assert client.get("/v2/health/live").status_code == 200
    missing = client.post("/v1/models/iris:submit")
    assert missing.status_code == 401 and "Bearer" in missing.get_json()["error"]
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="ml-serving-platform"'
    for header in ("Basic dXNlcjpwYXNz", "Bearer msp_1_short", f"Bearer msp_{submit.id + 9}_{'x' * 43}"):
        wrong = client.post("/v1/models/iris:submit", headers={"Authorization": header})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    denied = client.post("/v1/models/iris:submit", headers=bearer(predict_token))
    assert denied.status_code == 403 and "'submit'" in denied.get_json()["error"]
    assert 'error="insufficient_scope", scope="submit"' in denied.headers["WWW-Authenticate"]
    assert client.post("/v1/models/iris:submit", headers=bearer(submit_token)).get_json() == {"key_id": submit.id}
    assert client.get("/v1/models", headers=bearer(predict_token)).get_json() == {"key_id": predict.id}
    assert client.get("/v1/extra", headers=bearer(submit_token)).status_code == 403
    assert client.get("/v1/extra", headers=bearer(admin_token)).status_code == 200
    assert client.post("/v1/models/iris:submit", headers=bearer(admin_token)).status_code == 200


def test_a_key_over_its_rate_gets_429_with_retry_after(store: KeyStore, make_auth: Callable[..., Auth],
                                                        limits_redis: redis.Redis):
    client = small_app(make_auth(mode="on", rate="2/second"))
    limited, limited_token = store.create(["submit"], rate_limit="3/second")
    _, default_token = store.create(["submit"])
    answers = [client.post("/v1/models/iris:submit", headers=bearer(limited_token)) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert int(answers[3].headers["Retry-After"]) >= 1 and "rate" in answers[3].get_json()["error"]
    assert limits_redis.keys(f"LIMITS:*/key/{limited.id}/*")
    defaults = [client.post("/v1/models/iris:submit", headers=bearer(default_token)).status_code for _ in range(3)]
    assert defaults == [200, 200, 429]
    time.sleep(int(answers[3].headers["Retry-After"]) + 0.1)
    assert client.post("/v1/models/iris:submit", headers=bearer(limited_token)).status_code == 200


def test_anonymous_callers_are_not_limited(make_auth: Callable[..., Auth], limits_redis: redis.Redis):
    auth = make_auth(rate="1/second")
    assert all(auth.check(None, "submit") is ANONYMOUS for _ in range(5))
    assert limits_redis.keys("LIMITS:*") == []


def test_scope_and_rate_errors_come_from_the_check(store: KeyStore, make_auth: Callable[..., Auth]):
    auth = make_auth(mode="on", rate="1/second")
    _, token = store.create(["data"])
    with pytest.raises(Forbidden):
        auth.check(f"bearer {token}", "batch")
    auth.check(f"bearer {token}", "data")
    with pytest.raises(RateLimited) as limited:
        auth.check(f"bearer {token}", None)
    assert (limited.value.status, int(limited.value.headers["Retry-After"]) >= 1) == (429, True)


def test_a_revoked_key_is_refused_once_the_cache_expires(store: KeyStore, make_auth: Callable[..., Auth]):
    auth = make_auth(mode="on")
    key, token = store.create(["predict"])
    assert auth.check(f"Bearer {token}", "predict").key_id == key.id
    assert store.revoke(key.id)
    time.sleep(0.3)
    with pytest.raises(Unauthorized, match="revoked"):
        auth.check(f"Bearer {token}", "predict")


def test_the_limiter_lets_requests_through_when_redis_is_down(caplog: pytest.LogCaptureFixture):
    quota = Quota("redis://127.0.0.1:1/0", "1/second")
    with caplog.at_level(logging.WARNING):
        assert [quota.wait(1) for _ in range(3)] == [0, 0, 0]
    assert [r for r in caplog.records if "rate limiter" in r.getMessage()]


def test_every_route_of_the_app_has_a_scope(app: Flask):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()} - {"static"}
    assert sorted(endpoints - OPEN - set(ENDPOINT_SCOPES)) == []
    assert sorted((OPEN | set(ENDPOINT_SCOPES)) - endpoints) == []


def test_a_process_takes_a_fast_key_s_rate_in_leases_and_checks_it_without_io(
        store: KeyStore, make_auth: Callable[..., Auth], redis_url: str):
    auth = make_auth(mode="on")
    key, token = store.create(["predict"], rate_limit="1000/second")
    header = f"Bearer {token}"
    assert auth.check_at_once(header, "predict") is None  # not verified here yet: the key store must be read
    auth.check(header, "predict")  # verified, and a lease of 10 taken from Redis (one of it spent)
    counted = redis.Redis.from_url(redis_url)
    window = [k for k in counted.scan_iter("LIMITS:*") if str(key.id).encode() in k]
    assert window and int(counted.get(window[0])) == 10  # the whole lease, counted at once
    checked = [auth.check_at_once(header, "predict") for _ in range(10)]
    assert [c is not None and c.key_id == key.id for c in checked] == [True] * 9 + [False]  # spent: ask Redis
    assert auth.check_at_once(header, "submit") is None  # a scope it lacks is refused by the full check
    counted.close()


def test_concurrent_processes_never_exceed_a_key_s_rate(store: KeyStore, make_auth: Callable[..., Auth]):
    _, token = store.create(["predict"], rate_limit="50/minute")
    processes = [make_auth(mode="on") for _ in range(3)]  # each with its own leases, one count in Redis
    allowed = 0
    for n in range(90):
        try:
            processes[n % 3].check(f"Bearer {token}", "predict")
            allowed += 1
        except RateLimited:
            pass
    assert allowed == 50
