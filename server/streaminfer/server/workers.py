"""Several server processes sharing one port.

One Python process runs gRPC, decoding and batching under one GIL, so it
uses about one core. ``streaminfer serve --workers N`` starts N processes
that each load the models and listen on the same port with SO_REUSEPORT.
The kernel spreads connections, not streams, across them: every stream of
one channel goes to the same worker, and each worker batches its own streams.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from typing import Any

from streaminfer.server.config import ServerConfig

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600


def pick_free_port(host: str) -> int:
    """Return a port that is free on ``host`` now, for workers to share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host.strip("[]"), 0))
        return probe.getsockname()[1]


def worker_config(config: ServerConfig, workers: int) -> ServerConfig:
    """Return the config each worker runs: a fixed shared port, and torch threads split between workers."""
    port = config.port or pick_free_port(config.host)
    torch_threads = config.torch_threads or max(1, ((os.cpu_count() or 1) - 1) // workers)
    return dataclasses.replace(config, port=port, reuse_port=True, torch_threads=torch_threads)


def _worker_main(config: ServerConfig, index: int, ready: Any, log_level: str, switch_interval: float) -> None:
    import uvloop

    from streaminfer.server.app import BindError, serve
    from streaminfer.server.config import ConfigError

    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s"
    )
    sys.setswitchinterval(switch_interval)
    try:
        # Ctrl-C reaches the whole process group; the parent forwards it as
        # SIGTERM, so a worker that also took SIGINT would count two signals.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = uvloop.run(serve(config, on_ready=lambda port: ready.put(index), signals=(signal.SIGTERM,)))
    except (BindError, ConfigError) as error:
        print(f"streaminfer worker-{index}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code)


def run_workers(config: ServerConfig, workers: int, log_level: str, switch_interval: float) -> int:
    """Start ``workers`` server processes on one port and wait for them; return the exit status."""
    config = worker_config(config, workers)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    processes: list[BaseProcess] = [
        context.Process(
            target=_worker_main,
            args=(config, index, ready, log_level, switch_interval),
            name=f"streaminfer-worker-{index}",
        )
        for index in range(workers)
    ]
    for process in processes:
        process.start()

    signals_seen = 0

    def forward(signum: int, frame: object) -> None:
        # The first signal drains the workers; a second one stops them at once.
        nonlocal signals_seen
        signals_seen += 1
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    started = 0
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while started < workers:
        try:
            ready.get(timeout=1.0)
            started += 1
            continue
        except queue.Empty:
            pass
        failed = [process.name for process in processes if not process.is_alive()]
        if failed or time.monotonic() > deadline:
            reason = f"{', '.join(failed)} exited" if failed else f"not all workers started within {STARTUP_TIMEOUT_S} s"
            print(f"streaminfer: {reason}; stopping the others", file=sys.stderr, flush=True)
            forward(signal.SIGTERM, None)
            break
    if started == workers:
        print(f"streaminfer listening on {config.host}:{config.port} ({workers} workers)", flush=True)

    for process in processes:
        process.join()
    codes = [process.exitcode for process in processes]
    logger.info("workers exited with codes %s", codes)
    return 0 if all(code == 0 for code in codes) else 1
