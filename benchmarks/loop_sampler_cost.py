"""Benchmark: what the loop sampler behind admission.max_busy_fraction costs a busy Python thread.

The server's sampler thread wakes up to 200 times a second (fewer while it
waits for the GIL), reads the event loop thread's system call from /proc and
takes the GIL to count it. This runs a pure-Python loop for ``--seconds``
with the sampler off, then on and sampling that same thread, for
``--rounds`` alternating rounds, under the server's switch interval, and
prints the loop iterations of each run and the median ratio. A pure-Python loop is the sampler's worst case: the event loop
of a real server lets go of the GIL while it waits for network events.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from streaminfer.server.cli import DEFAULT_SWITCH_INTERVAL_S
from streaminfer.server.load import LoopSampler, loop_sampling_unavailable, open_thread_syscall


def loop_iterations(seconds: float) -> int:
    """Run dictionary stores for ``seconds`` and return how many rounds of 100 were done."""
    end = time.perf_counter() + seconds
    table: dict[int, int] = {}
    rounds = 0
    while time.perf_counter() < end:
        for key in range(100):
            table[key] = key * 2
        rounds += 1
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating off/on pairs (default: 5)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default: 3)")
    args = parser.parse_args()
    sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL_S)
    reason = loop_sampling_unavailable()
    if reason is not None:
        print(f"cannot sample this thread: {reason}", file=sys.stderr)
        return 1

    ratios = []
    for round_number in range(1, args.rounds + 1):
        without = loop_iterations(args.seconds)
        sampler = LoopSampler(open_thread_syscall())
        sampler.start()
        with_sampler = loop_iterations(args.seconds)
        samples, busy = sampler.take()
        sampler.stop()
        ratios.append(with_sampler / without)
        print(
            f"round {round_number}/{args.rounds}: {without} iterations without the sampler, {with_sampler} with it "
            f"({samples / args.seconds:.0f} samples/s, {busy / max(samples, 1):.2f} busy), "
            f"ratio {with_sampler / without:.3f}",
            flush=True,
        )
    print(f"median ratio with / without the sampler: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
