"""The Celery app's configuration: delivery guarantees and a beat schedule of real tasks."""



import pytest
from celery.schedules import crontab

from tasks import QUEUES, TaskSettings, create_celery


def test_every_beat_entry_names_a_registered_task_on_a_served_queue():
    app = create_celery(TaskSettings(batch_schedule="iris=*/10 * * * *; digits-light=300"))
    schedule = app.conf.beat_schedule
    assert {"reclaim-batches", "batch-reconcile", "batch-run-iris", "batch-run-digits-light"} <= set(schedule)
    assert isinstance(schedule["batch-run-iris"]["schedule"], crontab)
    assert schedule["batch-run-digits-light"]["schedule"] == 300.0
    for name, entry in schedule.items():
        assert entry["task"] in app.tasks, name
        assert entry.get("options", {}).get("queue", "predict") in QUEUES, name


def test_delivery_is_at_least_once_and_bounded():
    conf = create_celery(TaskSettings(visibility_timeout_s=123, task_time_limit_s=100)).conf
    assert conf.task_acks_late and conf.task_retry_on_worker_lost and not conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 123
    assert conf.task_soft_time_limit < conf.task_time_limit == 100
    assert conf.result_expires > 0
    for name in ("predict", "preprocess", "predict_batch", "deliver_callback", "reclaim_batches"):
        assert name in create_celery(TaskSettings()).tasks


@pytest.mark.parametrize("text", ["iris", "iris=", "iris=never", "iris=0", "iris=61 * * * *", "iris=1; iris=2"])
def test_a_bad_batch_schedule_is_refused_naming_the_variable(text: str):
    with pytest.raises(ValueError, match="BATCH_SCHEDULE"):
        create_celery(TaskSettings(batch_schedule=text))


def test_batch_tasks_go_to_the_batch_queue():
    app = create_celery(TaskSettings())
    for name in ("batch_run", "batch_chunk", "batch_scheduled", "batch_reconcile"):
        assert app.amqp.router.route({}, name)["queue"].name == "batch"
