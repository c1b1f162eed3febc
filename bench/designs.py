"""The asynchronous designs under load: a client for each, which submits jobs and sees them end.

Ours is the platform's job pipeline: a real Celery worker process (`-c 2`, every queue) with batching on or
off, and jobs queued the way `POST :submit` queues them, minus HTTP (`OursClient.submit`: the registry
lookup, the same input check, `JobStore.create`, then `tasks.lanes.dispatch`), or through the whole Flask
view with its test client (`OursClient.submit_web`). The reference is bench/brpop_reference.py.
A job has ended when its record says `succeeded` (ours) or its result key exists (the reference).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import redis

import models
from bench import brpop_reference, workers
from tasks import submission
from webapp import create_app

MODEL = "digits-light"
JOB_KEY = "job:{}"  # a job's record, as tasks/jobs.py keeps it


@dataclass(frozen=True)
class Design:
    """One measured design: ours with batching on or off, or the reference (`batching` None)."""

    name: str
    title: str
    batching: bool | None


DESIGNS = (
    Design("on", "ours, batching on", True),
    Design("off", "ours, batching off", False),
    Design("brpop", "reference: SET + LPUSH, BRPOP", None),
)


class Client(Protocol):
    """What the load needs of a design: submit one row, tell which jobs have ended, read a result; and
    the ids of its worker processes (their children included when paused)."""

    workers: list[int]

    def submit(self, row: np.ndarray) -> str: ...

    def finished(self, job_ids: list[str]) -> list[bool]: ...

    def answer(self, job_id: str) -> tuple[int, np.ndarray]: ...


class OursClient:
    """Jobs for the digits-light model, queued as `POST :submit` queues them, for a worker to run."""

    def __init__(self, url: str, batching: bool):
        self.app = create_app({"TESTING": True, "redis_url": url, "batching": batching, "log_level": "WARNING"})
        self.registry, self.store = self.app.extensions["registry"], self.app.extensions["jobs"]
        self.celery, self.lanes = self.app.extensions["celery"], self.app.extensions["batches"]
        self.web = self.app.test_client()
        self.workers: list[int] = []

    def submit(self, row: np.ndarray) -> str:
        """Queue one row the way webapp/jobs.py does, without the HTTP request: check, then submit."""
        found = self.registry.get(MODEL)
        inputs = {"pixels": row.reshape(1, -1)}
        models.prepare(found, inputs, images=False)
        job = submission.submit(self.celery, self.store, self.lanes, found, inputs, "rows", None, uuid.uuid4().hex)
        return job.id

    def submit_web(self, row: np.ndarray) -> str:
        """Queue one row through the Flask view, with the test client: `POST /v1/models/digits-light:submit`."""
        reply = self.web.post(f"/v1/models/{MODEL}:submit", json={"instances": [row.tolist()]})
        if reply.status_code != 202:
            raise SystemExit(f":submit answered {reply.status_code}: {reply.get_data(as_text=True)}")
        return reply.get_json()["job_id"]

    def finished(self, job_ids: list[str]) -> list[bool]:
        """Which of the jobs have succeeded, in one round trip; stop on one that failed."""
        pipe = self.store.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(JOB_KEY.format(job_id), "status")
        statuses = pipe.execute()
        for job_id, status in zip(job_ids, statuses, strict=True):
            if status not in (b"queued", b"running", b"succeeded"):
                raise SystemExit(f"job {job_id} is {status!r}: {self.store.get(job_id)}")
        return [status == b"succeeded" for status in statuses]

    def answer(self, job_id: str) -> tuple[int, np.ndarray]:
        """A succeeded job's label and probabilities, as `GET /v1/jobs/{id}` answers them."""
        (row,) = self.web.get(f"/v1/jobs/{job_id}").get_json()["result"]["predictions"]
        return row["label"], np.asarray(row["probabilities"], dtype=np.float32)

    def close(self) -> None:
        """Drop the connections to Redis."""
        self.celery.close()
        self.store.client.close()


class ReferenceClient:
    """Jobs for the reference's BRPOP workers."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.workers: list[int] = []

    def submit(self, row: np.ndarray) -> str:
        """SET the row under a new job id and LPUSH the id."""
        job_id = str(uuid.uuid4())
        brpop_reference.submit(self.client, job_id, row)
        return job_id

    def finished(self, job_ids: list[str]) -> list[bool]:
        """Which of the jobs have a result, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(brpop_reference.result_key(job_id))
        return [bool(found) for found in pipe.execute()]

    def answer(self, job_id: str) -> tuple[int, np.ndarray]:
        """A job's label and probabilities."""
        return brpop_reference.decode(self.client.get(brpop_reference.result_key(job_id)))


@contextlib.contextmanager
def running(design: Design, url: str, log_dir: Path) -> Iterator[Client]:
    """Flush the database, start the design's workers, yield a client once they answer, stop them after."""
    redis.Redis.from_url(url).flushdb()
    log = log_dir / f"{design.name}.log"
    if design.batching is None:
        reference = ReferenceClient(url)
        with workers.brpop_workers(url, log) as reference.workers:
            yield reference
        return
    client = OursClient(url, design.batching)
    try:
        with workers.celery_worker(client.celery, url, design.batching, log) as client.workers:
            yield client
    finally:
        client.close()


def expected(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime's own labels and probabilities for the rows, called in this process."""
    labels, probabilities = brpop_reference.session().run(["label", "probabilities"], {"pixels": rows})
    return labels, probabilities
