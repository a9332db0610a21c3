"""The retry policy's wait shape: exponential backoff with equal jitter (AWS architecture
blog, "Exponential Backoff And Jitter": ``c / 2 + uniform(0, c / 2)``, ``c = min(cap, base *
2 ** n)``)."""

from __future__ import annotations

import random
from datetime import timedelta

from kipekee.retry import RetryPolicy


def policy(**overrides: object) -> RetryPolicy:
    fields: dict = {"base_delay": 10.0, "max_delay": 100.0, "max_attempts": 10,
                    "lifetime": timedelta(days=1), **overrides}
    return RetryPolicy(**fields)


def test_equal_jitter_draws_from_half_the_ceiling_to_the_ceiling() -> None:
    random.seed(23)
    for attempt, ceiling in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 100.0), (9, 100.0)]:
        delays = [policy().delay(attempt) for _ in range(400)]
        # Never sooner than half the ceiling: no retry comes at once after a failure.
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempt, min(delays),
                                                                 max(delays))
        # The upper half is used evenly: its lower half as often as its upper one, roughly
        # (400 uniform draws: each half holds 200 ± 40 with overwhelming probability).
        low = sum(d < ceiling * 3 / 4 for d in delays)
        assert 160 < low < 240, (attempt, low)


def test_without_jitter_the_delay_is_the_ceiling() -> None:
    assert [policy(jitter=False).delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 80, 100]


def test_a_providers_hint_wins_even_past_the_cap() -> None:
    assert policy().delay(3, hint=7.5) == 7.5
    assert policy().delay(3, hint=1000) == 1000
