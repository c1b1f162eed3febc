"""The data cache pattern: raw inputs kept durably in the SQL store by id, preprocessed tensors in Redis.

`put` stores an encoded image or the JSON of one instance under a random id (ids are looked up in the
table, never used as file names). `prepared` turns ids into the feeds a model version takes: each id's
preprocessed tensor is read from Redis (keyed by model, version, the version's fingerprint and the id,
with a TTL) and, on a miss, made from the stored input with the model's own preprocessing and written back.
Redis unreachable: the tensors are made from the SQL store every time.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import numpy as np
import redis
import sqlalchemy as sa

import models
from models import instances
from models.image import PixelBudget
from models.tensor import pack, unpack
from tasks.breaker import Breaker
from tasks.db import data, iso, now

log = logging.getLogger(__name__)
ID = re.compile(r"^[0-9a-f]{32}$")
KINDS = ("image", "instance")


class DataNotFound(LookupError):
    """No stored input has that id."""


class StoreUnavailable(Exception):
    """The SQL store of the inputs cannot be reached."""


def _sql(call: Any) -> Any:
    try:
        return call()
    except sa.exc.DBAPIError as exc:
        log.warning("data store unavailable: %s", exc)
        raise StoreUnavailable("the data store is unavailable; retry shortly") from None


class DataStore:
    """Stored inputs on one engine, their preprocessed tensors on one Redis."""

    def __init__(self, engine: sa.Engine, client: redis.Redis, ttl_s: int):
        self.engine, self.client, self.ttl_s = engine, client, ttl_s
        self.breaker = Breaker("data cache")

    def put(self, kind: str, content: bytes, content_type: str) -> dict[str, Any]:
        """Store one raw input; answer its record (id, kind, size, content type, time)."""
        row = {"id": uuid.uuid4().hex, "kind": kind, "content": content, "content_type": content_type,
               "size": len(content), "created_at": now()}
        _sql(lambda: self._insert(row))
        return _public(row)

    def _insert(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(data.insert().values(row))

    def get(self, data_id: str) -> dict[str, Any]:
        """A stored input's record, without its content; DataNotFound if there is none."""
        columns = (data.c.id, data.c.kind, data.c.content_type, data.c.size, data.c.created_at)
        query = sa.select(*columns).where(data.c.id == _checked(data_id))
        row = _sql(lambda: self._first(query))
        if row is None:
            raise DataNotFound(f"no stored input {data_id!r}")
        return _public(row._asdict())

    def prepared(self, version: models.ModelVersion, ids: list[str]) -> tuple[dict[str, np.ndarray], int]:
        """The feeds of `version` for the stored inputs `ids`, in order, one row each; and how many of them
        were not cached and had to be made."""
        feeds, made = self._feeds(version, ids)
        return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}, made

    def _feeds(self, version: models.ModelVersion, ids: list[str]) -> tuple[list[dict[str, np.ndarray]], int]:
        keys = [self._key(version, _checked(i)) for i in ids]
        cached = self.breaker.call(lambda: self.client.mget(keys)) or [None] * len(ids)
        missing = sorted({i for i, value in zip(ids, cached, strict=True) if value is None})
        pixels = PixelBudget(version.limits.request_pixels, "request")  # shared: one request decodes them all
        made = {i: _prepare(version, i, raw, pixels) for i, raw in self._raw(missing).items()} if missing else {}
        if made:
            self.breaker.call(lambda: self._store(version, made))
        return [unpack(v) if v is not None else made[i] for i, v in zip(ids, cached, strict=True)], len(made)

    def _raw(self, ids: list[str]) -> dict[str, tuple[str, bytes]]:
        """The kind and content of each id; DataNotFound naming the first id that is not stored."""
        query = sa.select(data.c.id, data.c.kind, data.c.content).where(data.c.id.in_(ids))
        found = {row.id: (row.kind, row.content) for row in _sql(lambda: self._all(query))}
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise DataNotFound(f"no stored input {unknown[0]!r}")
        return found

    def _first(self, query: sa.Select) -> sa.Row | None:
        with self.engine.connect() as connection:
            return connection.execute(query).first()

    def _all(self, query: sa.Select) -> list[sa.Row]:
        with self.engine.connect() as connection:
            return connection.execute(query).all()

    def _store(self, version: models.ModelVersion, made: dict[str, dict[str, np.ndarray]]) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            for data_id, feeds in made.items():
                pipe.set(self._key(version, data_id), pack(feeds), ex=self.ttl_s)
            pipe.execute()

    @staticmethod
    def _key(version: models.ModelVersion, data_id: str) -> str:
        return f"data:{version.key}:{data_id}"


def _prepare(version: models.ModelVersion, data_id: str, raw: tuple[str, bytes],
             pixels: PixelBudget) -> dict[str, np.ndarray]:
    try:
        return models.prepare(version, instances.from_stored(version, *raw), pixels=pixels)
    except (models.InvalidInput, models.InputTooLarge) as exc:
        raise type(exc)(f"stored input {data_id}: {exc}") from None


def _checked(data_id: object) -> str:
    if not isinstance(data_id, str) or not ID.match(data_id):
        raise DataNotFound(f"no stored input {data_id!r}: ids are 32 hexadecimal digits")
    return data_id


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {"data_id": row["id"], "kind": row["kind"], "content_type": row["content_type"], "size": row["size"],
            "created_at": iso(row["created_at"])}
