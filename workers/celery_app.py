"""The Celery application of alignd: Redis as broker and result backend, tasks in `workers.tasks`.

celery -A workers.celery_app worker -Q train --concurrency 1     # what `alignd worker` runs
celery -A workers.celery_app beat
"""

from __future__ import annotations

from celery import Celery

app = Celery("alignd", include=["workers.tasks"])
app.config_from_object("workers.celeryconfig")
