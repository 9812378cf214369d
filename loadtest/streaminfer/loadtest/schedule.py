"""Load shapes planned before the run: open-loop arrivals and concurrency ramps."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Ramp", "parse_ramp", "poisson_arrivals"]


def poisson_arrivals(rate_per_s: float, duration_s: float, seed: int, max_arrivals: int) -> list[float]:
    """Return the start offsets, in seconds from the run's start, of streams arriving as a Poisson process.

    Gaps between arrivals are exponential with mean ``1 / rate_per_s``. The
    plan depends only on the arguments, so one seed gives one schedule. It
    stops before ``duration_s`` or after ``max_arrivals`` arrivals.
    """
    if not rate_per_s > 0:
        raise ValueError(f"arrival rate {rate_per_s!r} is invalid: expected streams per second > 0")
    if max_arrivals < 0:
        raise ValueError(f"max_arrivals = {max_arrivals!r} is invalid: expected 0 or more")
    rng = np.random.default_rng(seed)
    arrivals: list[float] = []
    now = 0.0
    while len(arrivals) < max_arrivals:
        now += float(rng.exponential(1.0 / rate_per_s))
        if now >= duration_s:
            break
        arrivals.append(now)
    return arrivals


@dataclasses.dataclass(frozen=True, slots=True)
class Ramp:
    """Concurrency steps: ``start`` streams, ``step`` more every ``every_s`` seconds, up to ``maximum``."""

    start: int
    step: int
    every_s: float
    maximum: int

    def levels(self) -> list[int]:
        """Return the concurrency of each step, in order."""
        levels = []
        level = self.start
        while level <= self.maximum:
            levels.append(level)
            level += self.step
        return levels


def parse_ramp(text: str) -> Ramp:
    """Parse ``START:STEP:EVERY_S:MAX``, for example ``10:10:5:200``."""
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"ramp {text!r} is invalid: expected START:STEP:EVERY_S:MAX, for example 10:10:5:200")
    try:
        start, step, maximum = int(parts[0]), int(parts[1]), int(parts[3])
        every_s = float(parts[2])
    except ValueError:
        raise ValueError(f"ramp {text!r} is invalid: START, STEP and MAX are whole streams, EVERY_S seconds") from None
    if start < 1 or step < 1 or maximum < start or not every_s > 0:
        raise ValueError(f"ramp {text!r} is invalid: expected START >= 1, STEP >= 1, MAX >= START and EVERY_S > 0")
    return Ramp(start, step, every_s, maximum)
