"""The retry policy's wait shape: exponential backoff with full jitter (AWS architecture
blog, "Exponential Backoff And Jitter": ``uniform(0, min(cap, base * 2 ** n))``)."""

from __future__ import annotations

import random
from datetime import timedelta

from kipekee.retry import RetryPolicy


def policy(**overrides: object) -> RetryPolicy:
    fields: dict = {"base_delay": 10.0, "max_delay": 100.0, "max_attempts": 10,
                    "lifetime": timedelta(days=1), **overrides}
    return RetryPolicy(**fields)


def test_full_jitter_draws_from_zero_to_the_exponential_ceiling() -> None:
    random.seed(23)
    for attempt, ceiling in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 100.0), (9, 100.0)]:
        delays = [policy().delay(attempt) for _ in range(400)]
        assert all(0.0 <= d <= ceiling for d in delays), (attempt, min(delays), max(delays))
        # The whole range is used: the lower quarter as often as the upper one, roughly
        # (400 uniform draws: each quarter holds 100 ± 30 with overwhelming probability).
        low = sum(d < ceiling / 4 for d in delays)
        high = sum(d > ceiling * 3 / 4 for d in delays)
        assert 60 < low < 140 and 60 < high < 140, (attempt, low, high)


def test_without_jitter_the_delay_is_the_ceiling() -> None:
    assert [policy(jitter=False).delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 80, 100]


def test_a_providers_hint_wins_even_past_the_cap() -> None:
    assert policy().delay(3, hint=7.5) == 7.5
    assert policy().delay(3, hint=1000) == 1000
