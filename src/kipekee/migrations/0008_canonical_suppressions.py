"""Suppression addresses in their canonical spelling (kipekee.addresses.canonical).

Rows written before were only lower-cased, so ``user@bücher.example`` on the list did not
stop ``user@xn--bcher-kva.example``. Each row gets its canonical address; where several
rows are spellings of one mailbox, the first entry (the oldest) stays and the others go.
Not reversible in content (the old spellings are gone); reversing it changes nothing.
"""

from typing import Any

from django.db import migrations

from kipekee.addresses import canonical


def canonicalise(apps: Any, schema_editor: Any) -> None:
    Suppression = apps.get_model("kipekee", "Suppression")
    rows = Suppression.objects.using(schema_editor.connection.alias)
    kept: dict[str, int] = {}
    duplicates: list[int] = []
    changed: list[tuple[int, str]] = []
    for pk, address in rows.order_by("created_at", "pk").values_list("pk", "address").iterator():
        key = canonical(address)
        if key in kept:
            duplicates.append(pk)
            continue
        kept[key] = pk
        if key != address:
            changed.append((pk, key))
    # Duplicates first: a canonical address is its own canonical, so once they are gone
    # no row still holds an address another row is about to take.
    for start in range(0, len(duplicates), 500):
        rows.filter(pk__in=duplicates[start:start + 500]).delete()
    for pk, key in changed:
        rows.filter(pk=pk).update(address=key)


class Migration(migrations.Migration):
    dependencies = [("kipekee", "0007_provider_message_per_recipient")]

    operations = [migrations.RunPython(canonicalise, migrations.RunPython.noop, elidable=True)]
