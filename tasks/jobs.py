"""Jobs in Redis: their record, their inputs and outputs under a TTL, and the ids ever issued.

A job's record lives as long as its result (`RESULT_EXPIRES_S`); its id is remembered longer
(`JOB_ID_RETENTION_S`), so an expired job answers 410 and an id never issued 404. State changes are
Lua scripts, so a redelivered or cancelled job can never be finished twice or resurrected.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from models import answer
from models.tensor import unpack
from tasks.status import JobStatus

_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
if #KEYS < 5 then return 0 end
redis.call('RPUSH', KEYS[4], ARGV[4])
if redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[5]) then return 1 end
return 0
"""
MAX_ATTEMPTS = 5
"""Starts a job may have (each stage is one; a worker lost mid-stage makes another) before it is failed."""
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'error',
             'gave up after ' .. (attempts - 1) .. ' starts: the worker running it was lost each time')
  redis.call('DEL', KEYS[2])
  return -1
end
redis.call('HSET', KEYS[1], 'status', 'running')
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return 1
"""
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
local ttl = redis.call('PTTL', KEYS[1])
if ARGV[5] ~= '' and ttl > 0 then redis.call('SET', KEYS[2], ARGV[5], 'PX', ttl) end
redis.call('DEL', KEYS[3])
return redis.call('HMGET', KEYS[1], 'callback_url', 'request_id')
"""


Push = tuple[str, str, int]
"""Where a new job goes to be batched: its lane's list key, the lane's armed key, the lane's lease (ms)."""


class JobNotFound(LookupError):
    """No job with that id was ever issued."""


class JobExpired(LookupError):
    """The job existed, but its record and result have expired."""


@dataclass(frozen=True)
class Job:
    """A job's record."""

    id: str
    model: str
    version: int
    status: JobStatus
    created_at: float
    shape: str
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    callback_url: str | None = None
    request_id: str | None = None
    members: dict[str, str] | None = None
    """For an ensemble's job: each member model's own job id."""


