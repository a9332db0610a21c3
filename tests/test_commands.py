"""kipekee_check (each check failing and passing for real), kipekee_sendtest, kipekee_purge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

import kipekee
from kipekee.models import Attachment, Attempt, EngineHeartbeat, OutboxEmail, Status

from .conftest import smtp_provider, unused_port

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


def check(*args: str) -> tuple[dict[str, tuple[str, str]], bool]:
    """Run kipekee_check; ({name: (status, detail)}, passed)."""
    from io import StringIO

    out = StringIO()
    try:
        call_command("kipekee_check", "--json", *args, stdout=out)
        passed = True
    except CommandError as exc:
        assert exc.returncode == 1
        passed = False
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    return {r["check"]: (r["status"], r["detail"]) for r in rows}, passed


def _row(**fields) -> OutboxEmail:
    now = timezone.now()
    defaults = {"from_email": "shop@example.com", "to": ["ann@example.com"], "subject": "s",
                "body": "b", "message_id": f"<{now.timestamp()}@x>", "created_at": now,
                "due_at": now}
    return OutboxEmail.objects.create(**{**defaults, **fields})


# --- kipekee_check -------------------------------------------------------------------


def test_everything_healthy(kipekee_settings, smtp_sink):
    kipekee_settings(primary=smtp_provider(smtp_sink))
    rows, passed = check()
    assert passed, rows
    assert rows["database"][0] == "ok"
    assert rows["provider primary"][0] == "ok"
    assert f"connected to 127.0.0.1:{smtp_sink.port}, no TLS, no AUTH" in rows["provider primary"][1]
    assert smtp_sink.messages == []  # nothing was sent
    assert smtp_sink.connections == 1
    assert rows["engines"] == ("ok", "none running; none needed now (nothing waits for one)")
    assert rows["queue depth"][0] == rows["oldest due"][0] == rows["failure rate 1h"][0] == "ok"


def test_table_output_and_exit_status_in_a_real_process(tmp_path):
    """A fresh, unmigrated database: the migrations check fails, and the exit status is 1."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    env.pop("KIPEKEE_TEST_DATABASE", None)
    proc = subprocess.run([sys.executable, "-m", "django", "kipekee_check", "--no-providers"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    migrations = next(line for line in lines if line.startswith("migrations"))
    assert "FAIL" in migrations and "not applied: 0001_squashed" in migrations
    assert "(run manage.py migrate)" in migrations
    assert "failing: migrations" in proc.stderr


def test_provider_checks_fail_for_real(smtp_server, smtp_ca_file, kipekee_settings):
    auth = smtp_server(tls="starttls", require_starttls=True, auth={"shop": "s3cret"})
    kipekee_settings(
        good=smtp_provider(auth, use_tls=True, username="shop", password="s3cret",
                           ca_file=smtp_ca_file),
        bad_password=smtp_provider(auth, use_tls=True, username="shop", password="wrong",
                                   ca_file=smtp_ca_file),
        untrusted=smtp_provider(auth, use_tls=True, username="shop", password="s3cret"),
        down={"BACKEND": "kipekee.backends.smtp.EmailBackend",
              "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 1}},
    )
    rows, passed = check()
    assert not passed
    status, detail = rows["provider good"]
    assert status == "ok" and "STARTTLS TLSv1." in detail and "AUTH as shop" in detail
    assert rows["provider bad_password"][0] == "fail"
    assert rows["provider bad_password"][1].startswith("configuration: authentication failed: 535")
    assert rows["provider untrusted"][0] == "fail"
    assert "certificate not trusted" in rows["provider untrusted"][1]
    assert rows["provider down"][0] == "fail"
    assert rows["provider down"][1].startswith("transient: ConnectionRefusedError")
    assert auth.messages == []


def test_provider_probe_is_bounded_by_the_provider_timeout(smtp_server, kipekee_settings):
    # A server that answers, a byte every 50 ms: each read is within any timeout, but the
    # banner and EHLO alone take seconds. PROVIDER_TIMEOUT bounds the whole probe.
    from kipekee.testing import Faults

    server = smtp_server(faults=Faults(trickle_replies=0.05))
    kipekee_settings(slow=smtp_provider(server, timeout=5),
                     _extra={"CHECK": {"PROVIDER_TIMEOUT": 0.5}})
    started = time.monotonic()
    rows, passed = check()
    assert time.monotonic() - started < 2
    assert not passed and rows["provider slow"][0] == "fail"
    assert "deadline" in rows["provider slow"][1]


def test_no_provider_fails(kipekee_settings):
    kipekee_settings()
    rows, passed = check()
    assert not passed and rows["providers"][0] == "fail"
    # --no-providers: a probe that never opens a connection.
    rows, passed = check("--no-providers")
    assert passed and "providers" not in rows


def test_engines_needed_only_when_rows_wait_for_one(sink_provider):
    now = timezone.now()
    _row(mode="hybrid", status=Status.SENT)
    rows, passed = check("--no-providers")
    assert passed and rows["engines"][0] == "ok"

    _row(mode="queue")  # waits for an engine, and none beats
    EngineHeartbeat.objects.create(name="worker@h:1", kind="worker", host="h", pid=1,
                                   beat_at=now - timedelta(minutes=10))  # killed
    EngineHeartbeat.objects.create(name="worker@h:2", kind="worker", host="h", pid=2,
                                   beat_at=now, stopped_at=now)  # stopped cleanly
    rows, passed = check("--no-providers")
    assert not passed
    assert rows["engines"] == ("fail", "none alive, and 1 message(s) wait for one "
                                       "(start: manage.py kipekee_worker)")
    assert rows["dead engines"][0] == "warn" and "worker@h:1" in rows["dead engines"][1]

    EngineHeartbeat.objects.create(name="thread@h:3", kind="thread", host="h", pid=3, beat_at=now)
    rows, passed = check("--no-providers")
    assert passed and rows["engines"][0] == "ok" and "1 alive (thread@h:3)" in rows["engines"][1]


@pytest.mark.parametrize(("engine", "hint"), [
    (None, "manage.py kipekee_worker"),
    ("worker", "manage.py kipekee_worker"),
    ("thread", "a web process (ENGINE \"thread\" runs in it)"),
    ("celery", "a Celery worker consuming queue kipekee, with beat"),
    ("tasks", "a worker of task backend default for queue mail (e.g. manage.py db_worker "
              "--queue-name mail)"),
])
def test_no_engine_alive_names_how_to_start_the_configured_one(sink_provider, settings, engine,
                                                               hint):
    settings.KIPEKEE = {**settings.KIPEKEE, "ENGINE": engine, "TASKS": {"QUEUE": "mail"}}
    _row(mode="queue")
    rows, passed = check("--no-providers")
    assert not passed
    assert rows["engines"] == ("fail", f"none alive, and 1 message(s) wait for one (start: {hint})")


def test_heartbeat_max_age_is_configurable(kipekee_settings):
    kipekee_settings(_extra={"CHECK": {"HEARTBEAT_MAX_AGE": 600}})
    _row(mode="queue")
    EngineHeartbeat.objects.create(name="worker@h:1", kind="worker", host="h", pid=1,
                                   beat_at=timezone.now() - timedelta(minutes=5))
    assert check("--no-providers")[0]["engines"][0] == "ok"


def test_queue_depth_and_oldest_due(kipekee_settings):
    kipekee_settings(_extra={"CHECK": {"QUEUE_DEPTH_MAX": 2, "OLDEST_DUE_MAX_AGE": 600}})
    EngineHeartbeat.objects.create(name="w", kind="worker", host="h", pid=1)
    later = timezone.now() + timedelta(hours=1)
    for _ in range(2):
        _row(mode="queue", due_at=later)  # scheduled: counted, not due
    rows, passed = check("--no-providers")
    assert passed, rows
    assert rows["queue depth"][1].startswith("2 waiting (2 queued, 0 deferred)")
    assert rows["oldest due"] == ("ok", "nothing due")

    _row(mode="queue", status=Status.DEFERRED, due_at=timezone.now() - timedelta(minutes=30))
    rows, passed = check("--no-providers")
    assert not passed
    assert rows["queue depth"][0] == "fail"
    assert rows["oldest due"] == ("fail", "due 30 min ago; limit 10 min")


def test_failure_rate_of_the_last_hour(kipekee_settings):
    kipekee_settings(_extra={"CHECK": {"FAILURE_RATE_MAX": 0.5, "FAILURE_RATE_MIN_ATTEMPTS": 2}})
    email = _row(status=Status.SENT)
    now = timezone.now()

    def attempt(outcome: str, ago: timedelta = timedelta()) -> None:
        Attempt.objects.create(email=email, number=1, started_at=now - ago,
                               finished_at=now - ago, outcome=outcome)

    for _ in range(5):
        attempt("transient", ago=timedelta(hours=2))  # outside the window
    attempt("sent")
    attempt("transient")
    rows, passed = check("--no-providers")
    assert passed and rows["failure rate 1h"] == ("ok", "50% of 2 attempts failed (1); limit 50%")
    attempt("permanent")
    rows, passed = check("--no-providers")
    assert not passed and rows["failure rate 1h"][0] == "fail"


def test_failure_rate_needs_enough_attempts(kipekee_settings):
    kipekee_settings()  # at least 20 attempts by default
    email = _row(status=Status.FAILED)
    now = timezone.now()
    Attempt.objects.create(email=email, number=1, started_at=now, outcome="permanent")
    rows, passed = check("--no-providers")
    assert passed  # one refused address is not an outage …
    assert rows["failure rate 1h"] == (
        "warn", "100% of 1 attempts failed (1); limit 20%, judged from 20 attempts")
    Attempt.objects.bulk_create(Attempt(email=email, number=n, started_at=now,
                                        outcome="transient") for n in range(2, 21))
    rows, passed = check("--no-providers")
    assert not passed and rows["failure rate 1h"][0] == "fail"  # … twenty failures are


def test_only_some_checks(kipekee_settings):
    kipekee_settings()  # no providers: "providers" would fail
    rows, passed = check("--only", "database,engines")
    assert passed and set(rows) == {"database", "migrations", "engines"}
    with pytest.raises(CommandError, match="choose among database, providers"):
        call_command("kipekee_check", "--only", "database,disk")


# --- kipekee_sendtest ----------------------------------------------------------------


def test_sendtest_reports_where_it_went(kipekee_settings, smtp_sink):
    from io import StringIO

    kipekee_settings(down={"BACKEND": "kipekee.backends.smtp.EmailBackend",
                           "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 1}},
                     primary=smtp_provider(smtp_sink))
    out = StringIO()
    call_command("kipekee_sendtest", "ops@example.com", stdout=out)
    text = out.getvalue()
    assert "status        sent" in text and "provider      primary" in text
    assert "sent to ops@example.com via primary in " in text
    received = smtp_sink.wait_for(1)[0]
    assert list(received.rcpt_tos) == ["ops@example.com"]
    assert received.subject.startswith("Kipekee test email from ")
    row = OutboxEmail.objects.get()
    assert row.metadata == {"sendtest": True} and row.mode == "now"
    assert f"#{row.pk}" in text and row.message_id in text


def test_sendtest_through_a_failing_provider_exits_non_zero(kipekee_settings, smtp_sink):
    from io import StringIO

    kipekee_settings(down={"BACKEND": "kipekee.backends.smtp.EmailBackend",
                           "OPTIONS": {"host": "127.0.0.1", "port": unused_port(), "timeout": 1}},
                     primary=smtp_provider(smtp_sink))
    out = StringIO()
    with pytest.raises(CommandError, match="not delivered") as info:
        call_command("kipekee_sendtest", "ops@example.com", "--provider", "down", stdout=out)
    assert info.value.returncode == 1
    assert "ConnectionRefusedError" in out.getvalue()
    assert smtp_sink.messages == []
    with pytest.raises(CommandError, match="Unknown Kipekee provider 'nope'"):
        call_command("kipekee_sendtest", "ops@example.com", "--provider", "nope")


# --- kipekee_purge -------------------------------------------------------------------

N_OLD = 3000


def _fill(now) -> None:
    """3,000 old finished rows (with attempts and attachments), and some that must stay."""
    old = now - timedelta(days=40)
    statuses = [Status.SENT, Status.FAILED, Status.CANCELLED]
    rows = OutboxEmail.objects.bulk_create(
        OutboxEmail(from_email="Shop <shop@example.com>", to=[f"Ann {i} <ann{i}@Example.com>"],
                    cc=["bob@other.example"], subject=f"Order {i}", body="secret body",
                    message_id=f"<{i}@x>", status=statuses[i % 3], created_at=old, due_at=old,
                    metadata={"order": i}, last_error="ann@example.com: 550")
        for i in range(N_OLD)
    )
    Attempt.objects.bulk_create(
        Attempt(email=r, number=1, started_at=old, finished_at=old, outcome="sent",
                error="ann@example.com: 550", refused={"ann@example.com": "550"}) for r in rows)
    Attachment.objects.bulk_create(
        Attachment(email=r, filename="ticket.pdf", mimetype="application/pdf", content=b"%PDF")
        for r in rows[:100])
    _row(mode="queue", status=Status.DEFERRED, created_at=old)  # still going out: kept
    _row(status=Status.SENT, created_at=now - timedelta(days=5))  # recent: kept


def test_purge_anonymises_a_large_table_in_batches(kipekee_settings, django_assert_max_num_queries):
    kipekee_settings(_extra={"RETENTION": {"DAYS": 30, "BATCH_SIZE": 500}})
    _fill(timezone.now())
    from io import StringIO

    out = StringIO()
    call_command("kipekee_purge", "--dry-run", stdout=out)
    assert out.getvalue().strip() == ("3000 rows older than 30 days would be anonymised "
                                      "(cancelled: 1000, failed: 1000, sent: 1000)")
    assert OutboxEmail.objects.exclude(from_email="").count() == N_OLD + 2
    out = StringIO()
    # 6 batches of 500: a bounded number of queries per batch, never one per row (at most
    # 6 a batch: transaction, select, attachments, rows, attempts…), plus the last look.
    with django_assert_max_num_queries(6 * 6 + 1):
        call_command("kipekee_purge", stdout=out)
    assert out.getvalue().strip() == ("3000 rows older than 30 days anonymised "
                                      "(cancelled: 1000, failed: 1000, sent: 1000)")
    # Counts remain for statistics…
    assert OutboxEmail.objects.count() == N_OLD + 2
    assert OutboxEmail.objects.filter(status=Status.SENT).count() == 1001
    assert Attempt.objects.count() == N_OLD
    # … content and addresses do not.
    old = OutboxEmail.objects.filter(from_email="")
    assert old.count() == N_OLD
    assert set(old.values_list("subject", "body", "last_error")) == {("", "", "")}
    assert {tuple(r.to) + tuple(r.cc) for r in old[:50]} == {("@example.com", "@other.example")}
    assert not old.exclude(metadata={}).exists()
    assert set(Attempt.objects.values_list("error", flat=True)) == {""}
    assert Attachment.objects.count() == 0
    kept = OutboxEmail.objects.exclude(from_email="")
    assert sorted(kept.values_list("status", flat=True)) == [Status.DEFERRED, Status.SENT]
    assert all(r.to == ["ann@example.com"] for r in kept)
    # A second run finds nothing left to do.
    out = StringIO()
    call_command("kipekee_purge", stdout=out)
    assert out.getvalue().startswith("0 rows")


def test_purge_delete(kipekee_settings):
    kipekee_settings()
    _fill(timezone.now())
    from io import StringIO

    out = StringIO()
    call_command("kipekee_purge", "--days", "30", "--action", "delete", "--batch-size", "1000",
                 stdout=out)
    assert out.getvalue().strip() == ("3000 rows older than 30 days deleted "
                                      "(cancelled: 1000, failed: 1000, sent: 1000)")
    assert OutboxEmail.objects.count() == 2
    assert Attempt.objects.count() == 0 and Attachment.objects.count() == 0


def test_purge_needs_an_age(kipekee_settings):
    kipekee_settings()
    with pytest.raises(CommandError, match="No retention age"):
        call_command("kipekee_purge")


def test_unapplied_migration_fails(kipekee_settings):
    from django.core.management import call_command as run

    kipekee_settings()
    rows, _ = check("--no-providers")
    assert rows["migrations"] == ("ok", "kipekee's migrations are applied")
    run("migrate", "kipekee", "zero", verbosity=0)  # as if deployed without `migrate`
    try:
        rows, passed = check("--no-providers")
        assert not passed
        assert rows["database"][0] == "ok"  # it answers; what it lacks is the next row
        assert rows["migrations"] == (
            "fail", "not applied: 0001_squashed_0012_outboxemail_claims, 0013_partial_indexes "
                    "(run manage.py migrate)")
    finally:
        run("migrate", "kipekee", verbosity=0)


def test_a_backend_without_a_connection_is_reported_untested(kipekee_settings):
    kipekee_settings(dev={"BACKEND": "django.core.mail.backends.locmem.EmailBackend"})
    rows, passed = check()
    assert passed  # a warning, not a failure
    status, detail = rows["provider dev"]
    assert status == "warn" and detail.startswith("untested: EmailBackend has no connection")


def test_a_backend_can_check_its_own_connection(kipekee_settings):
    backend = "tests.app.backends.TokenBackend"
    kipekee_settings(good={"BACKEND": backend, "OPTIONS": {"token": "good"}},
                     bad={"BACKEND": backend, "OPTIONS": {"token": "expired"}})
    rows, passed = check()
    assert not passed
    assert rows["provider good"][0] == "ok" and rows["provider good"][1].startswith("API token valid")
    assert rows["provider bad"] == ("fail", "configuration: ImproperlyConfigured: API token rejected (401)")
