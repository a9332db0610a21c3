"""The demo project's own test suite (demo/shop/tests/), run as a project that uses Kipekee
runs its tests: pytest in the demo's folder, with its settings and pytest.ini, and
Kipekee's pytest plugin found through its ``pytest11`` entry point (not named anywhere
in the demo). Its tests use the testing kit's fixtures and assertions, from pytest
functions and from Django's ``TestCase``."""

from __future__ import annotations

import subprocess
import sys

from .demo_server import ROOT, child_env


def test_the_demo_tests_its_mail_with_the_testing_kit() -> None:
    env = child_env()
    env.pop("KIPEKEE_DEMO_DATABASE", None)  # the demo's tests: SQLite, a database of their own
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "shop/tests"],
        cwd=ROOT / "demo", env=env, capture_output=True, text=True, timeout=300,
        check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Every test ran (none skipped or deselected): five pytest functions, two TestCase tests.
    assert "7 passed" in output.splitlines()[-1], output
