"""Kipekee's squashed migration, 0001_squashed_0012_outboxemail_claims, against real databases:
installs that applied the twelve migrations it replaces take it as applied and have
nothing to do; one stopped between two of them is told so instead of being left with
old tables; the models and the migration agree on every Django the suite runs.

The install's history is what its ``django_migrations`` table says, so each test writes
Kipekee's rows there as such an install has them, on the schema the test database has
(the same tables, columns and indexes the twelve built: compared with pg_dump and
sqlite_master when they were squashed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

from .test_commands import check

pytestmark = pytest.mark.django_db(transaction=True)

SQUASHED = "0001_squashed_0012_outboxemail_claims"
#: The names as an install that applied them recorded them (not read from ``replaces``).
TWELVE = ["0001_initial", "0002_engine_heartbeat", "0003_engines", "0004_content",
          "0005_mailtrap", "0006_operations", "0007_provider_message_per_recipient",
          "0008_canonical_suppressions", "0009_lanes", "0010_mailing_lists",
          "0011_shared_limits", "0012_outboxemail_claims"]
#: Kipekee's migrations after the squash (the test database has them applied).
LATER = ["0013_partial_indexes"]


@contextmanager
def history(names: list[str]) -> Iterator[None]:
    """Kipekee's rows in django_migrations are exactly ``names`` inside; as before after."""
    rows = MigrationRecorder(connection).migration_qs.filter(app="kipekee")
    before = list(rows.values_list("name", flat=True))
    rows.delete()
    for name in names:
        MigrationRecorder(connection).record_applied("kipekee", name)
    try:
        yield
    finally:
        rows.delete()
        for name in before:
            MigrationRecorder(connection).record_applied("kipekee", name)


def command(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, no_color=True)
    return out.getvalue()


def test_an_install_that_applied_the_twelve_has_nothing_to_migrate():
    with history(TWELVE + LATER):
        loader = MigrationLoader(connection)
        assert ("kipekee", SQUASHED) in loader.applied_migrations
        assert [key for key in loader.graph.leaf_nodes() if key[0] == "kipekee"] == [
            ("kipekee", LATER[-1])]
        assert loader.graph.forwards_plan(("kipekee", LATER[0]))[-2:] == [
            ("kipekee", SQUASHED), ("kipekee", LATER[0])]
        # Applied, its own row not written yet.
        assert f"[-] {SQUASHED} (12 squashed migrations)" in command("showmigrations", "kipekee")
        call_command("migrate", check_unapplied=True, verbosity=0)  # exits 1 if any is due
        assert "No migrations to apply." in command("migrate", "kipekee")
        assert f"[X] {SQUASHED}" in command("showmigrations", "kipekee")
        rows, _ = check("--no-providers")
        assert rows["migrations"] == ("ok", "kipekee's migrations are applied")


def test_a_fresh_install_records_the_twelve_too():
    """So that an install made from the squash and one upgraded to it look alike to any
    later migration."""
    recorded = set(MigrationRecorder(connection).applied_migrations())
    assert {("kipekee", name) for name in [*TWELVE, SQUASHED]} <= recorded


def test_an_install_stopped_between_two_of_the_twelve_is_told_to_upgrade_through_them():
    """Django can use neither the squash (partly applied) nor the twelve (gone): without
    kipekee.E030, ``migrate`` applied nothing and kipekee_check said all was applied."""
    with history(TWELVE[:10]):
        errors = [m for m in run_checks(databases=["default"]) if m.id == "kipekee.E030"]
        assert len(errors) == 1
        assert ("stopped part-way through the migrations "
                f"{SQUASHED} replaces: 0011_shared_limits, 0012_outboxemail_claims not "
                "applied") in errors[0].msg
        with pytest.raises(SystemCheckError, match="kipekee.E030"):
            call_command("migrate", verbosity=0, skip_checks=False)  # as manage.py runs it
        rows, passed = check("--no-providers")
        assert not passed
        status, detail = rows["migrations"]
        assert status == "fail" and "Install the last Kipekee that has them" in detail
    assert not [m for m in run_checks(databases=["default"]) if m.id == "kipekee.E030"]


def test_the_models_need_no_new_migration():
    """makemigrations --check on the Django of this pass (5.2, 6.0 and 6.1 in make test)."""
    assert "No changes detected" in command("makemigrations", "kipekee", "--check", "--dry-run")


@pytest.mark.postgres
def test_the_migration_builds_the_trigram_indexes_for_the_admin_search():
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'kipekee_outboxemail' "
                       "AND indexdef LIKE '%%gin_trgm_ops%%' ORDER BY indexname")
        assert [name for (name,) in cursor.fetchall()] == ["kipekee_subject_trgm",
                                                           "kipekee_to_trgm"]
