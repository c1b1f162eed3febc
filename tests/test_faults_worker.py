"""Faults of the online workers, through real Celery worker processes and a real Redis: a whole worker
SIGKILLed mid-job, a lane under load for longer than the time limit, a batcher killed by its time limit."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from workers import Platform, celery_worker, finished_jobs, kill_group_holding

from models.config import PACKAGE_DIR
from tasks import TaskSettings, create_celery
from tasks.status import JobStatus

URL = os.environ.get("TEST_KILL_REDIS_URL", "redis://127.0.0.1:6379/11")
ONLINE = "prep,predict,callbacks"
VISIBILITY_S = 10

pytestmark = pytest.mark.integration


@pytest.fixture
def digits() -> np.ndarray:
    """Rows for the digits models, 6000 of them: a job of them takes a few tenths of a second."""
    return np.tile(load_digits().data.astype(np.float32), (4, 1))[:6000]


def test_jobs_a_killed_worker_held_finish_soon_after_a_restart(tmp_path: Path, digits: np.ndarray):
    env = {"VISIBILITY_TIMEOUT_S": str(VISIBILITY_S)}
    platform = Platform.on(URL, env=env)
    batched = [platform.submit("digits-heavy", digits[:1000]) for _ in range(40)]  # one batch of them
    single = [platform.submit("digits-heavy", digits, batched=False) for _ in range(10)]
    with celery_worker(URL, ONLINE, tmp_path / "first.log", env=env) as first:

        def held() -> int:
            """Jobs of both kinds running at once: a task's message and a batcher's jobs, both taken."""
            running = [s is JobStatus.RUNNING for s in platform.statuses(single + batched)]
            return min(sum(running[:len(single)]), sum(running[len(single):]))

        assert kill_group_holding(first, held)
    killed_at = time.time()
    orphans = [i for i, s in zip(single + batched, platform.statuses(single + batched), strict=True)
               if s is JobStatus.RUNNING]
    later = [platform.submit("digits-heavy", digits[:10], batched=b) for b in (True, False)]
    time.sleep(1)
    assert all(s is JobStatus.RUNNING for s in platform.statuses(orphans))  # no worker: nobody has them
    with celery_worker(URL, ONLINE, tmp_path / "second.log", env=env):
        jobs = finished_jobs(platform.store, single + batched + later, timeout_s=60)
    assert [j.status for j in jobs.values()] == [JobStatus.SUCCEEDED] * len(jobs)
    recovered_s = max(j.finished_at for j in jobs.values()) - killed_at
    # what the killed worker held comes back one visibility timeout after it was taken, not in an hour
    assert recovered_s < VISIBILITY_S + 15, recovered_s


def slow_lane_repo(root: Path, delay_ms: int) -> Path:
    """A repository holding a copy of iris whose batches wait `delay_ms` for more jobs: its batcher never
    finds its lane empty while jobs come more often than that."""
    shutil.copytree(PACKAGE_DIR / "iris", root / "iris")
    spec = root / "iris" / "model.toml"
    spec.write_text(spec.read_text().replace("[options]", f"[options]\nmax_batch_delay_ms = {delay_ms}"))
    return root


def test_a_lane_under_load_past_the_time_limit_is_handed_on_and_no_job_waits(tmp_path: Path):
    repo = slow_lane_repo(tmp_path / "repo", delay_ms=250)
    limit_s, rows = 6, load_digits().data[:1, :4].astype(np.float32)
    env = {"TASK_TIME_LIMIT_S": str(limit_s), "MODELS_DIR": str(repo)}
    platform = Platform.on(URL, repo, env)
    with celery_worker(URL, "predict", tmp_path / "worker.log", env=env) as worker:
        start, ids = time.monotonic(), []
        for i in range(int(10 * (limit_s * 1.5))):  # 10 jobs a second, half as long again as the time limit
            time.sleep(max(0.0, start + i / 10 - time.monotonic()))
            ids.append(platform.submit("iris", rows))
        jobs = finished_jobs(platform.store, ids, timeout_s=30)
        log = worker.log.read_text()
    assert [j.status for j in jobs.values()] == [JobStatus.SUCCEEDED] * len(ids)
    latencies = [j.finished_at - j.created_at for j in jobs.values()]
    assert max(latencies) < 2, sorted(latencies)[-5:]
    turns = [float(t) for t in re.findall(r"Task predict_batch\[.*\] succeeded in ([0-9.]+)s", log)]
    assert len(turns) >= 4 and max(turns) < limit_s / 2, turns  # each batcher serves one turn, then leaves
    assert "TimeLimitExceeded" not in log


def test_a_batcher_killed_by_its_time_limit_leaves_its_lane_served(tmp_path: Path, digits: np.ndarray):
    env = {"TASK_TIME_LIMIT_S": "1"}
    platform = Platform.on(URL, env=env)
    big = [platform.submit("digits-heavy", np.concatenate([digits, digits[:4000]])) for _ in range(12)]
    with celery_worker(URL, "predict", tmp_path / "worker.log", env=env) as worker:
        jobs = finished_jobs(platform.store, big, timeout_s=40)  # one batch of them runs past the limit
        assert {j.status for j in jobs.values()} == {JobStatus.FAILED}
        assert all("gave up after 5 starts" in (j.error or "") for j in jobs.values())
        after = platform.submit("digits-heavy", digits[:10])
        assert finished_jobs(platform.store, [after], timeout_s=10)[after].status is JobStatus.SUCCEEDED
        log = worker.log.read_text()
    assert "Hard time limit" in log and "its lane is handed on" in log


def test_the_default_settings_give_back_a_killed_workers_messages_within_a_minute_and_no_task_outlives_them():
    redelivery = create_celery(TaskSettings()).conf.broker_transport_options
    assert redelivery["unacked_restore_throttle"] == 1  # every sweep looks
    # a message taken at the kill is due one timeout later, and found by the next sweep, or by the first one
    # after the sweep lock a killed worker may have held has lapsed
    parts = ("visibility_timeout", "unacked_restore_interval", "unacked_mutex_expire")
    assert sum(redelivery[part] for part in parts) < 45
    for settings in (TaskSettings(), TaskSettings(task_time_limit_s=300), TaskSettings(visibility_timeout_s=5)):
        conf = create_celery(settings).conf
        assert conf.task_soft_time_limit < conf.task_time_limit <= 0.9 * settings.visibility_timeout_s
