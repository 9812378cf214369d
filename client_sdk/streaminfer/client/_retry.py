"""Retries of unary calls and of stream setup, with backoff and server pushback."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from streaminfer.client._errors import DeadlineExceededError, RpcError, is_tls_handshake_failure

__all__ = ["RETRIED_CODES", "RetryPolicy"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# The server rejects a call with UNAVAILABLE when it is overloaded or draining,
# and with RESOURCE_EXHAUSTED when the API key is over its rate limit. A
# connection that cannot be made also fails with UNAVAILABLE.
RETRIED_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

# Each computed backoff is multiplied by a random factor in [1 - _JITTER, 1),
# so that clients rejected at the same moment do not all retry together.
_JITTER = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait before a call rejected for load is tried again.

    The SDK retries unary calls and stream setup that fail with UNAVAILABLE
    or RESOURCE_EXHAUSTED. The wait before retry ``n`` (1 for the first) is
    ``min(initial_backoff_s * backoff_multiplier ** (n - 1), max_backoff_s)``,
    multiplied by a random factor between 0.5 and 1. When the server sends
    ``grpc-retry-pushback-ms``, that wait is used instead. A negative or
    unparsable value means the server requests no retry. A stream is only
    retried until the server accepts it, never after.
    """

    # Attempts per call, counting the first; 1 turns retries off.
    max_attempts: int = 5
    # Seconds before the first retry, before jitter.
    initial_backoff_s: float = 0.2
    # Upper bound of the computed backoff, in seconds. Server pushback may be longer.
    max_backoff_s: float = 10.0
    # Factor by which the backoff grows after each retry.
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts = {self.max_attempts!r} is invalid: expected 1 (no retries) or more")
        if not (math.isfinite(self.initial_backoff_s) and self.initial_backoff_s > 0):
            raise ValueError(f"initial_backoff_s = {self.initial_backoff_s!r} is invalid: expected seconds > 0")
        if not (math.isfinite(self.max_backoff_s) and self.max_backoff_s >= self.initial_backoff_s):
            raise ValueError(
                f"max_backoff_s = {self.max_backoff_s!r} is invalid: expected seconds >= initial_backoff_s "
                f"({self.initial_backoff_s!r})"
            )
        if not (math.isfinite(self.backoff_multiplier) and self.backoff_multiplier >= 1):
            raise ValueError(f"backoff_multiplier = {self.backoff_multiplier!r} is invalid: expected a number >= 1")

    def backoff_s(self, retry: int) -> float:
        """Return the computed wait before retry number ``retry`` (1 for the first), before jitter."""
        backoff = self.initial_backoff_s
        for _ in range(retry - 1):
            backoff = min(backoff * self.backoff_multiplier, self.max_backoff_s)
        return min(backoff, self.max_backoff_s)


class Retrier:
    """Runs calls under a ``RetryPolicy``; tests replace ``sleep``, ``random`` and ``clock``.

    ``failure_hint(error)`` returns advice for the error a call finally fails
    with, or an empty string. The warning logged at that point ends with it.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random_fraction: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        failure_hint: Callable[[RpcError], str] | None = None,
    ) -> None:
        self.policy = policy
        self._sleep = sleep
        self._random_fraction = random_fraction
        self.clock = clock
        self._failure_hint = failure_hint

    def deadline(self, timeout: float | None) -> float | None:
        """Return the clock time ``timeout`` seconds from now, or None for no deadline."""
        return None if timeout is None else self.clock() + timeout

    async def run(
        self,
        attempt: Callable[[float | None], Awaitable[_T]],
        *,
        name: str,
        deadline: float | None = None,
    ) -> _T:
        """Call ``attempt(timeout)`` until it succeeds or a failure is not retried.

        ``timeout`` is the seconds left until ``deadline``, or None without one,
        so the deadline bounds all attempts and waits together. A retry whose
        wait would end past the deadline is not made. Raises the last attempt's
        error; ``name`` names the call in the log.
        """
        attempt_number = 1
        while True:
            try:
                return await attempt(self._remaining(deadline, name))
            except RpcError as error:
                wait_s = self.wait_s(error, attempt_number)
                if wait_s is None:
                    self._log_failure(name, attempt_number, error, after_deadline=False)
                    raise
                remaining = self._remaining_or_none(deadline)
                if remaining is not None and wait_s >= remaining:
                    logger.info(
                        "%s failed with %s; not retried because the wait of %.3f s ends past the deadline",
                        name, _code_name(error), wait_s,
                    )
                    self._log_failure(name, attempt_number, error, after_deadline=True)
                    raise
                logger.info(
                    "%s failed with %s (attempt %d of %d); retrying in %.3f s%s: %s",
                    name, _code_name(error), attempt_number, self.policy.max_attempts, wait_s,
                    " as the server requested" if error.retry_pushback_s is not None else "", error.details,
                )
                await self._sleep(wait_s)
                attempt_number += 1

    def wait_s(self, error: RpcError, attempt_number: int) -> float | None:
        """Return the seconds to wait before retrying after ``error``, or None for no retry."""
        if attempt_number >= self.policy.max_attempts or error.code not in RETRIED_CODES:
            return None
        if not error.retryable:
            # The server's pushback metadata requested no retry, or the TLS handshake failed.
            return None
        if is_tls_handshake_failure(error.details):
            # The server is up, but the TLS handshake failed: trying again fails the same way.
            return None
        if error.retry_pushback_s is not None:
            return error.retry_pushback_s
        fraction = 1 - _JITTER * self._random_fraction()
        return self.policy.backoff_s(attempt_number) * fraction

    def _log_failure(self, name: str, attempts: int, error: RpcError, *, after_deadline: bool) -> None:
        """Warn of a call's final failure when ``failure_hint`` has advice for it, or after retries.

        A call given up for its deadline was logged at INFO already, so it gets
        a warning only with advice.
        """
        hint = self._failure_hint(error) if self._failure_hint is not None else ""
        if hint:
            logger.warning("%s failed after %d attempt(s): %s; %s", name, attempts, error, hint)
        elif attempts > 1 and not after_deadline:
            logger.warning("%s failed after %d attempts: %s", name, attempts, error)

    def _remaining_or_none(self, deadline: float | None) -> float | None:
        return None if deadline is None else deadline - self.clock()

    def _remaining(self, deadline: float | None, name: str) -> float | None:
        remaining = self._remaining_or_none(deadline)
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError(
                f"{name} was not started: its deadline passed {-remaining:.3f} s ago", grpc.StatusCode.DEADLINE_EXCEEDED
            )
        return remaining


def _code_name(error: RpcError) -> str:
    return error.code.name if error.code is not None else "no status"
