"""Jittered exponential back-off for reconnect loops.

We use *equal jitter* (AWS Architecture Blog, "Exponential Backoff and Jitter"): the n-th delay
(n = 0, 1, …) is drawn uniformly from ``[c/2, c]`` where ``c = min(cap, base * 2**n)``.

Why equal jitter rather than "full" (``[0, c]``) or decorrelated jitter: a listener that lost
its server should never retry in a tight loop (full jitter can draw ~0 again and again), yet
many replicas restarted together must still spread out; equal jitter guarantees at least half
the nominal delay and gives simple, testable per-attempt bounds, which decorrelated jitter
(where each delay depends on the previous draw) does not.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive retries: ``next_delay()`` grows by ``multiplier`` up to ``cap``.

    ``rng`` returns floats uniformly distributed in ``[0, 1)``; inject a deterministic one in
    tests. Not thread-safe (one instance per retry loop).
    """

    __slots__ = ("_attempt", "_rng", "base", "cap", "multiplier")

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 30.0,
        *,
        multiplier: float = 2.0,
        rng: Callable[[], float] | None = None,
    ) -> None:
        if base <= 0:
            raise ValueError(f"back-off base must be > 0, got {base!r}")
        if cap < base:
            raise ValueError(f"back-off cap ({cap!r}) must be >= base ({base!r})")
        if multiplier < 1:
            raise ValueError(f"back-off multiplier must be >= 1, got {multiplier!r}")
        self.base = base
        self.cap = cap
        self.multiplier = multiplier
        # Jitter only needs to decorrelate replicas, not to be unpredictable to an attacker.
        self._rng: Callable[[], float] = rng if rng is not None else random.Random().random  # noqa: S311
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """How many delays were handed out since the last :meth:`reset`."""
        return self._attempt

    def ceiling(self, attempt: int) -> float:
        """The nominal (un-jittered) delay of the ``attempt``-th retry (0-based)."""
        ceiling = self.base
        if self.multiplier == 1:
            return ceiling
        for _ in range(attempt):  # reaches the cap after log(cap/base) steps: no overflow
            ceiling *= self.multiplier
            if ceiling >= self.cap:
                return self.cap
        return ceiling

    def next_delay(self) -> float:
        """Return the next delay in seconds, in ``[ceiling/2, ceiling]``, and advance."""
        ceiling = self.ceiling(self._attempt)
        self._attempt += 1
        half = ceiling / 2.0
        return half + self._rng() * half

    def reset(self) -> None:
        """Start again from ``base`` (call once a connection has proven healthy)."""
        self._attempt = 0

    def __repr__(self) -> str:
        return (
            f"Backoff(base={self.base!r}, cap={self.cap!r}, multiplier={self.multiplier!r},"
            f" attempt={self._attempt})"
        )
