"""How long a request waits for one email, with the provider a round trip away.

    make bench-latency                     # builds .venvs/bench, then runs this
    python bench/latency.py [--rtt 0.02] [--samples 30] [--database sqlite|postgres]

The providers run in their own process, each behind a delay proxy
(``kipekee.testing.DelayProxy``: half the round-trip time each way, the TCP handshake
included):

- SMTP: ``kipekee.testing.LocalSMTPServer`` with STARTTLS required and AUTH, as
  submission to Mailtrap, SES or SendGrid is;
- HTTP: the Mailtrap-contract server (``kipekee.testing.LocalMailtrapServer``) behind a
  TLS terminator, so a new connection pays TCP and TLS as with the real API.

In this process, one message at a time (a short confirmation, text only), as a view
sends it, timed from the call until it returns:

- Django's ``send_mail`` through Django's SMTP backend (``EMAIL_*`` settings), and through
  django-anymail's Mailtrap backend: the reference, a new connection every call;
- ``kipekee.send`` in mode ``now``, ``hybrid`` and ``queue``: *warm* (the process's pooled
  connection, as in steady state), *cold* (the pool emptied before the call, untimed),
  *after idle* (unused for longer than ``CONNECTIONS["IDLE_SECONDS"]``: probed first);
- ``send_mail`` through Kipekee's drop-in backend (hybrid, warm).

Rows of one group are measured in turn, sample by sample, so a change in the machine's
load hits them alike. Each figure is the p50 and p90 in milliseconds and in round trips
(ms / RTT). A "local" pair at 0 ms (no proxy) shows what is not the network. The table,
the bars of issue 18 and the command go to ``bench/LATENCY.md``. Exit status 1 if a send
did not reach its server exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SMTP_USER, SMTP_PASSWORD = "bench", "bench-secret"
TOKEN = "bench-token"
FROM = "Tours <desk@tours.example>"
IDLE_SECONDS = 0.5  # CONNECTIONS["IDLE_SECONDS"] in this run: "after idle" waits longer
# Dropped and created again by each run with --database postgres: a checkout of its own
# names its own (KIPEKEE_BENCH_LATENCY_PG_NAME), as compare.py's KIPEKEE_BENCH_PG_NAME.
PG_DB = os.environ.get("KIPEKEE_BENCH_LATENCY_PG_NAME", "kipekee_bench_latency")


# --- the provider process -------------------------------------------------------------

class TLSTerminator:
    """TLS towards the client, plain TCP to ``target`` (the HTTPS of Mailtrap's API)."""

    def __init__(self, target: tuple[str, int], context: ssl.SSLContext) -> None:
        self.target = target
        self.context = context
        self.port = 0
        self._ready = threading.Event()

    def start(self) -> TLSTerminator:
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        self._ready.wait()
        return self

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await asyncio.Event().wait()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


def serve_providers(rtt: float) -> None:
    """Start the servers and proxies, print their ports as one JSON line, then answer
    ``count`` on stdin with what the servers received, until stdin closes."""
    from kipekee.testing import DelayProxy, LocalMailtrapServer, LocalSMTPServer
    from kipekee.testing.smtp import self_signed_context

    context, pem = self_signed_context(("127.0.0.1", "localhost"))
    pem_path = Path(tempfile.mkdtemp(prefix="kipekee-latency-")) / "ca.pem"
    pem_path.write_bytes(pem)
    smtp = LocalSMTPServer(tls="starttls", require_starttls=True, ssl_context=context,
                           auth={SMTP_USER: SMTP_PASSWORD})
    smtp.start()
    mailtrap = LocalMailtrapServer(tokens={TOKEN}, rate=None, record_bodies=False).start()
    https = TLSTerminator((mailtrap.host, mailtrap.port), context).start()
    smtp_proxy = DelayProxy((smtp.host, smtp.port), rtt=rtt).start()
    https_proxy = DelayProxy(("127.0.0.1", https.port), rtt=rtt).start()
    print(json.dumps({"smtp": smtp_proxy.port, "smtp_local": smtp.port,
                      "https": https_proxy.port, "https_local": https.port,
                      "pem": str(pem_path)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            ids = [m.message_id for m in smtp.messages]
            print(json.dumps({"smtp": len(ids), "smtp_unique": len(set(ids)),
                              "mailtrap": len(mailtrap.messages),
                              "smtp_connections": smtp.connections,
                              "mailtrap_connections": mailtrap.connections}), flush=True)


# --- this process: Django and the measurements ------------------------------------------

def configure(ports: dict[str, Any], database: str, tmp: Path) -> None:
    import django
    from django.conf import settings

    # Django's SMTP backend trusts what ssl.create_default_context() trusts; requests
    # (anymail) its CA bundle: both the bench's own certificate, as a deployment trusts
    # its provider's.
    os.environ["SSL_CERT_FILE"] = ports["pem"]
    os.environ["REQUESTS_CA_BUNDLE"] = ports["pem"]
    if database == "postgres":
        db = {"ENGINE": "django.db.backends.postgresql", "NAME": PG_DB, "HOST": "127.0.0.1",
              "PORT": "5432", "USER": "postgres"}
    else:
        # WAL, as the demo runs SQLite: the commit is a local write, not a disk flush.
        db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(tmp / "latency.sqlite3"),
              "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                          "transaction_mode": "IMMEDIATE"}}

    def smtp(port: int) -> dict[str, Any]:
        return {"BACKEND": "kipekee.backends.smtp.EmailBackend",
                "OPTIONS": {"host": "127.0.0.1", "port": port, "use_tls": True,
                            "username": SMTP_USER, "password": SMTP_PASSWORD,
                            "ca_file": ports["pem"], "timeout": 10}}

    def mailtrap(port: int) -> dict[str, Any]:
        return {"BACKEND": "kipekee.backends.mailtrap.EmailBackend",
                "OPTIONS": {"api_token": TOKEN, "api_url": f"https://127.0.0.1:{port}/api/",
                            "timeout": 10}}

    settings.configure(
        DEBUG=False, SECRET_KEY="bench", USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "kipekee"],
        DATABASES={"default": db},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        DEFAULT_FROM_EMAIL=FROM,
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1", EMAIL_PORT=ports["smtp"], EMAIL_USE_TLS=True,
        EMAIL_HOST_USER=SMTP_USER, EMAIL_HOST_PASSWORD=SMTP_PASSWORD, EMAIL_TIMEOUT=10,
        KIPEKEE={
            "PROVIDERS": {"smtp": smtp(ports["smtp"]), "mailtrap": mailtrap(ports["https"]),
                          "smtp_local": smtp(ports["smtp_local"]),
                          "mailtrap_local": mailtrap(ports["https_local"])},
            "ENGINE": None,  # queued rows stay queued: only the call is measured
            "NOW_TIME_BUDGET": 30,
            "CONNECTIONS": {"IDLE_SECONDS": IDLE_SECONDS},
        },
    )
    django.setup()
    if database == "postgres":
        import psycopg

        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{PG_DB}"')
            conn.execute(f'CREATE DATABASE "{PG_DB}"')
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


@dataclass
class Row:
    group: str
    name: str
    send: Callable[[int], None]
    before: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    sends: int = 0  # messages this row sent to its server (for the exactly-once check)
    network: bool = True

    def p(self, q: float) -> float:
        data = sorted(self.times)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.times) * 1000


class Sends:
    """The calls being measured; each checks its result (an unsent mail fails the run)."""

    def __init__(self) -> None:
        # Imported once configure() has set Django up (settings.configure at run time).
        from django.core.mail import get_connection, send_mail

        import kipekee

        self.kipekee = kipekee
        self.send_mail = send_mail
        self.get_connection = get_connection
        self.failures: list[str] = []

    def mail(self, i: int) -> dict[str, Any]:
        return {"subject": f"Your booking #{i} is confirmed",
                "text": f"Dear guest {i},\n\nthank you: booking {i} is confirmed.\n\nTours Ltd\n",
                "to": [f"guest{i}@example.com"]}

    def kipekee_send(self, provider: str, mode: str) -> Callable[[int], None]:
        expected = "queued" if mode == "queue" else "sent"

        def send(i: int) -> None:
            receipt = self.kipekee.send(**self.mail(i), mode=mode, provider=provider)
            if receipt.status != expected:
                self.failures.append(f"{provider}/{mode} #{i}: {receipt!r}")
        return send

    def django_send_mail(self, connection: Callable[[], Any] | None = None) -> Callable[[int], None]:
        def send(i: int) -> None:
            m = self.mail(i)
            sent = self.send_mail(m["subject"], m["text"], FROM, m["to"],
                                  connection=connection() if connection else None)
            if sent != 1:
                self.failures.append(f"send_mail #{i} returned {sent}")
        return send


def measure(rows: list[Row], samples: int, *, pause: float = 0.0) -> None:
    """``samples`` rounds; in each, every row once, in turn (after its untimed ``before``)."""
    counter = iter(range(10**9))
    for row in rows:  # warm-up: imports, templates, first statements; not recorded
        row.before()
        row.send(next(counter))
        row.sends += 1
    for _ in range(samples):
        for row in rows:
            row.before()
            if pause:
                time.sleep(pause)
            started = time.perf_counter()
            row.send(next(counter))
            row.times.append(time.perf_counter() - started)
            row.sends += 1


def run(args: argparse.Namespace) -> int:
    provider_proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-providers", "--rtt", str(args.rtt)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert provider_proc.stdin is not None and provider_proc.stdout is not None
    try:
        ports = json.loads(provider_proc.stdout.readline())
        with tempfile.TemporaryDirectory(prefix="kipekee-latency-") as tmp:
            configure(ports, args.database, Path(tmp))
            args.ports = ports
            rows = build_rows(args)
            print(f"RTT {args.rtt * 1000:.0f} ms, {args.samples} samples per row "
                  f"({args.idle_samples} after idle), database {args.database}", flush=True)
            for group in ("SMTP", "HTTP", "local"):
                measure([r for r in rows if r.group == group and "idle" not in r.name],
                        args.samples)
            # Idle: the pool's connection unused for longer than IDLE_SECONDS.
            measure([r for r in rows if "idle" in r.name], args.idle_samples,
                    pause=IDLE_SECONDS + 0.1)
            provider_proc.stdin.write("count\n")
            provider_proc.stdin.flush()
            counts = json.loads(provider_proc.stdout.readline())
            return report(args, rows, counts)
    finally:
        provider_proc.stdin.close()
        provider_proc.wait(10)


def build_rows(args: argparse.Namespace) -> list[Row]:
    from kipekee import connections  # after configure(), as in Sends


    s = Sends()
    cold = connections.close_all

    def mailtrap_connection() -> Any:
        return s.get_connection("anymail.backends.mailtrap.EmailBackend", api_token=TOKEN,
                                api_url=f"https://127.0.0.1:{args.ports['https']}/api/",
                                timeout=10)

    def dropin() -> Any:
        return s.get_connection("kipekee.backend.EmailBackend", mode="hybrid", provider="smtp")

    def local_django() -> Any:
        return s.get_connection("django.core.mail.backends.smtp.EmailBackend",
                                host="127.0.0.1", port=args.ports["smtp_local"], use_tls=True,
                                username=SMTP_USER, password=SMTP_PASSWORD, timeout=10)

    rows = [
        Row("SMTP", "Django send_mail (Django's SMTP backend)", s.django_send_mail()),
        Row("SMTP", "kipekee.send now, warm", s.kipekee_send("smtp", "now")),
        Row("SMTP", "kipekee.send now, cold", s.kipekee_send("smtp", "now"), cold),
        Row("SMTP", "kipekee.send hybrid, warm", s.kipekee_send("smtp", "hybrid")),
        Row("SMTP", "kipekee.send hybrid, cold", s.kipekee_send("smtp", "hybrid"), cold),
        Row("SMTP", "kipekee.send hybrid, after idle", s.kipekee_send("smtp", "hybrid")),
        Row("SMTP", "send_mail via Kipekee's drop-in (hybrid, warm)", s.django_send_mail(dropin)),
        Row("SMTP", "kipekee.send queue", s.kipekee_send("smtp", "queue"), network=False),
        Row("HTTP", "Django send_mail (anymail's Mailtrap backend)",
            s.django_send_mail(mailtrap_connection)),
        Row("HTTP", "kipekee.send now, warm", s.kipekee_send("mailtrap", "now")),
        Row("HTTP", "kipekee.send now, cold", s.kipekee_send("mailtrap", "now"), cold),
        Row("HTTP", "kipekee.send hybrid, warm", s.kipekee_send("mailtrap", "hybrid")),
        Row("HTTP", "kipekee.send hybrid, cold", s.kipekee_send("mailtrap", "hybrid"), cold),
        Row("HTTP", "kipekee.send hybrid, after idle", s.kipekee_send("mailtrap", "hybrid")),
        Row("HTTP", "kipekee.send queue", s.kipekee_send("mailtrap", "queue"), network=False),
        Row("local", "Django send_mail, SMTP at 0 ms", s.django_send_mail(local_django)),
        Row("local", "kipekee.send hybrid, warm, SMTP at 0 ms",
            s.kipekee_send("smtp_local", "hybrid")),
        Row("local", "kipekee.send hybrid, warm, Mailtrap at 0 ms",
            s.kipekee_send("mailtrap_local", "hybrid")),
    ]
    args.sends = s
    return rows


def report(args: argparse.Namespace, rows: list[Row], counts: dict[str, int]) -> int:
    rtt_ms = args.rtt * 1000
    failures = list(args.sends.failures)
    smtp_sent = sum(r.sends for r in rows if r.group in ("SMTP", "local") and r.network
                    and "Mailtrap" not in r.name)
    http_sent = sum(r.sends for r in rows if r.network and (r.group == "HTTP" or "Mailtrap" in r.name))
    if counts["smtp"] != smtp_sent or counts["smtp_unique"] != smtp_sent:
        failures.append(f"SMTP server received {counts['smtp']} messages "
                        f"({counts['smtp_unique']} distinct), {smtp_sent} were sent")
    if counts["mailtrap"] != http_sent:
        failures.append(f"Mailtrap server received {counts['mailtrap']} messages, "
                        f"{http_sent} were sent")

    def rt(ms: float) -> str:
        return f"{ms / rtt_ms:.1f}" if rtt_ms else "-"

    lines = ["| | call | p50 ms | p90 ms | p50 RTT | p90 RTT |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        local = row.group == "local"
        lines.append(f"| {row.group} | {row.name} | {row.p50:.1f} | {row.p(0.9):.1f} | "
                     f"{'-' if local else rt(row.p50)} | {'-' if local else rt(row.p(0.9))} |")
    table = "\n".join(lines)

    def get(group: str, name: str) -> Row:
        return next(r for r in rows if r.group == group and r.name == name)

    django_smtp = get("SMTP", "Django send_mail (Django's SMTP backend)")
    warm = get("SMTP", "kipekee.send hybrid, warm")
    idle = get("SMTP", "kipekee.send hybrid, after idle")
    http_warm = get("HTTP", "kipekee.send hybrid, warm")
    bars = [
        ("SMTP hybrid p50, steady state (warm)", f"{warm.p50 / rtt_ms:.2f} RTT", "≤ 4 RTT",
         warm.p50 / rtt_ms <= 4),
        ("SMTP hybrid p50 / Django send_mail p50", f"{warm.p50 / django_smtp.p50:.2f}×",
         "≤ 0.35×", warm.p50 / django_smtp.p50 <= 0.35),
        ("SMTP hybrid, first send after idle, p50 / Django p50",
         f"{idle.p50 / django_smtp.p50:.2f}×", "≤ 1×", idle.p50 <= django_smtp.p50),
        ("Mailtrap API hybrid p50, warm", f"{http_warm.p50 / rtt_ms:.2f} RTT", "≤ 1.3 RTT",
         http_warm.p50 / rtt_ms <= 1.3),
    ]
    bar_lines = ["| bar | measured | needed | |", "|---|---:|---:|---|"]
    bar_lines += [f"| {name} | {got} | {need} | {'met' if ok else '**missed**'} |"
                  for name, got, need, ok in bars]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                            capture_output=True, text=True).stdout.strip()
    command = "make bench-latency" if os.environ.get("KIPEKEE_BENCH_MAKE") else \
        "python bench/latency.py " + shlex.join(sys.argv[1:])
    checks = ("every message reached its server exactly once"
              if not failures else "FAILED: " + "; ".join(failures[:5]))
    text = (
        f"# Latency of one send in the request\n\n"
        f"`{command}` at {commit}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"Python {platform.python_version()}, load average {load} (2 shared cores).\n\n"
        f"Provider {rtt_ms:.0f} ms away (DelayProxy, TCP handshake included); SMTP with "
        f"STARTTLS and AUTH, the Mailtrap API over TLS; database {args.database}"
        f"{' (WAL, synchronous=NORMAL: a commit is no fsync)' if args.database == 'sqlite' else ''}; "
        f"{args.samples} samples per row ({args.idle_samples} after idle, idle "
        f"{IDLE_SECONDS + 0.1:.1f} s > IDLE_SECONDS {IDLE_SECONDS}); {checks}.\n\n"
        f"{table}\n\n{chr(10).join(bar_lines)}\n\n"
        f"SMTP connections the server saw: {counts['smtp_connections']}; Mailtrap: "
        f"{counts['mailtrap_connections']}. See bench/README.md for what each row is.\n"
    )
    print("\n" + table + "\n\n" + "\n".join(bar_lines) + "\n", flush=True)
    print(checks, flush=True)
    if args.output:
        Path(args.output).write_text(text)
        print(f"written to {args.output}", flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt", type=float, default=0.02, help="seconds (default 0.02)")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--idle-samples", type=int, default=15)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--output", default=str(ROOT / "bench" / "LATENCY.md"),
                        help="where the results go ('' for nowhere)")
    parser.add_argument("--serve-providers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_providers:
        serve_providers(args.rtt)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
