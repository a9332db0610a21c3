"""The reliability suite's figures: one row per scenario, printed as a table after the run.

A test marked ``reliability`` takes the ``scenario`` fixture and calls
``scenario.record(name, load=..., faults=..., delivered=..., lost=..., duplicated=...)``
once it has counted what the SMTP server received. The verdict is the test's own outcome
(``pass`` or ``FAIL``): the counts are what the assertions checked. With
``KIPEKEE_RELIABILITY_JSON=<file>`` the rows are also written there (bench/reliability.py
merges the SQLite and PostgreSQL runs into one table).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pytest

COLUMNS = ("scenario", "db", "load", "faults injected", "delivered", "lost", "duplicated",
           "verdict")


@dataclass
class Row:
    scenario: str
    db: str
    load: str
    faults: str
    delivered: int | str
    lost: int | str
    duplicated: int | str
    verdict: str = "FAIL"

    def cells(self) -> tuple[str, ...]:
        return (self.scenario, self.db, self.load, self.faults, str(self.delivered),
                str(self.lost), str(self.duplicated), self.verdict)


@dataclass
class Scenario:
    """What one test recorded."""

    nodeid: str
    rows: list[Row] = field(default_factory=list)

    def record(self, name: str, *, load: str, faults: str, delivered: int | str = "-",
               lost: int | str = "-", duplicated: int | str = "-") -> None:
        from django.db import connection

        self.rows.append(Row(name, connection.vendor, load, faults, delivered, lost, duplicated))


_STASH = pytest.StashKey[dict[str, Scenario]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Scenarios marked ``reliability(db_agnostic=True)`` (hostile input, TLS, secrets…)
    exercise nothing PostgreSQL does differently: the PostgreSQL pass of ``make test``
    deselects them to stay fast. ``KIPEKEE_RELIABILITY_ALL_DBS=1`` keeps them."""
    from django.conf import settings

    if (not settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
            or os.environ.get("KIPEKEE_RELIABILITY_ALL_DBS")):
        return
    agnostic = [item for item in items
                if any(m.kwargs.get("db_agnostic") for m in item.iter_markers("reliability"))]
    if agnostic:
        config.hook.pytest_deselected(items=agnostic)
        items[:] = [item for item in items if item not in agnostic]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STASH] = {}


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    current = Scenario(request.node.nodeid)
    request.config.stash[_STASH][request.node.nodeid] = current
    yield current


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    current = item.config.stash[_STASH].get(item.nodeid)
    if current is not None and report.when in ("setup", "call", "teardown"):
        if not current.rows and report.failed:
            current.rows.append(Row(item.name, "-", "-", "-", "-", "-", "-"))
        for row in current.rows:
            if report.failed:
                row.verdict = "FAIL"
            elif report.when == "call" and report.passed:
                row.verdict = "pass"
    return report


def format_table(rows: list[Row]) -> list[str]:
    cells = [COLUMNS, *(row.cells() for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = [row for s in terminalreporter.config.stash[_STASH].values() for row in s.rows]
    if not rows:
        return
    terminalreporter.write_sep("=", "reliability suite")
    for line in format_table(rows):
        terminalreporter.write_line(line)
    path = os.environ.get("KIPEKEE_RELIABILITY_JSON")
    if path:
        with open(path, "w") as out:
            json.dump([asdict(r) for r in rows], out, indent=1)
