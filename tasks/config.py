"""Settings of the queue, the result store and the SQL store, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.destinations import Network, networks


@dataclass(frozen=True)
class TaskSettings:
    """Typed settings with safe development defaults; each maps to one environment variable."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """REDIS_URL: Celery broker and result store. Unset under `make run`, an embedded Redis is started."""
    database_url: str = "sqlite:///var/platform.db"
    """DATABASE_URL: SQL store of batch jobs, e.g. mysql+pymysql://user:pass@host:3306/db."""
    database_timeout_s: float = 60.0
    """DATABASE_TIMEOUT_S: most a MySQL connection waits to connect (10 s at most) or on a reply, then fails."""
    result_expires_s: int = 24 * 3600
    """RESULT_EXPIRES_S: how long a job's result is kept in Redis."""
    job_id_retention_s: int = 7 * 24 * 3600
    """JOB_ID_RETENTION_S: how long an issued job id is remembered, so an expired job answers 410, not 404."""
    visibility_timeout_s: int = 30
    """VISIBILITY_TIMEOUT_S: a message taken but not acknowledged (its worker was killed) is delivered again
    after this long; every task's time limit is kept below it."""
    task_time_limit_s: int = 20
    """TASK_TIME_LIMIT_S: hard limit of one task, at most 90% of VISIBILITY_TIMEOUT_S; the soft limit is 90% of it."""
    batching: bool = True
    """BATCHING: coalesce queued jobs of one model version into one runtime call (`on` or `off`)."""
    batch_lease_s: float = 60.0
    """BATCH_LEASE_S: a batch's jobs not finished this long after they were taken are put back in line."""
    batch_chunk_rows: int = 2000
    """BATCH_CHUNK_ROWS: items one batch-run task claims and predicts in one runtime call."""
    batch_max_items: int = 10_000
    """BATCH_MAX_ITEMS: most items one `POST /v1/batch/items` may register."""
    batch_max_attempts: int = 3
    """BATCH_MAX_ATTEMPTS: tries an item gets, over runs, before its failure is final."""
    batch_item_lease_s: float = 300.0
    """BATCH_ITEM_LEASE_S: a claimed item not written back this long after is put back in line."""
    batch_reconcile_s: float = 30.0
    """BATCH_RECONCILE_S: how often beat's reconciler looks for lost items and stalled runs."""
    batch_schedule: str = ""
    """BATCH_SCHEDULE: scheduled runs, `model=<crontab or seconds>` separated by `;`."""
    batch_retention_days: float = 30.0
    """BATCH_RETENTION_DAYS: finished batch items and runs are deleted this long after they finished; 0 keeps them."""
    data_retention_days: float = 30.0
    """DATA_RETENTION_DAYS: inputs stored for the data cache are deleted this long after they came; 0 keeps them."""
    purge_interval_s: float = 3600.0
    """PURGE_INTERVAL_S: how often beat's `purge_expired` deletes what is past its retention."""
    data_cache_ttl_s: int = 3600
    """DATA_CACHE_TTL_S: how long a stored input's preprocessed tensor stays cached in Redis."""
    callback_allow_networks: tuple[Network, ...] = ()
    """CALLBACK_ALLOW_NETWORKS: non-public networks callbacks may go to, in CIDR form, comma separated."""
    callback_deadline_s: float = 10.0
    """CALLBACK_DEADLINE_S: one callback attempt's whole time: connecting, sending, reading the answer."""
    flower_user: str = "admin"
    """FLOWER_USER: Flower's basic-auth user."""
    flower_password: str = ""
    """FLOWER_PASSWORD: Flower's basic-auth password; unset, `make run` makes one for each start."""
    flower_address: str = "127.0.0.1"
    """FLOWER_ADDRESS: the address Flower listens on."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TaskSettings:
        """Read the settings from environment variables, falling back to the defaults."""
        return cls(
            redis_url=env.get("REDIS_URL") or cls.redis_url,
            database_url=env.get("DATABASE_URL") or cls.database_url,
            database_timeout_s=float(env.get("DATABASE_TIMEOUT_S", cls.database_timeout_s)),
            result_expires_s=int(env.get("RESULT_EXPIRES_S", cls.result_expires_s)),
            job_id_retention_s=int(env.get("JOB_ID_RETENTION_S", cls.job_id_retention_s)),
            visibility_timeout_s=int(env.get("VISIBILITY_TIMEOUT_S", cls.visibility_timeout_s)),
            task_time_limit_s=int(env.get("TASK_TIME_LIMIT_S", cls.task_time_limit_s)),
            batching=env.get("BATCHING", "on").lower() not in ("off", "0", "false", "no"),
            batch_lease_s=float(env.get("BATCH_LEASE_S", cls.batch_lease_s)),
            batch_chunk_rows=int(env.get("BATCH_CHUNK_ROWS", cls.batch_chunk_rows)),
            batch_max_items=int(env.get("BATCH_MAX_ITEMS", cls.batch_max_items)),
            batch_max_attempts=int(env.get("BATCH_MAX_ATTEMPTS", cls.batch_max_attempts)),
            batch_item_lease_s=float(env.get("BATCH_ITEM_LEASE_S", cls.batch_item_lease_s)),
            batch_reconcile_s=float(env.get("BATCH_RECONCILE_S", cls.batch_reconcile_s)),
            batch_schedule=env.get("BATCH_SCHEDULE", cls.batch_schedule),
            batch_retention_days=float(env.get("BATCH_RETENTION_DAYS", cls.batch_retention_days)),
            data_retention_days=float(env.get("DATA_RETENTION_DAYS", cls.data_retention_days)),
            purge_interval_s=float(env.get("PURGE_INTERVAL_S", cls.purge_interval_s)),
            data_cache_ttl_s=int(env.get("DATA_CACHE_TTL_S", cls.data_cache_ttl_s)),
            callback_allow_networks=networks(env.get("CALLBACK_ALLOW_NETWORKS", "")),
            callback_deadline_s=float(env.get("CALLBACK_DEADLINE_S", cls.callback_deadline_s)),
            flower_user=env.get("FLOWER_USER", cls.flower_user),
            flower_password=env.get("FLOWER_PASSWORD", cls.flower_password),
            flower_address=env.get("FLOWER_ADDRESS") or cls.flower_address,
        )
