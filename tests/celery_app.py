"""The Celery app the Celery tests run: ``celery -A tests.celery_app worker``."""

import os
import uuid

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

#: Every key of this test run in Redis starts with it. Runs share Redis database 9 (two
#: checkouts, CI jobs at once): each clears only its own keys, never the database. Set
#: in the environment by the test process, so the workers it starts inherit it.
KEY_PREFIX = os.environ.setdefault("KIPEKEE_CELERY_KEY_PREFIX",
                                   f"kipekee-tests-{os.getpid()}-{uuid.uuid4().hex[:8]}:")

from kipekee.contrib.celery import beat_schedule, task_routes  # noqa: E402

app = Celery("kipekee_tests")
app.conf.update(
    broker_url=os.environ.get("KIPEKEE_CELERY_BROKER",
                              os.environ.get("KIPEKEE_TEST_BROKER", "redis://127.0.0.1:6379/9")),
    imports=["kipekee.contrib.celery"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"global_keyprefix": KEY_PREFIX},
    # The project's one line, with the sweep every second for the tests.
    beat_schedule=beat_schedule(every=1.0),
    task_routes=task_routes(),
)
