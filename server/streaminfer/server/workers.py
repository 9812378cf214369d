"""Several server processes sharing one port.

One Python process runs gRPC, decoding and batching under one GIL, so it
uses about one core. ``streaminfer serve --workers N`` starts N processes
that each load the models and listen on the same port with SO_REUSEPORT.
The kernel spreads connections, not streams, across them: every stream of
one channel goes to the same worker, and each worker batches its own streams.

Metrics: the parent process serves ``/metrics``. Workers write their values
to files in a shared directory (prometheus-client's multiprocess mode, set
up here through ``PROMETHEUS_MULTIPROC_DIR``) and the page adds them up.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

from streaminfer.server import logs
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
    """Return the config each worker runs: a fixed shared port, torch threads split between workers, no metrics port."""
    port = config.port or pick_free_port(config.host)
    # Every worker pins its inference threads to the same inference_cpus.
    inference_cores = len(config.inference_cpus) or (os.cpu_count() or 1) - 1
    torch_threads = config.torch_threads or max(1, inference_cores // workers)
    return dataclasses.replace(config, port=port, reuse_port=True, torch_threads=torch_threads, metrics_port=-1)


class _SharedMetrics:
    """The parent's /metrics page over the workers' metric files."""

    def __init__(self, config: ServerConfig) -> None:
        self._owned_directory: str | None = None
        self._http: Any = None
        if config.metrics_port < 0:
            return
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self._owned_directory = tempfile.mkdtemp(prefix="streaminfer-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._owned_directory
        # Imported only now: prometheus-client picks its mode at import.
        from streaminfer.server import metrics

        self._http, self.port = metrics.start_server(config.metrics_host or config.host, config.metrics_port)
        self.url = f"http://{config.metrics_host or config.host}:{self.port}/metrics"

    @property
    def active(self) -> bool:
        return self._http is not None

    def worker_exited(self, pid: int | None) -> None:
        if self.active and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._owned_directory is not None:
            shutil.rmtree(self._owned_directory, ignore_errors=True)


def _worker_main(
    config: ServerConfig, index: int, ready: Any, log_level: str, switch_interval: float, log_format: str = "text"
) -> None:
    import uvloop

    from streaminfer.server.app import BindError, serve
    from streaminfer.server.config import ConfigError

    logs.configure(log_level, log_format, worker=index)
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


def run_workers(
    config: ServerConfig, workers: int, log_level: str, switch_interval: float, log_format: str = "text"
) -> int:
    """Start ``workers`` server processes on one port and wait for them; return the exit status."""
    try:
        shared_metrics = _SharedMetrics(config)
    except OSError as error:
        print(f"streaminfer: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        return _run_workers(config, workers, log_level, switch_interval, shared_metrics, log_format)
    finally:
        shared_metrics.close()


def _run_workers(
    config: ServerConfig,
    workers: int,
    log_level: str,
    switch_interval: float,
    shared_metrics: _SharedMetrics,
    log_format: str,
) -> int:
    config = worker_config(config, workers)
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    processes: list[BaseProcess] = [
        context.Process(
            target=_worker_main,
            args=(config, index, ready, log_level, switch_interval, log_format),
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
        if shared_metrics.active:
            print(f"streaminfer metrics on {shared_metrics.url}", flush=True)

    for process in processes:
        process.join()
        shared_metrics.worker_exited(process.pid)
    codes = [process.exitcode for process in processes]
    logger.info("workers exited with codes %s", codes)
    return 0 if all(code == 0 for code in codes) else 1
