"""The demo's Celery app, for ``KIPEKEE_DEMO_ENGINE=celery``:
``cd demo && celery -A demo_site worker -Q kipekee,celery -B -l INFO``.

``demo_site/__init__.py`` imports it in that mode, so the web process sends Kipekee's
tasks through this app (Celery's Django fix-up sets Django up in the worker)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")

from kipekee.contrib.celery import beat_schedule, task_routes  # noqa: E402

app = Celery("kipekee_demo")
app.config_from_object("django.conf:settings", namespace="CELERY")  # CELERY_BROKER_URL
app.conf.update(
    imports=["kipekee.contrib.celery"],
    broker_connection_retry_on_startup=True,
    beat_schedule=beat_schedule(),
    task_routes=task_routes(),
)
