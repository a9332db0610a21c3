"""Start Django's ``runtests.py`` with Kipekee's backends in place of Django's.

    python kipekee_gate/launch.py smtp|dropin [runtests.py arguments]

``smtp``: ``django.core.mail.backends.smtp.EmailBackend`` *is* Kipekee's SMTP backend for
the whole run, so Django's SMTP-backend tests exercise it with nothing else changed (they
find the class through that module attribute, or import it by that dotted path).

``dropin``: ``kipekee`` is added to runtests' ``ALWAYS_INSTALLED_APPS``, its tables made
from its models as runtests does for ``auth`` and ``contenttypes`` (whose migrations it
skips, and which Kipekee's migrations depend on), and the test modules of ``kipekee_gate.dropin`` run Django's tests with the
drop-in as the default backend.

Everything else is ``runtests.py`` as Django ships it.
"""

import os
import sys

RUNTESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTESTS = os.path.join(RUNTESTS_DIR, "runtests.py")

mode = sys.argv.pop(1)
if mode not in {"smtp", "dropin"}:
    sys.exit(f"launch.py: unknown mode {mode!r} (smtp or dropin)")

with open(RUNTESTS, encoding="utf-8") as file:
    source = file.read()

if mode == "smtp":
    import django.core.mail.backends.smtp

    from kipekee.backends.smtp import EmailBackend

    django.core.mail.backends.smtp.EmailBackend = EmailBackend
else:
    for marker in ("ALWAYS_INSTALLED_APPS = [\n", "settings.MIGRATION_MODULES = {\n"):
        if source.count(marker) != 1:
            sys.exit(f"launch.py: runtests.py has changed ({marker.strip()!r} not found once)")
    source = source.replace("ALWAYS_INSTALLED_APPS = [\n", 'ALWAYS_INSTALLED_APPS = [\n    "kipekee",\n')
    source = source.replace("settings.MIGRATION_MODULES = {\n",
                            'settings.MIGRATION_MODULES = {\n        "kipekee": None,\n')

# As if started as ``python runtests.py``: its directory first on sys.path.
sys.path[0] = RUNTESTS_DIR
sys.argv[0] = RUNTESTS
exec(compile(source, RUNTESTS, "exec"), {"__name__": "__main__", "__file__": RUNTESTS})  # noqa: S102 - runtests.py, as Django ships it
