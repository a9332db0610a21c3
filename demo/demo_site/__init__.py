import os

if os.environ.get("KIPEKEE_DEMO_ENGINE") == "celery":
    # The project's Celery app, loaded with Django so shared tasks are sent through it.
    from .celery import app as celery_app  # noqa: F401
