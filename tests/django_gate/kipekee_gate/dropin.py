"""Django's backend-level mail tests with Kipekee's drop-in as the default backend.

Each class here is one of Django's test classes, unchanged, run with
``EMAIL_BACKEND`` (and, for the ``...WithMailers`` classes of Django 6.1, ``MAILERS
["default"]``) set to ``kipekee.backend.EmailBackend``. Mail sent through the drop-in is
written to the outbox and delivered, as always; Django's test environment is set up, so
delivery goes through Django's locmem backend (``kipekee.testmode``) and the tests find
the messages in ``django.core.mail.outbox``, where they look for them.

The classes may query the database (the outbox): ``databases = {"default"}``.
"""

import django
from django.core import mail
from django.test import SimpleTestCase, override_settings
from logging_tests import tests as logging_tests
from middleware import tests as middleware_tests

from kipekee.backend import EmailBackend as DropIn

DROP_IN = "kipekee.backend.EmailBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"

if django.VERSION >= (6, 1):
    # Django 6.1 warns (an error under runtests) when EMAIL_* settings are overridden,
    # unless through its tests' own helper.
    from mail import override_deprecated_email_settings as email_settings
    from mail import test_backends, tests

    SharedTests = test_backends.SharedEmailBackendTests
    LocmemTests = test_backends.LocmemBackendTests
    SENDING = [
        tests.SendMailTests, tests.SendMassMailTests, tests.MailAdminsAndManagersTests,
        tests.GetConnectionTests, tests.EmailMessageTests,
    ]
    WITH_MAILERS = [
        tests.SendMailTestsWithMailers, tests.SendMassMailTestsWithMailers,
        tests.MailAdminsAndManagersTestsWithMailers, tests.EmailMessageTestsWithMailers,
    ]
else:
    from mail import tests

    email_settings = override_settings
    SharedTests = tests.BaseEmailBackendTests
    LocmemTests = tests.LocmemBackendTests
    SENDING = [tests.MailTests]
    if django.VERSION >= (6, 0):
        SENDING.append(tests.MailDeprecatedPositionalArgsTests)
    WITH_MAILERS = []

SENDING += [logging_tests.AdminEmailHandlerTest, middleware_tests.BrokenLinkEmailsMiddlewareTest]


def with_drop_in(cls):
    """Django's test class ``cls``, run with the drop-in as the default backend.

    ``MAILERS["default"]`` where the class configures ``MAILERS`` (Django 6.1: its other
    mailers stay as they are), else ``EMAIL_BACKEND``.
    """
    mailers = (getattr(cls, "_overridden_settings", None) or {}).get("MAILERS")
    if mailers is not None:
        overrides = {"MAILERS": {**mailers, "default": {"BACKEND": DROP_IN}}}
    else:
        overrides = {"EMAIL_BACKEND": DROP_IN}

    def setUpClass(klass):
        super(subclass, klass).setUpClass()
        # After (on top of) the class's own setting overrides.
        klass.enterClassContext(email_settings(**overrides))

    subclass = type(cls.__name__, (cls,), {
        "__module__": __name__,
        "__qualname__": cls.__name__,
        "databases": frozenset({"default"}),
        "setUpClass": classmethod(setUpClass),
    })
    return subclass


for _cls in SENDING + WITH_MAILERS:
    globals()[_cls.__name__] = with_drop_in(_cls)
del _cls


class DropInBackendTests(SharedTests, SimpleTestCase):
    """Django's tests shared by every email backend (those of its locmem backend's class)."""

    email_backend = DROP_IN  # Django 5.2 and 6.0
    backend_class = DropIn  # Django 6.1
    databases = frozenset({"default"})

    get_mailbox_content = LocmemTests.get_mailbox_content
    flush_mailbox = LocmemTests.flush_mailbox

    def tearDown(self):
        super().tearDown()
        mail.outbox = []

    if django.VERSION >= (6, 1):
        # The drop-in takes fail_silently, as Django's SMTP backend does: Django's test
        # for a backend that keeps it (the shared one expects it deprecated).
        test_fail_silently_arg_accepted_as_smtp = (
            test_backends.SMTPBackendTests.test_fail_silently_arg_accepted)
