"""CPU per message to turn a queued outbox row into the bytes SMTP sends: Kipekee's direct
builder against Django's own ``message().as_bytes()``, measured in the same run.

    .venvs/django61/bin/python bench/build.py [--messages 1000] [--repeats 5] [--profile]

Rows are written to a fresh SQLite outbox with ``kipekee.send(mode="queue")`` and read
back with their attachments, as an engine claims them. Workloads:

- ``booking``: the workload of ``bench/compare.py`` (text and HTML, about 5.8 KB on the
  wire, one recipient, its own Message-ID);
- ``ticket``: text and HTML with an inline QR code (PNG) and a PDF ticket (the cinema seed);
- ``plain``: a short text message;
- ``non-ascii``: Swahili and German in the subject, the names and both bodies.

For each row, both ways start from the row: ``from_row(row)``, then
``kipekee.wire.message_bytes`` (Kipekee) or Django's build as its SMTP backend calls it
(Django 6: ``message(policy=email.policy.SMTP).as_bytes()``; 5.2:
``message().as_bytes(linesep="\\r\\n")``). CPU time (``time.process_time``) per message, the
median of ``--repeats`` rounds that alternate the two, and the ratio. Each round has rows of
its own (``--messages`` each): Kipekee caches what repeats from message to message (the
From header, part headers), and a message is built once in real life, so no round may find
its own messages in those caches. After the rounds every message's bytes are compared
(boundaries numbered, the Date header made the same): the script exits 1 if any differ.
``--profile`` prints where the time goes in each (cProfile, the booking workload).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.compare import html_body, text_body


def configure(db_path: str) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="bench",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "kipekee"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DEFAULT_FROM_EMAIL="Tours <desk@tours.example>",
        # No engine: the rows stay queued (nothing is sent here).
        KIPEKEE={"ENGINE": None,
                 "PROVIDERS": {"primary": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}},
    )
    django.setup()


def enqueue(workload: str, n: int) -> None:
    import kipekee
    from kipekee.qr import qr_png

    pdf = b"%PDF-1.4\n" + os.urandom(20_000)
    for i in range(n):
        kwargs: dict[str, Any] = {"mode": "queue", "to": [f"guest{i}@example.com"],
                                  "from_email": "Tours <desk@tours.example>"}
        if workload == "booking":
            kwargs |= {"subject": f"Your booking #{i}", "text": text_body(i), "html": html_body(i)}
        elif workload == "ticket":
            ticket = kipekee.Email(subject=f"Your ticket BK-{i}", text=text_body(i),
                                   attachments=[(f"ticket-{i}.pdf", pdf, "application/pdf")],
                                   **kwargs)
            cid = ticket.attach_inline("qr.png", qr_png(f"BOOKING:BK-{i};SEAT:F7"), "image/png")
            ticket.html = html_body(i).replace("</h1>", f'</h1><img src="cid:{cid}">')
            ticket.send()
            continue
        elif workload == "plain":
            kwargs |= {"subject": f"Code {i:06d}", "text": f"Your sign-in code is {i:06d}."}
        else:
            kwargs |= {"subject": f"Uthibitisho wa tiketi #{i} — Grüße aus München ✓",
                       "text": text_body(i).replace("guest", "mgeni wetu, Zoë"),
                       "html": html_body(i).replace("Dear guest", "Mpendwa mgeni, Grüße"),
                       "to": [f"Zoë Müller {i} <guest{i}@example.com>"],
                       "from_email": "Safari Tours — Ziara <desk@tours.example>"}
        kipekee.send(**kwargs)


def rows() -> list[Any]:
    from kipekee.models import OutboxEmail

    return list(OutboxEmail.objects.order_by("pk").prefetch_related("attachments"))


def kipekee_bytes(row: Any) -> bytes:
    from kipekee import wire
    from kipekee.message import from_row

    return wire.message_bytes(from_row(row))


def django_bytes(row: Any) -> bytes:
    import email.policy

    import django

    from kipekee.message import from_row

    message = from_row(row)
    if django.VERSION >= (6, 0):
        return message.message(policy=email.policy.SMTP).as_bytes()  # type: ignore[no-any-return]
    return message.message().as_bytes(linesep="\r\n")  # type: ignore[no-any-return]


def normalised(data: bytes) -> bytes:
    seen: dict[bytes, bytes] = {}
    data = re.sub(rb"={15}\d{19}==", lambda m: seen.setdefault(m[0], b"B%d" % len(seen)), data)
    # The Date header is the time of each build, to the second.
    return re.sub(rb"\r\nDate: [^\r]+\r\n", b"\r\nDate: (now)\r\n", data, count=1)


def cpu_per_message(build: Callable[[Any], bytes], batch: list[Any]) -> float:
    started = time.process_time()
    for row in batch:
        build(row)
    return (time.process_time() - started) / len(batch)


def profile(build: Callable[[Any], bytes], batch: list[Any], top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for row in batch:
        build(row)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return "\n".join(lines[start - 1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="rows per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds, each way")
    parser.add_argument("--workloads", default="booking,ticket,plain,non-ascii")
    parser.add_argument("--profile", action="store_true", help="cProfile of each way (booking)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        configure(os.path.join(tmp, "outbox.sqlite3"))
        import django
        from django.core.management import call_command

        from kipekee.models import OutboxEmail

        call_command("migrate", verbosity=0)
        print(f"Python {sys.version.split()[0]}, Django {django.get_version()}; "
              f"{args.messages} rows a round, median of {args.repeats} rounds\n")
        print("| workload | bytes | Django ms/msg | Kipekee ms/msg | Kipekee ÷ Django |")
        print("|---|---:|---:|---:|---:|")
        failed = 0
        profiles: dict[str, str] = {}
        for workload in args.workloads.split(","):
            OutboxEmail.objects.all().delete()
            n = args.messages
            rounds = args.repeats + (1 if args.profile and workload == "booking" else 0)
            enqueue(workload, n * rounds)
            every = rows()
            times: dict[str, list[float]] = {"django": [], "kipekee": []}
            for r in range(args.repeats):
                batch = every[r * n:(r + 1) * n]
                times["django"].append(cpu_per_message(django_bytes, batch))
                times["kipekee"].append(cpu_per_message(kipekee_bytes, batch))
            if rounds > args.repeats:
                batch = every[-n:]
                profiles = {name: profile(build, batch, 18) for name, build in
                            (("Django", django_bytes), ("Kipekee", kipekee_bytes))}
            theirs, ours = (statistics.median(times[k]) * 1000 for k in ("django", "kipekee"))
            size = statistics.median(len(kipekee_bytes(row)) for row in every[:50])
            print(f"| {workload} | {size:,.0f} | {theirs:.3f} | {ours:.3f} | {ours / theirs:.3f} |")
            for row in every:  # the same bytes, every message
                if normalised(kipekee_bytes(row)) != normalised(django_bytes(row)):
                    failed += 1
                    print(f"  {workload}: row {row.pk} differs from Django's bytes")
        for name, text in profiles.items():
            print(f"\n{name}, booking, {args.messages} rows (cProfile, by cumulative time):\n{text}")
        if failed:
            print(f"\n{failed} messages differ from Django's bytes")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
