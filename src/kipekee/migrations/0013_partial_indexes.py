"""Three outbox indexes made partial, one dropped: fewer index entries for every queued row.

The idempotency key is unique only where set, the target index covers rows with a
target, the provider filter's index rows that were sent; the content type's own index
went (kipekee_target starts with the same column). Most rows have no key, no target and
are not sent yet when written, so their INSERT no longer writes those entries.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('contenttypes', '0002_remove_content_type_name'),
        ('kipekee', '0001_squashed_0012_outboxemail_claims'),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name='outboxemail',
            name='kipekee_target',
        ),
        migrations.RemoveIndex(
            model_name='outboxemail',
            name='kipekee_sent_by',
        ),
        migrations.AlterField(
            model_name='outboxemail',
            name='content_type',
            field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='contenttypes.contenttype'),
        ),
        migrations.AlterField(
            model_name='outboxemail',
            name='idempotency_key',
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        migrations.AddIndex(
            model_name='outboxemail',
            index=models.Index(condition=models.Q(('content_type__isnull', False)), fields=['content_type', 'object_id'], name='kipekee_target'),
        ),
        migrations.AddIndex(
            model_name='outboxemail',
            index=models.Index(condition=models.Q(('sent_by', ''), _negated=True), fields=['sent_by', 'id'], name='kipekee_sent_by'),
        ),
        migrations.AddConstraint(
            model_name='outboxemail',
            constraint=models.UniqueConstraint(condition=models.Q(('idempotency_key__isnull', False)), fields=('idempotency_key',), name='kipekee_idempotency_key'),
        ),
    ]
