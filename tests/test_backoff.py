"""Back-off: bounds, growth, cap, reset, jitter distribution."""

from __future__ import annotations

import random
import statistics

import pytest

from pgreact.listeners.backoff import Backoff


def test_first_delay_is_between_half_base_and_base() -> None:
    assert Backoff(1.0, 60.0, rng=lambda: 0.0).next_delay() == 0.5
    assert Backoff(1.0, 60.0, rng=lambda: 0.999999).next_delay() == pytest.approx(1.0, abs=1e-5)


def test_nominal_delay_doubles_until_the_cap() -> None:
    backoff = Backoff(0.5, 10.0, rng=lambda: 1.0)  # upper edge: the nominal delay itself
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert backoff.attempt == 8


def test_every_delay_stays_within_equal_jitter_bounds() -> None:
    rng = random.Random(1234)
    backoff = Backoff(0.1, 5.0, rng=rng.random)
    for attempt in range(50):
        ceiling = min(5.0, 0.1 * 2**attempt)
        delay = backoff.next_delay()
        assert ceiling / 2 <= delay <= ceiling, (attempt, delay)


def test_custom_multiplier() -> None:
    backoff = Backoff(1.0, 100.0, multiplier=3.0, rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 3.0, 9.0, 27.0, 81.0]
    flat = Backoff(2.0, 100.0, multiplier=1.0, rng=lambda: 1.0)
    assert {flat.next_delay() for _ in range(10)} == {2.0}


def test_reset_starts_again_from_base() -> None:
    backoff = Backoff(1.0, 60.0, rng=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()
    assert backoff.next_delay() == 32.0
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == 1.0


def test_no_overflow_after_very_many_attempts() -> None:
    backoff = Backoff(0.5, 30.0, rng=lambda: 1.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 30.0
    assert backoff.ceiling(10**9) == 30.0


def test_jitter_is_spread_uniformly_over_the_upper_half() -> None:
    rng = random.Random(42)
    samples = []
    for _ in range(4000):
        backoff = Backoff(2.0, 60.0, rng=rng.random)
        backoff.next_delay()
        samples.append(backoff.next_delay())  # second attempt: nominal 4.0 -> [2.0, 4.0]
    assert min(samples) >= 2.0
    assert max(samples) <= 4.0
    assert statistics.fmean(samples) == pytest.approx(3.0, abs=0.05)
    # Uniform on [2, 4]: each quarter of the interval gets ~25 % of the draws.
    quarters = [0, 0, 0, 0]
    for sample in samples:
        quarters[min(3, int((sample - 2.0) / 0.5))] += 1
    for count in quarters:
        assert 0.21 * len(samples) < count < 0.29 * len(samples), quarters
    # Replicas restarted together do not retry in lock-step.
    assert len({round(s, 6) for s in samples}) > 3900


def test_default_random_source_jitters() -> None:
    delays = {Backoff(1.0, 10.0).next_delay() for _ in range(50)}
    assert len(delays) > 40
    assert all(0.5 <= d <= 1.0 for d in delays)


@pytest.mark.parametrize(
    ("base", "cap", "multiplier"),
    [(0.0, 1.0, 2.0), (-1.0, 1.0, 2.0), (2.0, 1.0, 2.0), (1.0, 2.0, 0.5)],
)
def test_invalid_parameters_are_rejected(base: float, cap: float, multiplier: float) -> None:
    with pytest.raises(ValueError, match="back-off"):
        Backoff(base, cap, multiplier=multiplier)
