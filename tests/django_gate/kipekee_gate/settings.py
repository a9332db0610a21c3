"""Django's own test settings (``test_sqlite``), plus what Kipekee's runs need."""

from test_sqlite import *  # Django's settings for its own test suite

TEST_RUNNER = "kipekee_gate.runner.GateRunner"

# The drop-in's providers. Django's test environment is set up, so Kipekee delivers
# through Django's locmem backend instead (kipekee.testmode): the mail lands in
# django.core.mail.outbox, where Django's tests look for it. The SMTP provider below is
# never contacted (nothing listens on port 9 of 127.0.0.1 anyway).
KIPEKEE = {
    "ENGINE": None,
    "PROVIDERS": {
        "primary": {
            "BACKEND": "kipekee.backends.smtp.EmailBackend",
            "OPTIONS": {"host": "127.0.0.1", "port": 9},
        },
    },
}
