"""The random-fault soak of issue 17, N = 1,000 (tests/soak.py says what it injects and
what it checks). Runs on SQLite and, in the PostgreSQL pass, on PostgreSQL; bounded to
about a minute of faults and a minute and a half to drain.

Replay a failure with the seed it prints: ``KIPEKEE_SOAK_SEED=<seed> pytest
tests/test_soak.py``. ``KIPEKEE_SOAK_N`` changes N (bench/soak.py runs 10,000).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from . import soak
from .conftest import smtp_provider

pytestmark = [pytest.mark.soak, pytest.mark.django_db(transaction=True)]


def test_soak_keeps_every_promise(smtp_server, server_ssl_context, smtp_ca_file, settings):
    n = int(os.environ.get("KIPEKEE_SOAK_N", "1000"))
    config = soak.Config(n=n, seed=soak.seed_from_env(),
                         chaos_seconds=float(os.environ.get("KIPEKEE_SOAK_CHAOS_SECONDS")
                                             or max(30.0, n / 40)),
                         settle_seconds=float(os.environ.get("KIPEKEE_SOAK_SETTLE_SECONDS")
                                             or max(90.0, n / 20)))
    for name, key in (("KIPEKEE_SOAK_KILL_EVERY", "kill_every"),
                      ("KIPEKEE_SOAK_DB_FAULT_EVERY", "db_fault_every")):
        if os.environ.get(name):  # "lo,hi" seconds; "0,0" switches them off
            setattr(config, key, tuple(float(x) for x in os.environ[name].split(",")))
    print(f"\nsoak seed {config.seed} (replay: KIPEKEE_SOAK_SEED={config.seed})")
    primary = smtp_server(tls="starttls", ssl_context=server_ssl_context)
    backup = smtp_server()
    settings.KIPEKEE = {
        **soak.SETTINGS,
        "PROVIDERS": {
            "primary": smtp_provider(primary, timeout=soak.TIMEOUT, use_tls=True,
                                     ca_file=str(smtp_ca_file),
                                     final_reply_timeout=soak.FINAL_REPLY_TIMEOUT),
            "backup": smtp_provider(backup, timeout=soak.TIMEOUT,
                                    final_reply_timeout=soak.FINAL_REPLY_TIMEOUT),
        },
    }
    figures = soak.run(config, primary, backup, settings.KIPEKEE)
    report = "\n".join(figures.lines())
    print(report)
    if os.environ.get("KIPEKEE_SOAK_JSON"):  # bench/soak.py
        Path(os.environ["KIPEKEE_SOAK_JSON"]).write_text(json.dumps(figures.as_dict()))
    assert not figures.violations, f"seed {config.seed}:\n{report}"
    # The soak must have hurt: every kind of fault, kills and database errors happened.
    assert figures.receiver_raises, report
    assert figures.kills or not config.kill_every[0], report
    assert figures.db_faults or not config.db_fault_every[0], report
    assert figures.poison_failed, report
