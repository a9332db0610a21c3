from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('kipekee', '0011_shared_limits'),
    ]

    operations = [
        migrations.AddField(
            model_name='outboxemail',
            name='claims',
            field=models.PositiveIntegerField(default=0),
        ),
    ]
