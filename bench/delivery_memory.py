"""Memory of one delivery with a large attachment: Kipekee's SMTP backend against Django's.

    .venvs/django52/bin/python bench/delivery_memory.py [--mb 20]

Each measurement runs in a fresh process: a SQLite outbox in a temporary file, one queued
message with an attachment of ``--mb`` MiB of random bytes, delivered once through
``Deliverer.deliver`` to the capture SMTP server (``python -m kipekee.testing``, in its
own process, so its buffers are not counted). The provider is Kipekee's SMTP backend, or
Django's own (``django.core.mail.backends.smtp.EmailBackend``, the reference: the message
built by Django and the email package, as before ``kipekee.wire``). Reported: the growth
of the process's peak RSS (``ru_maxrss``) during the delivery, and tracemalloc's peak of
Python allocations in a second run, each as a multiple of the attachment. Fails unless
every delivery was accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"django (reference)": "django.core.mail.backends.smtp.EmailBackend",
            "kipekee": "kipekee.backends.smtp.EmailBackend"}


def measure(backend: str, port: int, mb: int, trace: bool) -> dict[str, float]:
    """In this (fresh) process: deliver one message and return what it cost."""
    import resource
    import tracemalloc

    sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    from django.conf import settings

    database = tempfile.mktemp(prefix="kipekee-bench-", suffix=".sqlite3")
    django.setup()
    settings.DATABASES["default"]["NAME"] = database
    settings.KIPEKEE = {  # no size cap: the point is to send a large message
        "ENGINE": None, "MODE": "queue", "MAX_MESSAGE_SIZE": None, "PROVIDERS": {"sink": {
            "BACKEND": backend, "OPTIONS": {"host": "127.0.0.1", "port": port, "timeout": 60}}}}
    from django.core.management import call_command

    import kipekee
    from kipekee import outbox
    from kipekee.delivery import Deliverer

    try:
        call_command("migrate", verbosity=0)
        size = mb * 2**20
        receipt = kipekee.send(subject="Big", text="see attached", to=["ann@example.com"],
                               attachments=[("big.bin", os.urandom(size), "application/zip")])
        row = outbox.claim(receipt.id)
        with Deliverer() as deliverer:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if trace:
                tracemalloc.start()
            outcome = deliverer.deliver(row)
            peak = tracemalloc.get_traced_memory()[1] if trace else 0
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if not outcome.ok:
            raise SystemExit(f"not delivered: {outcome.error}")
        return {"rss": (after - before) / size, "traced": peak / size}
    finally:
        os.unlink(database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "PORT", "TRACE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, port, trace = args.child
        print(json.dumps(measure(backend, int(port), args.mb, trace == "1")))
        return

    server = subprocess.Popen([sys.executable, "-m", "kipekee.testing", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(re.search(r"port (\d+)", server.stdout.readline())[1])  # type: ignore[index]
        import django

        print(f"one message with a {args.mb} MiB attachment; Python "
              f"{sys.version.split()[0]}, Django {django.get_version()}\n")
        print(f"{'provider backend':20} {'peak RSS growth':>16} {'tracemalloc peak':>17}")
        results = {}
        for name, backend in BACKENDS.items():
            figures = {}
            for trace in ("0", "1"):
                child = subprocess.run([sys.executable, __file__, "--mb", str(args.mb),
                                        "--child", backend, str(port), trace],
                                       capture_output=True, text=True, check=False)
                if child.returncode:
                    raise SystemExit(f"{name}: {child.stdout}{child.stderr}")
                out = child.stdout
                figures.update({k: v for k, v in json.loads(out.splitlines()[-1]).items()
                                if (k == "traced") == (trace == "1")})
            results[name] = figures
            print(f"{name:20} {figures['rss']:>14.1f} x {figures['traced']:>15.2f} x")
        reference = results["django (reference)"]
        ours = results["kipekee"]
        print(f"\nkipekee / reference: RSS growth {ours['rss'] / reference['rss']:.2f}, "
              f"tracemalloc peak {ours['traced'] / reference['traced']:.2f}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
