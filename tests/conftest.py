"""Shared fixtures: the app and its client, a scratch model repository, and the real services."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from models.config import PACKAGE_DIR
from webapp import create_app

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.fixture
def app() -> Flask:
    """The app over the committed model repository."""
    return create_app({"TESTING": True, "reload_interval_s": 0.0})


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
def repo_app(repo: Path) -> Flask:
    """The app over the scratch repository, rescanning it on every request."""
    return create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0})


@pytest.fixture
def repo_client(repo_app: Flask) -> Iterator[FlaskClient]:
    """A test client of `repo_app`."""
    yield repo_app.test_client()
