"""Shared fixtures: the app and its client, a scratch model repository, and the real services."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy
from flask import Flask
from flask.testing import FlaskClient

from models.config import PACKAGE_DIR
from webapp import close_app, create_app

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
EAGER = {"task_always_eager": True, "task_eager_propagates": True}
"""Celery options of the fast unit tests: a task runs in the request that sends it. Eager mode is an emulation
(no acks, prefetch, time limits or worker signals): every pattern also has tests through real workers."""
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def redis_url() -> Iterator[str]:
    """The test Redis, also where tasks run in-process (eager mode) keep their jobs."""
    previous = os.environ.get("REDIS_URL")
    os.environ["REDIS_URL"] = REDIS_URL
    yield REDIS_URL
    if previous is None:
        del os.environ["REDIS_URL"]
    else:
        os.environ["REDIS_URL"] = previous


@pytest.fixture(scope="session", autouse=True)
def database_url() -> Iterator[str]:
    """The test MariaDB, its schema made afresh by the migrations; also where workers keep batch items."""
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = DATABASE_URL
    reset_schema(DATABASE_URL)
    yield DATABASE_URL
    if previous is None:
        del os.environ["DATABASE_URL"]
    else:
        os.environ["DATABASE_URL"] = previous


def reset_schema(url: str) -> None:
    """Drop the platform's tables at `url` and build them again with the migrations."""
    from tasks import db

    engine = db.create_engine(url)
    db.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    db.upgrade(url)


@pytest.fixture
def batch_tables(database_url: str) -> Iterator[sqlalchemy.Engine]:
    """The test database's batch tables, emptied first."""
    from tasks import db

    engine = db.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(db.items.delete())
        connection.execute(db.runs.delete())
    yield engine
    engine.dispose()


@pytest.fixture
def app() -> Iterator[Flask]:
    """The app over the committed model repository."""
    app = create_app({"TESTING": True, "reload_interval_s": 0.0})
    yield app
    close_app(app)


@pytest.fixture
def make_eager_app(redis_url: str) -> Iterator[Callable[..., Flask]]:
    """Build apps whose tasks run eagerly, over the test Redis unless `config` says otherwise; each is closed
    at teardown."""
    made: list[Flask] = []

    def make(**config: object) -> Flask:
        made.append(create_app({"TESTING": True, "redis_url": redis_url, "celery": EAGER, **config}))
        return made[-1]

    yield make
    for app in made:
        close_app(app)


@pytest.fixture
def eager_client(make_eager_app: Callable[..., Flask]) -> FlaskClient:
    """A client of an app whose tasks run in the request, over the test Redis."""
    return make_eager_app().test_client()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of `app`."""
    return app.test_client()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A scratch model repository holding a copy of the committed `iris` model."""
    shutil.copytree(PACKAGE_DIR / "iris", tmp_path / "iris")
    return tmp_path


@pytest.fixture
def repo_app(repo: Path) -> Iterator[Flask]:
    """The app over the scratch repository, rescanning it on every request."""
    app = create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0})
    yield app
    close_app(app)


@pytest.fixture
def repo_client(repo_app: Flask) -> Iterator[FlaskClient]:
    """A test client of `repo_app`."""
    yield repo_app.test_client()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop the run, as a failure, when the real Redis or MariaDB the suite needs is not there."""
    import redis

    problems = []
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).flushdb()  # the suite's own database
    except redis.RedisError as exc:
        problems.append(f"Redis at {REDIS_URL}: {exc}")
    try:
        engine = sqlalchemy.create_engine(DATABASE_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        problems.append(f"MariaDB at {DATABASE_URL}: {exc}")
    if problems:
        pytest.exit("required services are missing (see README, 'Tests'):\n  " + "\n  ".join(problems), 3)


@contextlib.contextmanager
def web_server(log: Path | None = None, **settings: str) -> Iterator[str]:
    """The web process under gunicorn with the project's config and `settings` as environment, one worker, on a
    free port; answers its base URL once it is ready. One worker: once it answers it has booted, so the SIGTERM
    at the end cannot reach a worker still starting, which gunicorn would only stop after its graceful timeout."""
    port = free_port()
    env = {**os.environ, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", "REDIS_URL": REDIS_URL, **settings}
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                                   text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/v2/health/ready", process)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """The web process under gunicorn as deployed, on a free port; answers its base URL."""
    with web_server() as url:
        yield url


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 60, **kwargs: object) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stderr.read() if process.stderr else ""
            pytest.fail(f"{process.args} exited with {process.returncode}:\n{output[-3000:]}")
        try:
            if requests.get(url, timeout=5, **kwargs).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer within {timeout_s} s")