class JobStore:
    """Jobs' records, inputs and outputs in Redis."""

    def __init__(self, client: redis.Redis, ttl_s: int, retention_s: int):
        self.client, self.ttl_s, self.retention_s = client, ttl_s, max(retention_s, ttl_s)
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    def create(self, model: str, version: int, inputs: bytes, shape: str, callback_url: str | None = None,
               request_id: str | None = None, push: Push | None = None,
               members: dict[str, str] | None = None) -> tuple[Job, bool]:
        """Record a new queued job and its inputs, and push it onto its batch lane if given, in one
        atomic round trip; answer the job and whether the push armed the lane (so a batcher must go)."""
        job = Job(str(uuid.uuid4()), model, version, JobStatus.QUEUED, time.time(), shape,
                  callback_url=callback_url, request_id=request_id, members=members)
        fields = ["model", model, "version", version, "status", job.status.value,
                  "created_at", repr(job.created_at), "shape", shape]
        encoded = json.dumps(members) if members else None
        for name, value in (("callback_url", callback_url), ("request_id", request_id), ("members", encoded)):
            if value:
                fields += [name, value]
        keys = [_key(job.id), _key(job.id, "inputs"), _key(job.id, "issued")]
        lane_keys, lease_ms = (list(push[:2]), push[2]) if push else ([], 0)
        args = [self.ttl_s, self.retention_s, inputs, job.id, lease_ms, *fields]
        return job, bool(self._create(keys=keys + lane_keys, args=args))

    def close(self) -> None:
        """Close the store's Redis connections (its owner is done with it)."""
        self.client.close()

    def get(self, job_id: str) -> Job:
        """A job's record; JobNotFound for an id never issued, JobExpired for one whose record expired."""
        fields = self.client.hgetall(_key(job_id)) if _is_uuid(job_id) else {}
        if not fields:
            if _is_uuid(job_id) and self.client.exists(_key(job_id, "issued")):
                raise JobExpired(f"job {job_id} has expired: results are kept {self.ttl_s} s")
            raise JobNotFound(f"no job {job_id!r}")
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return Job(
            job_id, text["model"], int(text["version"]), JobStatus(text["status"]), float(text["created_at"]),
            text["shape"], _float(text.get("started_at")), _float(text.get("finished_at")), text.get("error"),
            text.get("callback_url"), text.get("request_id"),
            json.loads(text["members"]) if "members" in text else None,
        )

    def public(self, job: Job) -> dict[str, Any]:
        """The job as the API shows it: state, timestamps, and its result (as :predict answers) or error."""
        body: dict[str, Any] = {
            "job_id": job.id, "status": job.status.value, "model": job.model, "version": job.version,
            "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
        }
        if job.status is JobStatus.SUCCEEDED:
            outputs = unpack(self.outputs(job.id) or b"")
            body["result"] = (answer.rows if job.shape == "rows" else answer.columns)(outputs, list(outputs))
        elif job.status is JobStatus.FAILED:
            body["error"] = job.error
        return body

    def delete(self, job_id: str) -> None:
        """Forget a job that could not be enqueued."""
        self.client.delete(*(_key(job_id, part) for part in ("", "inputs", "outputs", "issued")))

    def inputs(self, job_id: str) -> bytes | None:
        """A job's packed inputs, until it finishes or expires."""
        return self.client.get(_key(job_id, "inputs"))

    def replace_inputs(self, job_id: str, inputs: bytes) -> None:
        """Put preprocessed inputs in place of the submitted ones, keeping their TTL."""
        self.client.set(_key(job_id, "inputs"), inputs, keepttl=True, xx=True)

    def outputs(self, job_id: str) -> bytes | None:
        """A succeeded job's packed outputs."""
        return self.client.get(_key(job_id, "outputs"))

    def start_many(self, job_ids: list[str]) -> list[int]:
        """`start` for several jobs in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                self._start(keys=self._start_keys(job_id), args=[repr(time.time()), MAX_ATTEMPTS], client=pipe)
            return [int(r) for r in pipe.execute()]

    def inputs_many(self, job_ids: list[str]) -> list[bytes | None]:
        """`inputs` for several jobs in one round trip."""
        return self.client.mget([_key(i, "inputs") for i in job_ids]) if job_ids else []

    def queue_waits(self, job_ids: list[str]) -> list[float | None]:
        """Seconds each job waited from its submission to its first start (None for one gone or not started),
        in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(_key(job_id), "created_at", "started_at")
            replies = pipe.execute()
        return [float(started) - float(created) if created and started else None for created, started in replies]

    def start(self, job_id: str) -> int:
        """Move a queued (or redelivered running) job to running: 1; 0 if it is finished or gone;
        -1 if it has now been started too often (a poison that kills workers) and was failed."""
        return int(self._start(keys=self._start_keys(job_id), args=[repr(time.time()), MAX_ATTEMPTS]))

    @staticmethod
    def _start_keys(job_id: str) -> list[str]:
        return [_key(job_id), _key(job_id, "inputs")]

    def succeed(self, job_id: str, outputs: bytes) -> bool:
        """Store a running job's outputs and mark it succeeded."""
        return self._end(job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED, "", outputs)

    def finish_many(self, results: list[tuple[str, bytes | str]]) -> list[tuple[str, str | None, str | None]]:
        """Succeed (outputs) or fail (a reason) running jobs in one round trip.

        Answers, for each job this call finished, (job id, callback URL, request id).
        """
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, result in results:
                now, error, outputs = ((JobStatus.FAILED, result, b"") if isinstance(result, str)
                                       else (JobStatus.SUCCEEDED, "", result))
                args = [JobStatus.RUNNING.value, now.value, repr(time.time()), error, outputs]
                self._finish(keys=self._end_keys(job_id), args=args, client=pipe)
            replies = pipe.execute()
        return [(job_id, *(_text(v) for v in reply)) for (job_id, _), reply in zip(results, replies, strict=True)
                if reply]

    def fail(self, job_id: str, error: str) -> bool:
        """Mark a queued or running job failed with its reason."""
        return any(self._end(job_id, was, JobStatus.FAILED, error or "failed", b"")
                   for was in (JobStatus.RUNNING, JobStatus.QUEUED))

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it has."""
        return self._end(job_id, JobStatus.QUEUED, JobStatus.CANCELLED, "", b"")

    def _end(self, job_id: str, was: JobStatus, now: JobStatus, error: str, outputs: bytes) -> bool:
        args = [was.value, now.value, repr(time.time()), error, outputs]
        return bool(self._finish(keys=self._end_keys(job_id), args=args))

    @staticmethod
    def _end_keys(job_id: str) -> list[str]:
        return [_key(job_id), _key(job_id, "outputs"), _key(job_id, "inputs")]


def _key(job_id: str, part: str = "") -> str:
    return f"job:{job_id}:{part}" if part else f"job:{job_id}"


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="milliseconds")


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)
