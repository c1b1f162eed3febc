"""What a burst of jobs costs Redis: commands run (scripts' inner commands included) and server CPU, per job.

Read from `INFO commandstats` and `INFO cpu` before and after the burst; the counts are server-wide, so the
machine must be otherwise quiet. The benchmark's own status polls are counted apart and taken out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import redis

from bench.job_load import Finished


@dataclass(frozen=True)
class Usage:
    """The server's command counts and CPU seconds at one moment."""

    commands: Counter[str]
    cpu_s: float


class CountedPolls:
    """A `finished` that counts the job ids it was asked about: one status command each."""

    def __init__(self, finished: Finished):
        self.finished, self.polled = finished, 0

    def __call__(self, job_ids: list[str]) -> list[bool]:
        self.polled += len(job_ids)
        return self.finished(job_ids)


def usage(client: redis.Redis) -> Usage:
    """The server's command counts and CPU seconds now."""
    stats, cpu = client.info("commandstats"), client.info("cpu")
    commands = Counter({name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()})
    return Usage(commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


def per_job(before: Usage, after: Usage, jobs: int, polled: int) -> dict[str, float]:
    """Commands and server CPU per job between two readings, the polls and the readings themselves left out."""
    spent = after.commands - before.commands
    total = sum(spent.values()) - spent["info"] - polled
    return {"redis_commands": total / jobs, "redis_cpu_us": (after.cpu_s - before.cpu_s) / jobs * 1e6}


def breakdown(before: Usage, after: Usage, jobs: int) -> dict[str, float]:
    """Each command's calls per job between two readings, the most frequent first (polls included)."""
    spent = after.commands - before.commands
    return {name: round(calls / jobs, 3) for name, calls in spent.most_common() if name != "info"}
