"""The random-fault soak of issue 17 at N = 10,000 (tests/soak.py says what it injects
and what it checks), on PostgreSQL and, with ``--sqlite``, on SQLite too; prints its
figures and exits non-zero if a promise was broken.

    .venvs/django52/bin/python bench/soak.py                 # N = 10,000 on PostgreSQL
    .venvs/django52/bin/python bench/soak.py --seed 42 --n 2000 --sqlite

It runs ``pytest tests/test_soak.py`` with ``KIPEKEE_SOAK_N`` (faults for N / 40 s, at
least 30 s; then the outbox must drain), so the bench and ``make test`` run the same
code. PostgreSQL: the server at 127.0.0.1:5432 (trust auth), a test database of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(database: str, n: int, seed: int) -> tuple[dict | None, int, float, str]:
    with tempfile.TemporaryDirectory(prefix="kipekee-soak-") as tmp:
        report = Path(tmp, "figures.json")
        env = {**os.environ, "KIPEKEE_SOAK_N": str(n), "KIPEKEE_SOAK_SEED": str(seed),
               "KIPEKEE_SOAK_JSON": str(report)}
        if database == "postgres":
            env["KIPEKEE_TEST_DATABASE"] = "postgres"
        else:
            env.pop("KIPEKEE_TEST_DATABASE", None)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_soak.py", "-q", "-s",
                               "-p", "no:cacheprovider"], cwd=ROOT, env=env, text=True,
                              capture_output=True, check=False)
        seconds = time.monotonic() - started
        figures = json.loads(report.read_text()) if report.exists() else None
        return figures, proc.returncode, seconds, proc.stdout + proc.stderr


ROWS = [
    ("mails (recipients)", lambda f: f"{f['mails']:,} ({f['recipients']:,})"),
    ("outbox rows (follow-up rows)", lambda f: f"{f['rows']:,} ({f['follow_ups']})"),
    ("fault windows on the two servers", lambda f: f"{sum(f['faults'].values()):,}"),
    ("  by kind", lambda f: ", ".join(f"{k} {v}" for k, v in sorted(f["faults"].items()))),
    ("outages of both servers at once", lambda f: f"{f['outages']}"),
    ("worker processes killed -9", lambda f: f"{f['kills']}"),
    ("database faults", lambda f: f"{f['db_faults']}"),
    ("signal receivers that raised", lambda f: f"{f['receiver_raises']:,}"),
    ("recipients delivered", lambda f: f"{f['delivered']:,}"),
    ("recipients recorded failed (poison)",
     lambda f: f"{f['failed_recipients']} ({f['poison_failed']})"),
    ("lost", lambda f: f"{f['lost']}"),
    ("extra copies: after a kill / answer never received / unexplained",
     lambda f: (f"{f['extra_after_crash']} / {f['extra_after_late_answer']} / "
                f"{f['extra_unexplained']}")),
    ("attempts whose outcome was never recorded", lambda f: f"{f['unrecorded_attempts']}"),
    ("attempts per mail: mean / max (MAX_ATTEMPTS 12)",
     lambda f: f"{f['attempts_per_mail']:.2f} / {f['max_attempts']}"),
    ("claims per mail: mean / max (claims that were not attempts: all / max per mail)",
     lambda f: (f"{f['claims_per_mail']:.2f} / {f['max_claims']} "
                f"({f['spare_claims']:,} / {f['max_spare_claims']}); closest to its "
                f"bound: {f['closest_claims'][0]} of {f['closest_claims'][1]}")),
    ("rows failed, by reason",
     lambda f: ", ".join(f"{k} {v}" for k, v in f["failed_reasons"].items()) or "-"),
    ("wall time (workers up after)",
     lambda f: f"{f['wall_seconds']:.0f} s ({f['startup_seconds']:.0f} s)"),
    ("invariants", lambda f: "held" if not f["violations"] else f"{len(f['violations'])} broken"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="mails (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's seed")
    parser.add_argument("--sqlite", action="store_true", help="SQLite as well")
    parser.add_argument("--no-postgres", action="store_true", help="not on PostgreSQL")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    databases = ([] if args.no_postgres else ["postgres"]) + (["sqlite"] if args.sqlite else [])
    results, status = {}, 0
    for database in databases:
        print(f"{database}: N = {args.n:,}, seed {seed} ...", flush=True)
        figures, code, seconds, output = run(database, args.n, seed)
        print(f"{database}: {'passed' if code == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
        if code != 0:
            print(output[-8000:], file=sys.stderr)
            status = 1
        if figures is not None:
            results[database] = figures
    if not results:
        return 1
    print(f"\nseed {seed} (replay: bench/soak.py --seed {seed} --n {args.n})\n")
    names = list(results)
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, cell in ROWS:
        print(f"| {label} | " + " | ".join(cell(results[d]) for d in names) + " |")
    for database, figures in results.items():
        for violation in figures["violations"][:20]:
            print(f"{database}: VIOLATION {violation}")
    return status


if __name__ == "__main__":
    sys.exit(main())
