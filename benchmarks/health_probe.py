"""Call a gRPC server's health check at a fixed interval, as a load balancer's probe would, and print each round trip.

It runs as a process of its own so that a busy load generator's event loop
does not add to the times it reports. Each check prints one line: the round
trip in milliseconds (time.perf_counter around a blocking call), then the
serving status name, or "failed" and the gRPC status code name. It stops on
SIGTERM, on SIGINT or after ``--max-s`` seconds.

    python benchmarks/health_probe.py 127.0.0.1:50051 --interval-s 0.1
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(target: str, interval_s: float, timeout_s: float, max_s: float) -> None:
    """Print one line per health check of ``target`` until ``max_s`` seconds have passed."""
    stop_at = time.monotonic() + max_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
                outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as error:
                outcome = f"failed {error.code().name}"
            print(f"{(time.perf_counter() - started) * 1000.0:.3f} {outcome}", flush=True)
            time.sleep(interval_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="host:port of the server, for example 127.0.0.1:50051")
    parser.add_argument("--interval-s", type=float, default=0.1, help="seconds between checks (default: 0.1)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each check, seconds (default: 5)")
    parser.add_argument("--max-s", type=float, default=600.0, help="seconds after which the probe stops (default: 600)")
    args = parser.parse_args()
    # SIGTERM stops it as Ctrl-C does; every line is already flushed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        probe(args.target, args.interval_s, args.timeout_s, args.max_s)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
