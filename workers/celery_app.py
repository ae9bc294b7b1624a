"""The Celery application of alignd: Redis as broker and result backend, tasks in `workers.tasks`.

celery -A workers.celery_app worker -Q train --concurrency 1     # what `alignd worker` runs
celery -A workers.celery_app beat
"""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_ready

app = Celery("alignd", include=["workers.tasks"])
app.config_from_object("workers.celeryconfig")


@worker_ready.connect
def publish_config_schema(**_) -> None:
    """Tell the API which CycleConfig keys exist, with their defaults (store/train_config.py), so that it refuses a
    misspelt or mistyped override before enqueuing a cycle."""
    from store.client import connect
    from store.train_config import publish_schema
    from workers.cycle_config import CycleConfig

    base = CycleConfig()
    defaults = {}
    for key in CycleConfig.valid_keys():
        value = base
        for part in key.split("."):
            value = getattr(value, part)
        defaults[key] = value
    publish_schema(connect(app.conf.broker_url), defaults)
