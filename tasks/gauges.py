"""Gauges of what every process shares, read when scraped: queue depths, batch lanes, active batch runs.

These live in Redis and the SQL store, not in any one process, so they are read at each scrape rather than
counted: every web instance reports the same values (aggregate them with `max`, not `sum`). A store that cannot
be read leaves its gauges out of that scrape, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import kombu.exceptions
import redis
import sqlalchemy as sa
from celery import Celery
from kombu.transport.virtual import Channel
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models import Registry
from tasks.app import QUEUES
from tasks.ensembles import member_queues
from tasks.lanes import BatchQueue, Lane
from tasks.runs import RunStore

log = logging.getLogger(__name__)
UNREADABLE = (redis.RedisError, kombu.exceptions.KombuError, OSError, sa.exc.SQLAlchemyError)


class SharedState(Collector):
    """A collector of the queues' depths, the batch lanes' lengths and the active batch runs' progress."""

    def __init__(self, celery: Celery, registry: Registry, batches: BatchQueue | None, runs: RunStore):
        self.celery, self.registry, self.batches, self.runs = celery, registry, batches, runs

    def collect(self) -> Iterator[Metric]:
        """The gauges, read now."""
        for read in (self._queues, self._lanes, self._runs):
            family = _readable(read)
            if family is not None:
                yield family

    def _queues(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("platform_queue_messages", "Messages waiting in a Celery queue.", labels=["queue"])
        with self.celery.connection_or_acquire() as connection:
            channel = connection.default_channel
            for queue in [*QUEUES, *member_queues(self.registry.ensembles())]:
                family.add_metric([queue], _depth(channel, queue))
        return family

    def _lanes(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("platform_batch_lane_jobs", "Jobs waiting in a model version's batch lane.",
                                   labels=["model", "version"])
        for model in self.registry.models() if self.batches is not None else []:
            if model.spec.options.max_batch_size > 1:
                for number in sorted(model.versions):
                    lane = Lane(model.spec.name, number)
                    family.add_metric([lane.model, str(number)], self.batches.waiting(lane))
        return family

    def _runs(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("platform_batch_run_items", "Items of a model's queued or running batch run: "
                                   "its total, and those succeeded and failed so far.", labels=["model", "state"])
        for run in self.runs.live():
            for state, count in (("total", run.total), ("succeeded", run.succeeded), ("failed", run.failed)):
                family.add_metric([run.model, state], count)
        return family


def _depth(channel: Channel, queue: str) -> int:
    """Messages waiting in `queue`, at every priority (kombu's count); 0 for a queue never used."""
    try:
        return channel.queue_declare(queue=queue, passive=True).message_count
    except kombu.exceptions.ChannelError:
        return 0


def _readable(read: Callable[[], GaugeMetricFamily]) -> GaugeMetricFamily | None:
    """A family read from its store, or None (and a warning) if the store is unreachable."""
    try:
        return read()
    except UNREADABLE as exc:
        log.warning("metrics: a shared gauge could not be read: %s", exc)
        return None
