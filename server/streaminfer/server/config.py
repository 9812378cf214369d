"""Typed, validated server configuration: a TOML file plus command-line flags.

Every value is checked when the config is built, and an error quotes the bad
value and the accepted range, so a typo fails at start-up and not under load.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

# "noop" returns an empty result per chunk, for measuring the server without a model.
MODEL_KINDS = ("silero_vad", "minilm_embedding", "hog_people", "haar_faces", "torchscript", "torch_export", "noop")
MODALITIES = ("audio", "video", "text")
DTYPES = ("float32", "float16", "int64", "int32", "uint8")


class ConfigError(ValueError):
    """An invalid configuration value."""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_batch_size: int = 64
    # Counted from the arrival of the first item of the batch, milliseconds.
    max_queue_delay_ms: float = 5.0
    # Items waiting for this model, across all streams. A chunk that finds
    # the queue full fails at once with OVERFLOW, instead of memory growing.
    max_queue_size: int = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    kind: str
    modality: str = ""
    # Archive for user models (torchscript, torch_export).
    path: str = ""
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "float32"
    batching: BatchingConfig = BatchingConfig()
    # "auto" picks cuda:0 when torch.cuda.is_available(), else cpu.
    device: str = "auto"
    instances: int = 1
    description: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_audio_chunk_bytes: int = 256 * 1024
    max_frame_bytes: int = 8 * 1024 * 1024
    max_frame_dimension: int = 4096
    max_text_chunk_bytes: int = 64 * 1024
    # Chunks a stream may have sent without an ack or error yet. The reader
    # stops reading the stream at this count, so HTTP/2 flow control keeps
    # the rest on the client.
    max_chunks_in_flight: int = 64
    # Seconds a stream's full in-flight window may go without any chunk
    # acked or failed before the server flushes the stream's buffered input. Without
    # it, chunks that all wait for more input (words of one long sentence, a
    # user model's long window) would wait for input the window keeps out.
    stalled_window_flush_s: float = 1.0
    # Default chunk latency budget of a stream, from the moment the server
    # reads a chunk to its answer; a chunk that can no longer meet it is
    # dropped before inference (reason DEADLINE). 0 turns budgets off for
    # streams that do not set their own.
    chunk_latency_budget_ms: float = 5000.0
    # Video frames of one stream that may wait for their models; past this,
    # the oldest waiting frame is dropped (keep-latest, reason OVERFLOW).
    max_pending_frames: int = 2
    # A stream that sends nothing for this long is ended; 0 means never.
    idle_timeout_s: float = 300.0
    # A stream is ended this long after it started; 0 means never.
    max_stream_duration_s: float = 0.0
    # A response write that the client does not take for this long (it
    # stopped reading) ends the stream with RESOURCE_EXHAUSTED.
    write_timeout_s: float = 10.0
    # A batch running longer than this marks its model unhealthy.
    model_hang_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class AdmissionConfig:
    # Concurrent streams per server process; more get UNAVAILABLE.
    max_streams: int = 1000
    # New streams get UNAVAILABLE while the projected queue wait (event loop
    # lag, decode and model queues) is above this; 0 turns the check off.
    max_queue_wait_ms: float = 250.0
    # New streams get UNAVAILABLE when one more stream would raise the busy
    # fraction over this: the share of time the event loop is busy instead
    # of waiting for network events, projected from its cost per open
    # stream and the streams arriving. Linux only; 0 turns the check off.
    max_busy_fraction: float = 0.8
    # Sent in grpc-retry-pushback-ms with every rejection for load.
    retry_pushback_ms: int = 1000
    # Learn a stream cap from overloads: when the projected wait passes
    # max_queue_wait_ms, cap new streams at the most the server carried
    # calmly, and raise the cap by 5 % after each calm 10 s at it.
    learn_max_streams: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimitConfig:
    # Per accepted API key (or per peer address without one); 0 turns a limit off.
    streams_per_second: float = 0.0
    # Streams a key may open at once above the rate; 0 means the rate, at least 1.
    stream_burst: int = 0
    chunks_per_second: float = 0.0
    chunk_burst: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class AuthConfig:
    # Accepted API keys, sent by clients in the x-api-key metadata. Empty
    # (with no file) turns authentication off.
    api_keys: tuple[str, ...] = ()
    # A file with one key per line; lines starting with # are skipped.
    api_keys_file: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TracingConfig:
    # Tracing itself is turned on by the OpenTelemetry environment variables
    # (see streaminfer.server.tracing). In a traced stream, this fraction of
    # the chunks gets a span per stage.
    chunk_sample_ratio: float = 0.01


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    decode_threads: int = 2
    # Intra-op threads per inference worker; 0 means one per core minus one
    # for the event loop, at least 1, or one per CPU of inference_cpus.
    torch_threads: int = 0
    # CPUs for the inference threads alone. Every other thread of the process
    # runs on the remaining CPUs. Empty: no pinning.
    inference_cpus: tuple[int, ...] = ()
    # Nice levels by which gRPC's I/O threads run below the event loop, so
    # their wake-ups do not push it off its CPU; 0 leaves them. Linux only.
    grpc_thread_nice: int = 10
    models: tuple[ModelConfig, ...] = ()
    limits: LimitsConfig = LimitsConfig()
    # Let other processes listen on the same port (SO_REUSEPORT). Set for
    # workers of one server; off otherwise, so that a second server started
    # on a busy port fails instead of taking half its connections.
    reuse_port: bool = False
    admission: AdmissionConfig = AdmissionConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()
    auth: AuthConfig = AuthConfig()
    tracing: TracingConfig = TracingConfig()
    # PEM files. With a certificate and key the port speaks TLS only; with a
    # client CA as well, clients must present a certificate it signed.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # On SIGTERM: seconds streams may run on before the server ends them.
    drain_grace_s: float = 20.0
    # Prometheus /metrics over HTTP: 0 picks a free port, -1 turns it off.
    # An empty host means the gRPC host.
    metrics_port: int = 9464
    metrics_host: str = ""
    # A log line per chunk read, acked or failed.
    log_chunks: bool = False

    def resolved_torch_threads(self) -> int:
        if self.torch_threads > 0:
            return self.torch_threads
        if self.inference_cpus:
            return len(self.inference_cpus)
        return max(1, (os.cpu_count() or 1) - 1)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{where}.{key} = {value!r} is invalid: expected an integer >= 1",
    )
    return int(value)


def _positive_seconds(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        f"{where}.{key} = {value!r} is invalid: expected seconds > 0",
    )
    return float(value)


def _non_negative(table: Mapping[str, Any], key: str, default: float, where: str, unit: str) -> float:
    value = table.get(key, default)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
        f"{where}.{key} = {value!r} is invalid: expected {unit} >= 0 (0 turns it off)",
    )
    return float(value)


def _fraction(table: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1,
        f"{where}.{key} = {value!r} is invalid: expected a fraction from 0 to 1 (0 turns it off)",
    )
    return float(value)


def _non_negative_int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        f"{where}.{key} = {value!r} is invalid: expected an integer >= 0",
    )
    return int(value)


def _boolean(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = table.get(key, default)
    _require(isinstance(value, bool), f"{where}.{key} = {value!r} is invalid: expected true or false")
    return bool(value)


# The largest CPU number a CPU list may name, so that a typo such as
# "0-99999999" is an error instead of a huge set.
MAX_CPU_NUMBER = 8191
# One part of a CPU list: a CPU number or a range, with spaces only around it
# ("0 1" is an error, not CPU 1 or CPU 01).
_CPU_RANGE = re.compile(r"\s*([0-9]+)(?:\s*-\s*([0-9]+))?\s*")


def _cpu_list(table: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    """Read CPU numbers written as taskset -c takes them ("1", "0-3,8"), as one integer or as an array of integers.

    "last:N" names the last N of the CPUs this process may use, for machines
    where those numbers are not known in advance (a Kubernetes pod with
    exclusive CPUs gets the ones the kubelet assigns).
    """
    value = table.get(key, "")
    problem = (
        f"{where}.{key} = {value!r} is invalid: expected a string of CPU numbers such as \"1\" or \"2-3,6\", "
        f"\"last:N\", an integer or an array of integers (0 to {MAX_CPU_NUMBER}), or \"\" for no pinning"
    )
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list):
        _require(
            all(isinstance(cpu, int) and not isinstance(cpu, bool) and 0 <= cpu <= MAX_CPU_NUMBER for cpu in value),
            problem,
        )
        return tuple(sorted(set(value)))
    _require(isinstance(value, str), problem)
    if value.strip().startswith("last:"):
        return _last_cpus(value.strip(), f"{where}.{key}", problem)
    cpus: set[int] = set()
    for part in value.split(","):
        if not part.strip() and len(value.split(",")) == 1:
            continue  # "" or spaces: no pinning
        match = _CPU_RANGE.fullmatch(part)
        _require(match is not None, problem)
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        _require(low <= high <= MAX_CPU_NUMBER, problem)
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def _last_cpus(value: str, name: str, problem: str) -> tuple[int, ...]:
    """Return the last N CPUs this process may use, for a value "last:N"."""
    count = value.removeprefix("last:").strip()
    _require(re.fullmatch(r"[0-9]+", count) is not None and int(count) >= 1, problem)
    _require(
        hasattr(os, "sched_getaffinity"), f"{name} = {value!r} needs Linux (thread CPU affinity); leave it empty here"
    )
    allowed = sorted(os.sched_getaffinity(0))
    _require(
        int(count) < len(allowed),
        f"{name} = {value!r} takes every CPU this process may use ({','.join(map(str, allowed))}); leave at least "
        "one CPU for the event loop, or leave inference_cpus empty",
    )
    return tuple(allowed[-int(count):])


def _string(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    _require(isinstance(value, str), f"{where}.{key} = {value!r} is invalid: expected a string")
    return str(value)


def _batching_from(table: Mapping[str, Any], where: str) -> BatchingConfig:
    default = BatchingConfig()
    delay = table.get("max_queue_delay_ms", default.max_queue_delay_ms)
    _require(
        isinstance(delay, (int, float)) and not isinstance(delay, bool) and 0 <= delay <= 10_000,
        f"{where}.max_queue_delay_ms = {delay!r} is invalid: expected milliseconds from 0 to 10000",
    )
    return BatchingConfig(
        max_batch_size=_positive_int(table, "max_batch_size", default.max_batch_size, where),
        max_queue_delay_ms=float(delay),
        max_queue_size=_positive_int(table, "max_queue_size", default.max_queue_size, where),
    )


def model_from_table(table: Mapping[str, Any], index: int) -> ModelConfig:
    where = f"models[{index}]"
    name = table.get("name")
    _require(isinstance(name, str) and name != "", f"{where}.name = {name!r} is invalid: expected a non-empty string")
    where = f"model {name!r}"
    kind = table.get("kind", name)
    _require(kind in MODEL_KINDS, f"{where}: kind = {kind!r} is invalid: expected one of {', '.join(MODEL_KINDS)}")
    modality = table.get("modality", "")
    _require(
        modality == "" or modality in MODALITIES,
        f"{where}: modality = {modality!r} is invalid: expected one of {', '.join(MODALITIES)}",
    )
    path = table.get("path", "")
    shape = table.get("input_shape", [])
    dtype = table.get("input_dtype", "float32")
    if kind in ("torchscript", "torch_export"):
        _require(isinstance(path, str) and path != "", f"{where}: path is missing: user models need the archive path")
        _require(
            isinstance(shape, list) and all(isinstance(d, int) and (d > 0 or d == -1) for d in shape),
            f"{where}: input_shape = {shape!r} is invalid: expected a list of sizes >= 1, or -1 for a free size",
        )
        _require(dtype in DTYPES, f"{where}: input_dtype = {dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    device = table.get("device", "auto")
    _require(
        isinstance(device, str) and (device in ("auto", "cpu") or device.startswith("cuda")),
        f"{where}: device = {device!r} is invalid: expected auto, cpu, cuda or cuda:N",
    )
    return ModelConfig(
        name=name,
        kind=kind,
        modality=modality,
        path=path,
        input_shape=tuple(shape),
        input_dtype=dtype,
        batching=_batching_from(table.get("batching", {}), f"{where}: batching"),
        device=device,
        instances=_positive_int(table, "instances", 1, where),
        description=str(table.get("description", "")),
    )


_KNOWN_KEYS = {
    "": ("server", "limits", "admission", "rate_limits", "auth", "tracing", "models"),
    "server": (
        "host",
        "port",
        "decode_threads",
        "torch_threads",
        "inference_cpus",
        "grpc_thread_nice",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "drain_grace_s",
        "metrics_port",
        "metrics_host",
        "log_chunks",
    ),
    "admission": ("max_streams", "max_queue_wait_ms", "max_busy_fraction", "retry_pushback_ms", "learn_max_streams"),
    "rate_limits": ("streams_per_second", "stream_burst", "chunks_per_second", "chunk_burst"),
    "auth": ("api_keys", "api_keys_file"),
    "tracing": ("chunk_sample_ratio",),
    "limits": (
        "max_audio_chunk_bytes",
        "max_frame_bytes",
        "max_frame_dimension",
        "max_text_chunk_bytes",
        "max_chunks_in_flight",
        "stalled_window_flush_s",
        "chunk_latency_budget_ms",
        "max_pending_frames",
        "idle_timeout_s",
        "max_stream_duration_s",
        "write_timeout_s",
        "model_hang_timeout_s",
    ),
    "models": (
        "name",
        "kind",
        "modality",
        "path",
        "input_shape",
        "input_dtype",
        "batching",
        "device",
        "instances",
        "description",
    ),
    "batching": ("max_batch_size", "max_queue_delay_ms", "max_queue_size"),
}


def _check_keys(table: Any, section: str, where: str) -> None:
    """Reject a table that is not a table, or that has a key this version does not know (likely a typo)."""
    _require(isinstance(table, Mapping), f"{where or 'config'} is invalid: expected a table, got {table!r}")
    known = _KNOWN_KEYS[section]
    unknown = sorted(set(table) - set(known))
    _require(
        not unknown,
        f"{where or 'config'}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(known)}",
    )


def config_from_mapping(data: Mapping[str, Any]) -> ServerConfig:
    _check_keys(data, "", "")
    server = data.get("server", {})
    _check_keys(server, "server", "[server]")
    limits_table = data.get("limits", {})
    _check_keys(limits_table, "limits", "[limits]")
    tables = {}
    for section in ("admission", "rate_limits", "auth", "tracing"):
        tables[section] = data.get(section, {})
        _check_keys(tables[section], section, f"[{section}]")
    models_list = data.get("models", [])
    _require(
        isinstance(models_list, list) and len(models_list) > 0,
        "models is empty: add at least one [[models]] table; `streaminfer config` prints the default with the built-ins",
    )
    for index, table in enumerate(models_list):
        _check_keys(table, "models", f"models[{index}]")
        _check_keys(table.get("batching", {}), "batching", f"models[{index}].batching")
    default_limits = LimitsConfig()
    limits = LimitsConfig(
        max_audio_chunk_bytes=_positive_int(limits_table, "max_audio_chunk_bytes", default_limits.max_audio_chunk_bytes, "limits"),
        max_frame_bytes=_positive_int(limits_table, "max_frame_bytes", default_limits.max_frame_bytes, "limits"),
        max_frame_dimension=_positive_int(limits_table, "max_frame_dimension", default_limits.max_frame_dimension, "limits"),
        max_text_chunk_bytes=_positive_int(limits_table, "max_text_chunk_bytes", default_limits.max_text_chunk_bytes, "limits"),
        max_chunks_in_flight=_positive_int(limits_table, "max_chunks_in_flight", default_limits.max_chunks_in_flight, "limits"),
        stalled_window_flush_s=_positive_seconds(
            limits_table, "stalled_window_flush_s", default_limits.stalled_window_flush_s, "limits"
        ),
        chunk_latency_budget_ms=_non_negative(
            limits_table, "chunk_latency_budget_ms", default_limits.chunk_latency_budget_ms, "limits", "milliseconds"
        ),
        max_pending_frames=_positive_int(limits_table, "max_pending_frames", default_limits.max_pending_frames, "limits"),
        idle_timeout_s=_non_negative(limits_table, "idle_timeout_s", default_limits.idle_timeout_s, "limits", "seconds"),
        max_stream_duration_s=_non_negative(
            limits_table, "max_stream_duration_s", default_limits.max_stream_duration_s, "limits", "seconds"
        ),
        write_timeout_s=_positive_seconds(limits_table, "write_timeout_s", default_limits.write_timeout_s, "limits"),
        model_hang_timeout_s=_positive_seconds(
            limits_table, "model_hang_timeout_s", default_limits.model_hang_timeout_s, "limits"
        ),
    )
    admission_table = tables["admission"]
    default_admission = AdmissionConfig()
    admission = AdmissionConfig(
        max_streams=_positive_int(admission_table, "max_streams", default_admission.max_streams, "admission"),
        max_queue_wait_ms=_non_negative(
            admission_table, "max_queue_wait_ms", default_admission.max_queue_wait_ms, "admission", "milliseconds"
        ),
        max_busy_fraction=_fraction(admission_table, "max_busy_fraction", default_admission.max_busy_fraction, "admission"),
        retry_pushback_ms=_non_negative_int(
            admission_table, "retry_pushback_ms", default_admission.retry_pushback_ms, "admission"
        ),
        learn_max_streams=_boolean(admission_table, "learn_max_streams", default_admission.learn_max_streams, "admission"),
    )
    rate_table = tables["rate_limits"]
    rate_limits = RateLimitConfig(
        streams_per_second=_non_negative(rate_table, "streams_per_second", 0.0, "rate_limits", "streams per second"),
        stream_burst=_non_negative_int(rate_table, "stream_burst", 0, "rate_limits"),
        chunks_per_second=_non_negative(rate_table, "chunks_per_second", 0.0, "rate_limits", "chunks per second"),
        chunk_burst=_non_negative_int(rate_table, "chunk_burst", 0, "rate_limits"),
    )
    auth_table = tables["auth"]
    api_keys = auth_table.get("api_keys", [])
    _require(
        isinstance(api_keys, list) and all(isinstance(key, str) and key.strip() for key in api_keys),
        f"auth.api_keys = {api_keys!r} is invalid: expected a list of non-empty strings",
    )
    auth = AuthConfig(api_keys=tuple(key.strip() for key in api_keys), api_keys_file=_string(auth_table, "api_keys_file", "auth"))
    ratio = tables["tracing"].get("chunk_sample_ratio", TracingConfig().chunk_sample_ratio)
    _require(
        isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1,
        f"tracing.chunk_sample_ratio = {ratio!r} is invalid: expected a fraction from 0 to 1",
    )
    tracing = TracingConfig(chunk_sample_ratio=float(ratio))
    models = tuple(model_from_table(table, i) for i, table in enumerate(models_list))
    names = [model.name for model in models]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    _require(not duplicates, f"models: duplicate name(s) {duplicates}: each model needs a unique name")
    port = server.get("port", 50051)
    _require(isinstance(port, int) and 0 <= port <= 65535, f"server.port = {port!r} is invalid: expected 0 to 65535")
    torch_threads = server.get("torch_threads", 0)
    _require(
        isinstance(torch_threads, int) and torch_threads >= 0,
        f"server.torch_threads = {torch_threads!r} is invalid: expected an integer >= 0 (0 picks one per core minus one)",
    )
    grpc_thread_nice = server.get("grpc_thread_nice", ServerConfig().grpc_thread_nice)
    _require(
        isinstance(grpc_thread_nice, int) and not isinstance(grpc_thread_nice, bool) and 0 <= grpc_thread_nice <= 19,
        f"server.grpc_thread_nice = {grpc_thread_nice!r} is invalid: expected a whole number of nice levels from 0 "
        "(leave gRPC's threads at the event loop's priority) to 19, without quotes",
    )
    host = server.get("host", "127.0.0.1")
    _require(isinstance(host, str) and host != "", f"server.host = {host!r} is invalid: expected an address such as 127.0.0.1")
    tls = {key: _string(server, key, "server") for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file")}
    _require(
        bool(tls["tls_cert_file"]) == bool(tls["tls_key_file"]),
        "server.tls_cert_file and server.tls_key_file go together: set both for TLS, or neither",
    )
    _require(
        not tls["tls_client_ca_file"] or bool(tls["tls_cert_file"]),
        "server.tls_client_ca_file needs server.tls_cert_file and server.tls_key_file: client certificates need TLS",
    )
    metrics_port = server.get("metrics_port", 9464)
    _require(
        isinstance(metrics_port, int) and not isinstance(metrics_port, bool) and -1 <= metrics_port <= 65535,
        f"server.metrics_port = {metrics_port!r} is invalid: expected 0 to 65535 (0 picks a free port), or -1 for no metrics",
    )
    return ServerConfig(
        host=host,
        port=port,
        metrics_port=metrics_port,
        metrics_host=_string(server, "metrics_host", "server"),
        log_chunks=_boolean(server, "log_chunks", False, "server"),
        decode_threads=_positive_int(server, "decode_threads", 2, "server"),
        torch_threads=torch_threads,
        inference_cpus=_cpu_list(server, "inference_cpus", "server"),
        grpc_thread_nice=grpc_thread_nice,
        models=models,
        limits=limits,
        admission=admission,
        rate_limits=rate_limits,
        auth=auth,
        tracing=tracing,
        drain_grace_s=_non_negative(server, "drain_grace_s", 20.0, "server", "seconds"),
        **tls,
    )


def default_config_text() -> str:
    return importlib.resources.files("streaminfer.server").joinpath("default_config.toml").read_text()


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> ServerConfig:
    """Read the config at ``path``, or the embedded default when ``path`` is None.

    ``overrides`` replaces keys of the ``[server]`` table (command-line flags)
    before validation, so a flag gets the same checks as the file.
    """
    if path is None:
        text = default_config_text()
    else:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path or 'default config'}: invalid TOML: {error}") from error
    if overrides:
        server = data.setdefault("server", {})
        _require(isinstance(server, dict), f"[server] is invalid: expected a table, got {server!r}")
        server.update({key: value for key, value in overrides.items() if value is not None})
    return config_from_mapping(data)
