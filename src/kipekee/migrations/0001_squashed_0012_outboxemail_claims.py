"""Kipekee's tables as migrations 0001 to 0012 left them, in one migration.

Made by ``squashmigrations kipekee 0012``, then each model's later changes folded into its
``CreateModel`` by Django's optimizer (the columns keep the order an upgraded install has).
``replaces`` keeps every install that has applied 0012 up to date with nothing to do:
Django counts this migration as applied when all it replaces are, also now that their files
are gone. An install stopped between two of them first migrates with commit 285e970,
the last with the twelve files (README, "Upgrading"; until then kipekee.E030 stops
``migrate``).

What the squash left out, as it only changed rows an older install had: 0008's
canonicalisation of suppression addresses (a fresh install has none to fix).
"""

import sys
from typing import Any

import django.db.models.deletion
import django.utils.timezone
from django.db import DatabaseError, migrations, models, transaction

#: The admin's search is ``UPPER(column::text) LIKE UPPER('%term%')``; on PostgreSQL these
#: trigram indexes serve it, where a search would otherwise read the whole outbox.
TRIGRAM_INDEXES = {
    "kipekee_subject_trgm": 'UPPER("subject"::text)',
    "kipekee_to_trgm": 'UPPER("to"::text)',
}


def create_trigram_indexes(apps: Any, schema_editor: Any) -> None:
    """Only ever run on a new, empty outbox (an install with rows has applied all this
    replaces), so the indexes are built in the migration's transaction, not CONCURRENTLY.
    Where pg_trgm cannot be created (no privilege) the migration says so and goes on:
    search works, just slower."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    table = schema_editor.quote_name(apps.get_model("kipekee", "OutboxEmail")._meta.db_table)
    indexes = [f"IF NOT EXISTS {name} ON {table} USING gin (({expression}) gin_trgm_ops)"
               for name, expression in TRIGRAM_INDEXES.items()]
    try:
        # A savepoint, so that a refusal leaves the migration's transaction usable.
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DatabaseError as exc:
        later = "; ".join(f"CREATE INDEX CONCURRENTLY {index}" for index in indexes)
        sys.stderr.write(
            f"\n  kipekee: pg_trgm unavailable ({exc}); the admin's search will scan the "
            f"outbox. Run CREATE EXTENSION pg_trgm as a superuser, then: {later}\n")
        return
    with connection.cursor() as cursor:
        for index in indexes:
            cursor.execute(f"CREATE INDEX {index}")


class Migration(migrations.Migration):

    replaces = [('kipekee', '0001_initial'), ('kipekee', '0002_engine_heartbeat'), ('kipekee', '0003_engines'), ('kipekee', '0004_content'), ('kipekee', '0005_mailtrap'), ('kipekee', '0006_operations'), ('kipekee', '0007_provider_message_per_recipient'), ('kipekee', '0008_canonical_suppressions'), ('kipekee', '0009_lanes'), ('kipekee', '0010_mailing_lists'), ('kipekee', '0011_shared_limits'), ('kipekee', '0012_outboxemail_claims')]

    initial = True

    dependencies = [
        ('contenttypes', '0002_remove_content_type_name'),
    ]

    operations = [
        migrations.CreateModel(
            name='OutboxEmail',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('status', models.CharField(choices=[('queued', 'queued'), ('sending', 'sending'), ('sent', 'sent'), ('deferred', 'deferred'), ('failed', 'failed'), ('suppressed', 'suppressed'), ('cancelled', 'cancelled')], default='queued', max_length=16)),
                ('mode', models.CharField(choices=[('now', 'now (in the request, quick retries)'), ('hybrid', 'hybrid (in the request once, then an engine)'), ('queue', 'queue (an engine)')], default='hybrid', max_length=8)),
                ('idempotency_key', models.CharField(blank=True, max_length=255, null=True, unique=True)),
                ('message_id', models.CharField(db_index=True, max_length=255)),
                ('from_email', models.TextField()),
                ('to', models.JSONField(default=list)),
                ('cc', models.JSONField(blank=True, default=list)),
                ('bcc', models.JSONField(blank=True, default=list)),
                ('reply_to', models.JSONField(blank=True, default=list)),
                ('subject', models.TextField(blank=True)),
                ('body', models.TextField(blank=True)),
                ('content_subtype', models.CharField(default='plain', max_length=32)),
                ('alternatives', models.JSONField(blank=True, default=list)),
                ('headers', models.JSONField(blank=True, default=dict)),
                ('template', models.CharField(blank=True, max_length=255)),
                ('metadata', models.JSONField(blank=True, default=dict)),
                ('provider', models.CharField(blank=True, max_length=100)),
                ('created_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('due_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('lease_until', models.DateTimeField(blank=True, null=True)),
                ('attempts', models.PositiveIntegerField(default=0)),
                ('sent_at', models.DateTimeField(blank=True, null=True)),
                ('sent_by', models.CharField(blank=True, max_length=100)),
                ('error_kind', models.CharField(blank=True, choices=[('transient', 'transient (retry)'), ('permanent', 'permanent (do not retry)'), ('configuration', 'configuration (fix the provider)')], max_length=16)),
                ('last_error', models.TextField(blank=True)),
                ('refused', models.JSONField(blank=True, default=dict)),
                ('claimed_by', models.CharField(blank=True, max_length=100)),
                ('content_type', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='contenttypes.contenttype')),
                ('event', models.CharField(blank=True, max_length=100)),
                ('object_id', models.CharField(blank=True, max_length=255)),
                ('delivery', models.JSONField(blank=True, default=dict)),
                ('lane', models.CharField(default='transactional', max_length=32)),
                ('mailing_list', models.CharField(blank=True, max_length=100)),
                ('claims', models.PositiveIntegerField(default=0)),
            ],
            options={
                'verbose_name': 'outbox email',
                'ordering': ['-id'],
                'indexes': [models.Index(condition=models.Q(('status', 'sending')), fields=['lease_until'], name='kipekee_sending_lease'), models.Index(fields=['status', 'created_at'], name='kipekee_status_created'), models.Index(fields=['content_type', 'object_id'], name='kipekee_target'), models.Index(fields=['sent_by', 'id'], name='kipekee_sent_by'), models.Index(condition=models.Q(('provider', ''), _negated=True), fields=['provider'], name='kipekee_pinned_provider'), models.Index(condition=models.Q(('status__in', ['queued', 'deferred'])), fields=['lane', 'due_at', 'id'], name='kipekee_waiting_lane_due')],
            },
        ),
        migrations.CreateModel(
            name='Attachment',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('filename', models.CharField(blank=True, max_length=255)),
                ('mimetype', models.CharField(max_length=255)),
                ('content', models.BinaryField()),
                ('content_id', models.CharField(blank=True, max_length=255)),
                ('email', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='attachments', to='kipekee.outboxemail')),
            ],
            options={
                'ordering': ['id'],
            },
        ),
        migrations.CreateModel(
            name='Attempt',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('number', models.PositiveIntegerField()),
                ('provider', models.CharField(blank=True, max_length=100)),
                ('started_at', models.DateTimeField()),
                ('finished_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('outcome', models.CharField(max_length=16)),
                ('code', models.IntegerField(blank=True, null=True)),
                ('error', models.TextField(blank=True)),
                ('refused', models.JSONField(blank=True, default=dict)),
                ('email', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='attempt_log', to='kipekee.outboxemail')),
            ],
            options={
                'ordering': ['email_id', 'number', 'id'],
                'indexes': [models.Index(fields=['finished_at'], name='kipekee_attempt_finished')],
            },
        ),
        migrations.CreateModel(
            name='EngineHeartbeat',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=200, unique=True)),
                ('kind', models.CharField(max_length=16)),
                ('host', models.CharField(max_length=255)),
                ('pid', models.PositiveIntegerField()),
                ('started_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('beat_at', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('sent', models.PositiveBigIntegerField(default=0)),
                ('deferred', models.PositiveBigIntegerField(default=0)),
                ('failed', models.PositiveBigIntegerField(default=0)),
                ('stopped_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'ordering': ['-beat_at'],
            },
        ),
        migrations.CreateModel(
            name='Suppression',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('address', models.CharField(max_length=254, unique=True)),
                ('reason', models.CharField(choices=[('hard_bounce', 'hard bounce'), ('spam_complaint', 'spam complaint'), ('unsubscribe', 'unsubscribed'), ('manual', 'added by a person')], default='manual', max_length=32)),
                ('source', models.CharField(blank=True, help_text="Where it came from: a provider's webhook, the admin…", max_length=100)),
                ('detail', models.TextField(blank=True, help_text="The provider's reply or a note.")),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['-created_at'],
            },
        ),
        migrations.CreateModel(
            name='ProviderMessage',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('provider', models.CharField(max_length=100)),
                ('message_id', models.CharField(db_index=True, max_length=255)),
                ('recipient', models.CharField(blank=True, max_length=254)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('email', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='provider_messages', to='kipekee.outboxemail')),
            ],
            options={
                'ordering': ['id'],
                'constraints': [models.UniqueConstraint(fields=('email', 'message_id', 'recipient'), name='kipekee_provider_message_once')],
            },
        ),
        migrations.CreateModel(
            name='WebhookEvent',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('provider', models.CharField(max_length=50)),
                ('event_id', models.CharField(max_length=255)),
                ('event', models.CharField(max_length=32)),
                ('recipient', models.CharField(blank=True, max_length=254)),
                ('message_id', models.CharField(blank=True, max_length=255)),
                ('detail', models.TextField(blank=True)),
                ('occurred_at', models.DateTimeField(blank=True, null=True)),
                ('received_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('email', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='webhook_events', to='kipekee.outboxemail')),
            ],
            options={
                'ordering': ['-received_at'],
                'constraints': [models.UniqueConstraint(fields=('provider', 'event_id'), name='kipekee_webhook_event_once')],
            },
        ),
        migrations.CreateModel(
            name='MailingList',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('key', models.SlugField(help_text='The name code sends with: mailing_list="newsletter". Fixed once created.', max_length=100, unique=True)),
                ('name', models.CharField(help_text='Shown to people on the unsubscribe page.', max_length=200)),
                ('description', models.TextField(blank=True, help_text='Shown on the unsubscribe page.')),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['name'],
            },
        ),
        migrations.CreateModel(
            name='Unsubscription',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('address', models.CharField(max_length=254)),
                ('source', models.CharField(choices=[('one-click', 'one-click (RFC 8058 POST from the mailbox provider)'), ('page', 'the unsubscribe page'), ('mailto', 'an email to the unsubscribe address'), ('admin', 'the admin'), ('code', 'application code')], default='code', max_length=16)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('mailing_list', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='unsubscriptions', to='kipekee.mailinglist', to_field='key')),
            ],
            options={
                'ordering': ['-created_at'],
                'constraints': [models.UniqueConstraint(fields=('mailing_list', 'address'), name='kipekee_unsubscribed_once')],
            },
        ),
        migrations.CreateModel(
            name='LimiterKey',
            fields=[
                ('key', models.CharField(max_length=200, primary_key=True, serialize=False)),
                ('takes', models.PositiveBigIntegerField(default=0)),
                ('wanted_until', models.FloatField(default=0.0)),
                ('wanted_by', models.CharField(blank=True, max_length=100)),
            ],
        ),
        migrations.CreateModel(
            name='LimiterHit',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('key', models.CharField(max_length=200)),
                ('at', models.FloatField()),
            ],
            options={
                'indexes': [models.Index(fields=['key', 'at'], name='kipekee_limiterhit_key_at')],
            },
        ),
        migrations.CreateModel(
            name='ProviderPermit',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('key', models.CharField(max_length=200)),
                ('holder', models.CharField(max_length=64)),
                ('lease_until', models.FloatField()),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('key', 'holder'), name='kipekee_permit_once')],
            },
        ),
        # Once OutboxEmail has all its columns. Reversed, nothing: dropping the table
        # drops its indexes.
        migrations.RunPython(create_trigram_indexes, migrations.RunPython.noop),
    ]
