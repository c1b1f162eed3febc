"""The Celery app's configuration: delivery guarantees and a beat schedule of real tasks."""

from tasks import QUEUES, TaskSettings, create_celery


def test_every_beat_entry_names_a_registered_task_on_a_served_queue():
    app = create_celery(TaskSettings())
    schedule = app.conf.beat_schedule
    assert schedule
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
