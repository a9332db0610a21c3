"""Per-provider limits: parsing and the sliding window (the concurrency bound is the
connection pool's: tests/test_connections.py)."""

from __future__ import annotations

import pytest

from kipekee import conf
from kipekee.exceptions import ConfigurationError
from kipekee.limits import Rate, SlidingWindow


@pytest.mark.parametrize("text, count, per", [("150/10s", 150, 10), ("15/s", 15, 1),
                                              ("500/d", 500, 86400), ("2/1.5m", 2, 90)])
def test_rate_parse(text, count, per):
    assert Rate.parse(text) == Rate(count=count, per=per)


@pytest.mark.parametrize("text", ["150", "0/s", "x/10s", "10/10y", 150])
def test_rate_parse_rejects(text):
    with pytest.raises(ConfigurationError):
        Rate.parse(text)


def test_window_lets_count_through_then_makes_the_next_wait_a_window():
    window = SlidingWindow(Rate(count=3, per=60))
    assert [window.reserve() for _ in range(3)] == [0, 0, 0]
    fourth = window.reserve()
    assert 59 < fourth <= 60  # the 4th waits until the 1st leaves the window
    fifth = window.reserve()
    assert 59 < fifth <= 60 and fifth >= fourth


def test_limits_in_provider_settings(settings):
    settings.KIPEKEE = {"ENGINE": None, "PROVIDERS": {"m": {"BACKEND": "kipekee.backends.smtp.EmailBackend",
                                            "OPTIONS": {"host": "h"},
                                            "LIMITS": {"RATE": "150/10s", "CONCURRENCY": 10}}}}
    p = conf.get().provider("m")
    assert (p.rate, p.concurrency) == ("150/10s", 10)
    for bad in ({"RATE": "lots"}, {"CONCURRENCY": 0}, {"BURST": 1}):
        with pytest.raises(ConfigurationError):
            conf.parse({"PROVIDERS": {"m": {"BACKEND": "x", "LIMITS": bad}}})


def test_window_counts_a_call_until_a_window_after_it_finished():
    # The provider counts a request when it receives it; a call that took a while must
    # not let the next window's first call reach it early.
    import time

    window = SlidingWindow(Rate(count=1, per=60))
    first = window.acquire()

    time.sleep(0.05)
    window.finished(first)
    wait = window.reserve()
    # From when the first call finished (about 60 s from now), not when it started (59.95).
    assert 59.99 < wait <= 60
