"""The ``streaminfer`` command."""

from __future__ import annotations

import argparse
import os
import sys

from streaminfer.server import affinity, logs
from streaminfer.server.config import ConfigError, default_config_text, load_config

# Seconds; STREAMINFER_SWITCH_INTERVAL_S overrides it.
DEFAULT_SWITCH_INTERVAL_S = 0.0005


def _serve(options: argparse.Namespace) -> int:
    overrides = {
        "host": options.host,
        "port": options.port,
        "decode_threads": options.decode_threads,
        "torch_threads": options.torch_threads,
        "inference_cpus": options.inference_cpus,
        "grpc_thread_nice": options.grpc_thread_nice,
        "drain_grace_s": options.grace,
        "metrics_port": options.metrics_port,
        "log_chunks": options.log_chunks or None,
    }
    try:
        config = load_config(options.config, overrides)
        if config.inference_cpus:
            # Checked here too, so that workers do not each fail on it.
            affinity.split_cpus(config.inference_cpus)
    except (ConfigError, OSError) as error:
        print(f"streaminfer: {error}", file=sys.stderr)
        return 2

    # Inference and decode threads take the GIL back from the busy event
    # loop several times per batch. At Python's default 5 ms switch interval
    # each hand-off can stall them for that long.
    switch_interval = float(os.environ.get("STREAMINFER_SWITCH_INTERVAL_S", DEFAULT_SWITCH_INTERVAL_S))
    if options.workers < 1:
        print(f"streaminfer: --workers {options.workers} is invalid: expected 1 or more", file=sys.stderr)
        return 2
    if options.workers > 1:
        from streaminfer.server.workers import run_workers

        return run_workers(config, options.workers, options.log_level, switch_interval, options.log_format)

    import uvloop

    from streaminfer.server.app import BindError, serve

    sys.setswitchinterval(switch_interval)
    try:
        return uvloop.run(serve(config))
    except (BindError, ConfigError) as error:
        print(f"streaminfer: {error}", file=sys.stderr)
        return 2


def _diagnose(options: argparse.Namespace) -> int:
    from streaminfer.server.diagnose import run

    return run(options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streaminfer", description="Realtime multi-modal inference server over gRPC.")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level (default: INFO)"
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="log lines on stderr as text, or as one JSON object per line with time, level, logger, message and "
        "stream_id (default: text)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="start the server",
        description="Start the server. Flags override the config file; the config file overrides the built-in default.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: the built-in models, see `streaminfer config`)")
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1; 0.0.0.0 or [::] for all)")
    serve.add_argument("--port", type=int, help="TCP port; 0 picks a free one and prints it (default: 50051)")
    serve.add_argument(
        "--decode-threads",
        type=int,
        help="threads decoding and preprocessing chunks; video streams use them all, audio and text streams "
        "share the first (default: 2)",
    )
    serve.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads per inference worker; 0 means cores minus one, or one per CPU of --inference-cpus "
        "(default: 0)",
    )
    serve.add_argument(
        "--inference-cpus",
        metavar="CPUS",
        help="CPUs for the inference threads alone, as taskset -c writes them (\"1\", \"2-3\"), or \"last:N\" "
        "for the last N CPUs this process may use; every other thread runs on the remaining CPUs, and "
        "--torch-threads 0 then means one per such CPU; Linux only (default: \"\", no pinning)",
    )
    serve.add_argument(
        "--grpc-thread-nice",
        type=int,
        metavar="N",
        help="run gRPC's I/O threads N nice levels below the event loop, so their wake-ups do not push it off its "
        "CPU; 0 leaves them at its priority, at most 19; Linux only (default: 10)",
    )
    serve.add_argument(
        "--log-chunks",
        action="store_true",
        help="log a line for every chunk read, acked or failed; for debugging one stream, not for load "
        "(default: off, or server.log_chunks)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="HTTP port of the Prometheus /metrics page; 0 picks a free one, -1 turns metrics off (default: 9464)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port; each loads the models and batches its own connections (default: 1)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        help="on SIGTERM or SIGINT, seconds open streams may run on before the server ends them with their final "
        "answers and exits 0; a second signal stops at once (default: server.drain_grace_s, 20)",
    )
    serve.set_defaults(handler=_serve)

    show = commands.add_parser("config", help="print the built-in default config (TOML)")
    show.set_defaults(handler=lambda options: print(default_config_text(), end="") or 0)

    from streaminfer.server.diagnose import DESCRIPTION, add_arguments

    diagnose = commands.add_parser(
        "diagnose", help="find where a running server's latency goes, from its /metrics page", description=DESCRIPTION
    )
    add_arguments(diagnose)
    diagnose.set_defaults(handler=_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logs.configure(options.log_level, options.log_format)
    return options.handler(options)


if __name__ == "__main__":
    sys.exit(main())
