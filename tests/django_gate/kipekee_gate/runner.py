"""Django's test runner, with every test's outcome written to a JSON file.

``runtests.py`` builds the runner named by ``TEST_RUNNER``; this one is Django's
``DiscoverRunner`` plus a result class that records each test id with ``passed``,
``failed``, ``error``, ``skipped`` (or ``expected failure`` / ``unexpected success``),
so that ``run.py`` can compare the outcome with the list of deliberate differences.
A test with a failing subtest counts as failed.
"""

import json
import os
import unittest
from typing import ClassVar

from django.test.runner import DiscoverRunner


def _test_id(test):
    # A subtest (``test (params)``) belongs to its test.
    test = getattr(test, "test_case", test)
    return test.id()


class RecordingResult(unittest.TextTestResult):
    # Every test of the run, across the result objects runtests may create.
    outcomes: ClassVar[dict] = {}

    def _record(self, test, outcome, detail=""):
        test_id = _test_id(test)
        previous = self.outcomes.get(test_id)
        # The worst outcome wins: a test with a failed subtest failed.
        if previous is None or previous[0] in ("passed", "skipped"):
            self.outcomes[test_id] = (outcome, detail)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "expected failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected success")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._record(test, "failed" if failed else "error",
                         f"{subtest}: " + self._exc_info_to_string(err, test))


class GateRunner(DiscoverRunner):
    def get_resultclass(self):
        return RecordingResult

    def run_suite(self, suite, **kwargs):
        result = super().run_suite(suite, **kwargs)
        with open(os.environ["KIPEKEE_GATE_RESULTS"], "w") as out:
            json.dump(RecordingResult.outcomes, out, indent=1, sort_keys=True)
        return result
