"""Dynamic batching: queued single jobs of one model version coalesced into one runtime call.

A job to batch goes on a Redis list per model version, a lane; the push also arms the lane (a flag with
a lease), and only the push that arms it sends a Celery message, `predict_batch`. So Celery's publish,
deliver and ack are paid once per batch, not once per job. The batcher waits until `max_batch_size` jobs
are there or `max_batch_delay_ms` has passed, takes them, runs them in one call, and goes on while jobs
keep coming, for one turn (a quarter of the task time limit): then it hands the lane to a successor it
sends, so no batcher runs into its time limit or outlives its message's visibility. The lane stays armed
while it is served; leaving, a batcher disarms the lane only if the lane is still empty (one Lua script),
so a job pushed meanwhile never lacks a batcher. Taken jobs are held in an in-flight set, under the
batcher's task id, until finished: a batcher delivered again (its worker was killed) or retried puts back
what its earlier delivery held, and `reclaim_batches` (run by beat) puts back what a lost batcher left
there past the lease. A batch the runtime refuses is run job by job, so one bad job fails alone, with its
reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import redis
from celery import Celery

_ENQUEUE = """
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_TAKE = """
local ids = redis.call('LPOP', KEYS[1], ARGV[1])
if not ids then ids = {} end
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3] .. id .. ARGV[5]) end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return ids
"""
_DISARM = """
if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""
INFLIGHT = "batches:inflight"
ARMED_MS = 5000
"""How long a lane stays armed after its last push or take: a lane whose batcher's message never went out (Redis
failed as it was sent) is armed again by the next push, or by beat, this soon. A batch running longer than this
lets a second batcher onto the lane, which does no harm."""
SEPARATOR = "\t"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lane:
    """The batch queue of one model version."""

    model: str
    version: int

    @property
    def prefix(self) -> str:
        """What an in-flight member starts with: the lane; then come the job id and the batcher's task id."""
        return f"{self.model}{SEPARATOR}{self.version}{SEPARATOR}"

    def key(self, part: str) -> str:
        """A Redis key of this lane."""
        return f"batches:{self.model}:{self.version}:{part}"


class BatchQueue:
    """Per model version lists of job ids waiting to be batched, and the set of those taken."""

    def __init__(self, client: redis.Redis, lease_s: float):
        self.client, self.lease_ms = client, int(lease_s * 1000)
        self.armed_ms = min(self.lease_ms, ARMED_MS)
        self._enqueue = client.register_script(_ENQUEUE)
        self._take = client.register_script(_TAKE)
        self._disarm = client.register_script(_DISARM)

    def put(self, lane: Lane, job_id: str) -> bool:
        """Queue a job id; True when this push armed the lane (and so must send a batcher)."""
        return bool(self._enqueue(keys=[lane.key("jobs"), lane.key("armed")], args=[job_id, self.armed_ms]))

    def push_for(self, lane: Lane) -> tuple[str, str, int]:
        """What `JobStore.create` needs to push a new job onto this lane in the same round trip."""
        return lane.key("jobs"), lane.key("armed"), self.armed_ms

    def disarm_now(self, lane: Lane) -> None:
        """Disarm a lane whose batcher could not be sent, whatever waits in it."""
        self.client.delete(lane.key("armed"))

    def disarm(self, lane: Lane) -> bool:
        """Disarm a lane its batcher leaves, unless jobs came meanwhile (then the batcher goes on)."""
        return bool(self._disarm(keys=[lane.key("jobs"), lane.key("armed")]))

    def idle(self) -> list[Lane]:
        """Arm and answer the lanes with jobs waiting but no batcher (its message lost, or its lease over)."""
        lanes = []
        for key in self.client.scan_iter(match="batches:*:jobs", count=100):
            _, model, version, _ = key.decode().split(":")
            lane = Lane(model, int(version))
            if self.client.llen(key) and self.client.set(lane.key("armed"), b"1", nx=True, px=self.armed_ms):
                lanes.append(lane)
        return lanes

    def waiting(self, lane: Lane) -> int:
        """How many job ids wait in a lane."""
        return self.client.llen(lane.key("jobs"))

    def take(self, lane: Lane, count: int, holder: str = "") -> list[str]:
        """Take up to `count` job ids, recording them in flight under `holder`, and keep the lane armed."""
        keys = [lane.key("jobs"), lane.key("armed"), INFLIGHT]
        ids = self._take(keys=keys, args=[count, time.time(), lane.prefix, self.armed_ms, SEPARATOR + holder])
        return [i.decode() for i in ids]

    def done(self, lane: Lane, job_ids: list[str], holder: str = "") -> None:
        """Forget finished jobs' in-flight records."""
        if job_ids:
            self.client.zrem(INFLIGHT, *(f"{lane.prefix}{i}{SEPARATOR}{holder}" for i in job_ids))

    def release(self, holder: str) -> list[tuple[Lane, str]]:
        """Remove from flight and answer the jobs `holder` took (an earlier delivery of it, since lost)."""
        members = self.client.zscan_iter(INFLIGHT, match=f"*{SEPARATOR}{holder}", count=1000)
        return self._remove([member for member, _ in members])

    def reclaim(self, older_than_s: float, lane: Lane | None = None) -> list[tuple[Lane, str]]:
        """Remove from flight and answer the jobs taken more than `older_than_s` ago (of one lane, if given)."""
        old = self.client.zrangebyscore(INFLIGHT, "-inf", time.time() - older_than_s)
        return self._remove([m for m in old if lane is None or m.decode().startswith(lane.prefix)])

    def _remove(self, members: list[bytes]) -> list[tuple[Lane, str]]:
        """Remove in-flight members; answer the lane and job id of each this call removed."""
        found = []
        for member in members:
            if self.client.zrem(INFLIGHT, member):
                model, version, job_id = member.decode().split(SEPARATOR)[:3]
                found.append((Lane(model, int(version)), job_id))
        return found


def dispatch(app: Celery, queue: BatchQueue | None, lane: Lane, job_id: str, headers: dict[str, str]) -> None:
    """Send a job to be predicted: onto its lane when batching, else as a task of its own."""
    send(app, lane, job_id, headers, batched=queue is not None, armed=queue is not None and queue.put(lane, job_id))


def send(app: Celery, lane: Lane, job_id: str, headers: dict[str, str], batched: bool, armed: bool) -> None:
    """The Celery message a job needs once it is recorded: its own task, a batcher for its lane, or none."""
    if not batched:
        app.tasks["predict"].apply_async(args=[job_id], queue="predict", headers=headers)
    elif armed:
        app.tasks["predict_batch"].apply_async(args=[lane.model, lane.version], queue="predict")


def hand_on(app: Celery, queue: BatchQueue, lane: Lane) -> bool:
    """Leave a lane: disarm it if it is empty, else send the batcher that goes on with it (True)."""
    if queue.disarm(lane):
        return False
    app.tasks["predict_batch"].apply_async(args=[lane.model, lane.version], queue="predict")
    return True


def split(outputs: dict[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """One batch's outputs cut back into each job's rows."""
    bounds = np.cumsum(rows)[:-1]
    parts = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(rows))]


def fill(queue: BatchQueue, lane: Lane, size: int, delay_s: float) -> None:
    """Wait until `size` jobs wait in the lane or `delay_s` has passed."""
    deadline = time.monotonic() + delay_s
    while queue.waiting(lane) < size and time.monotonic() < deadline:
        time.sleep(min(0.001, max(0.0, deadline - time.monotonic())))
