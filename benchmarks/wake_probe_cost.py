"""Benchmark: what the wake probe behind admission.max_busy_fraction costs a busy Python thread.

The server's probe thread wakes about 200 times a second and takes the GIL
each time. This runs a pure-Python loop for ``--seconds`` with the probe off,
then on, for ``--rounds`` alternating rounds, under the server's switch
interval, and prints the loop iterations of each run and the median ratio.
A pure-Python loop is the probe's worst case: the event loop and the decode
threads of a real server release the GIL more often.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from streaminfer.server.cli import DEFAULT_SWITCH_INTERVAL_S
from streaminfer.server.load import WakeProbe


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

    ratios = []
    for round_number in range(1, args.rounds + 1):
        without = loop_iterations(args.seconds)
        probe = WakeProbe()
        probe.start()
        with_probe = loop_iterations(args.seconds)
        wakes = len(probe.take())
        probe.stop()
        ratios.append(with_probe / without)
        print(
            f"round {round_number}/{args.rounds}: {without} iterations without the probe, {with_probe} with it "
            f"({wakes / args.seconds:.0f} wakes/s), ratio {with_probe / without:.3f}",
            flush=True,
        )
    print(f"median ratio with / without the probe: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
