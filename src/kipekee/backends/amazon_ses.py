"""Amazon SES (v2, through boto3) as a Kipekee provider, on django-anymail's backend.

::

    KIPEKEE = {"PROVIDERS": {"ses": {
        "BACKEND": "kipekee.backends.amazon_ses.EmailBackend",
        "OPTIONS": {"client_params": {"region_name": "eu-west-1"}},  # credentials: boto3's
    }}}

Anymail's backend with one change: boto3 tries each request once. By default botocore
retries a throttled (429) or failed (5xx, connection) request up to five times with its
own backoff inside one send, and never reads ``Retry-After``; Kipekee retries itself,
with the outbox, the provider's hint and failover. A ``retries`` setting in the
``client_params`` ``config`` is kept as given. Errors are classified as for every anymail
backend (:func:`kipekee.providers.classify_anymail`).
"""

from __future__ import annotations

from typing import Any

from anymail.backends.amazon_ses import EmailBackend as AnymailSESBackend
from botocore.config import Config

#: One attempt per send: Kipekee decides when to try again.
ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})


class EmailBackend(AnymailSESBackend):
    """Anymail's Amazon SES v2 backend, with boto3's own retries off (see the module)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.client_params["config"]
        if config.retries is None:
            self.client_params["config"] = config.merge(ONE_ATTEMPT)
