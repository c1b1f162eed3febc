"""Entry point of `celery -A tasks.worker worker|beat|flower`: the app built from the environment."""

from tasks.app import create_celery

app = create_celery()
