"""Run the reliability suite and print one table: scenario, load, faults injected,
delivered, lost, duplicated, verdict — on SQLite and on PostgreSQL.

    .venvs/django52/bin/python bench/reliability.py

It runs ``pytest -m reliability`` twice (SQLite, then PostgreSQL at 127.0.0.1:5432 where
the worker-process scenarios run), each writing its rows to a JSON file
(tests/reliability_report.py), and merges them. ``--no-postgres`` skips the second run;
``--examples N`` gives the Hypothesis state machine N runs (default 100 here, 12 in
``make test``). Exits non-zero if any scenario failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reliability_report import Row, format_table  # noqa: E402


def run(database: str, examples: int) -> tuple[list[Row], int, float, str]:
    with tempfile.TemporaryDirectory(prefix="kipekee-reliability-") as tmp:
        report = Path(tmp, "rows.json")
        env = {**os.environ, "KIPEKEE_RELIABILITY_JSON": str(report),
               "KIPEKEE_STATE_MACHINE_EXAMPLES": str(examples), "KIPEKEE_RELIABILITY_ALL_DBS": "1"}
        if database == "postgres":
            env["KIPEKEE_TEST_DATABASE"] = "postgres"
        else:
            env.pop("KIPEKEE_TEST_DATABASE", None)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "reliability", "-q",
                               "-p", "no:cacheprovider"], cwd=ROOT, env=env, text=True,
                              capture_output=True)
        seconds = time.monotonic() - started
        rows = [Row(**r) for r in json.loads(report.read_text())] if report.exists() else []
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode != 0:
            print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return rows, proc.returncode, seconds, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-postgres", action="store_true", help="SQLite run only")
    parser.add_argument("--examples", type=int, default=100,
                        help="Hypothesis state machine runs (default %(default)s)")
    args = parser.parse_args()
    rows: list[Row] = []
    status = 0
    for database in ("sqlite",) + (() if args.no_postgres else ("postgres",)):
        got, code, seconds, summary = run(database, args.examples)
        print(f"{database}: {summary} ({seconds:.0f} s wall)", flush=True)
        rows += got
        status |= code
    print()
    for line in format_table(rows):
        print(line)
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
