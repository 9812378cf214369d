"""The ``streaminfer-client`` command: stream media files, list models, run one inference."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import math
import os
import re
import sys
import wave
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO, TypeVar

import grpc

from streaminfer.client._client import AsyncClient
from streaminfer.client._config import Modality, VideoFormat, stream_config
from streaminfer.client._errors import StreaminferError
from streaminfer.client._events import Result
from streaminfer.client._media import (
    DEFAULT_WORDS_PER_MINUTE,
    iter_text_chunks,
    iter_video_frames,
    iter_wav_chunks,
    read_wav_format,
    video_frame_rate,
)
from streaminfer.client._media import _open_wav as open_wav
from streaminfer.client._options import DEFAULT_TARGET, ClientOptions, tls_credentials
from streaminfer.client._output import event_json, format_event, format_result, json_line, summary_json, summary_lines
from streaminfer.client._pacing import paced_async
from streaminfer.client._retry import RetryPolicy
from streaminfer.client._session import StreamSession
from streaminfer.client._version import __version__
from streaminfer.v1 import streaminfer_pb2 as pb

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_MODELS = {
    Modality.AUDIO: ("silero_vad",),
    Modality.VIDEO: ("hog_people", "haar_faces"),
    Modality.TEXT: ("minilm_embedding",),
}

EXIT_OK = 0
EXIT_RPC_FAILED = 1
EXIT_USAGE = 2
# The stream ended normally, but the server reported some chunks as failed.
EXIT_CHUNKS_FAILED = 3
EXIT_INTERRUPTED = 130

API_KEY_ENVIRONMENT_VARIABLE = "STREAMINFER_API_KEY"
DEFAULT_RETRIES = RetryPolicy().max_attempts - 1


class UsageError(Exception):
    """Bad input from the command line or an input file; exits with status 2."""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamPlan:
    """The stream command's inputs and config, resolved from the arguments before connecting."""

    config: pb.StreamConfig
    audio_path: str | None
    video_path: str | None
    video_fps: float | None
    text: str | None


# Argument parsing


def _finite_float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {expected}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {expected}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text, "a number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a number > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 1") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"server address as HOST:PORT (default {DEFAULT_TARGET})"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object per line instead of text")
    common.add_argument(
        "--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level of the client library, on stderr; INFO shows retries and roll-overs (default WARNING)",
    )
    common.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENVIRONMENT_VARIABLE), metavar="KEY",
        help=f"API key, sent in the x-api-key metadata of every call (default: the {API_KEY_ENVIRONMENT_VARIABLE} "
        "environment variable, which keeps the key out of the process list; none when unset)",
    )
    common.add_argument(
        "--tls", action="store_true",
        help="connect with TLS, trusting gRPC's default root certificates unless --ca-file is given "
        "(default: plaintext)",
    )
    common.add_argument(
        "--ca-file", metavar="PEM",
        help="PEM file of the CA certificates that signed the server's certificate; implies --tls",
    )
    common.add_argument(
        "--cert-file", metavar="PEM",
        help="PEM file of the client certificate chain, for a server that requires client certificates; "
        "needs --key-file, implies --tls",
    )
    common.add_argument(
        "--key-file", metavar="PEM", help="PEM file of the private key of --cert-file; needs --cert-file, implies --tls"
    )
    common.add_argument(
        "--retries", type=_non_negative_int, default=DEFAULT_RETRIES, metavar="N",
        help="retries of a call or stream setup that fails with UNAVAILABLE or RESOURCE_EXHAUSTED; the wait "
        "starts at 0.2 s and doubles up to 10 s, with jitter, unless the server requests another wait; "
        f"0 turns retries off (default {DEFAULT_RETRIES})",
    )

    parser = argparse.ArgumentParser(
        prog="streaminfer-client", description="Client of the streaminfer realtime inference server."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stream = commands.add_parser(
        "stream",
        parents=[common],
        help="stream audio, video and text files through models in one stream",
        description=(
            "Stream media files through models in one stream and print results as they arrive, "
            "then a summary. Audio, video and text are sent concurrently, each at its own pace."
        ),
    )
    stream.add_argument("--audio", metavar="WAV", help="16-bit PCM WAV file, any sample rate and channel count")
    stream.add_argument("--video", metavar="FILE", help="video file OpenCV can read; frames are sent as JPEG")
    stream.add_argument("--text", metavar="FILE", help="UTF-8 text file, sent line by line")
    stream.add_argument(
        "--models", metavar="NAME[,NAME...]",
        help=(
            "comma-separated models to run (default: silero_vad for audio, hog_people and haar_faces "
            "for video, minilm_embedding for text, for the media given)"
        ),
    )
    stream.add_argument(
        "--chunk-ms", type=_positive_float, default=32.0, metavar="MS",
        help="audio chunk length in milliseconds (default 32)",
    )
    stream.add_argument(
        "--fps", type=_positive_float, default=None, metavar="FPS",
        help="video frames per second to send, at most the file's rate (default: the file's rate)",
    )
    stream.add_argument(
        "--text-wpm", type=_positive_float, default=DEFAULT_WORDS_PER_MINUTE, metavar="WPM",
        help=f"text pace in words per minute at speed 1 (default {DEFAULT_WORDS_PER_MINUTE:g}, a speaking rate)",
    )
    stream.add_argument(
        "--max-seconds", type=_positive_float, default=None, metavar="SECONDS",
        help="stop each medium after this many seconds of media time: audio by samples, video by frame "
        "timestamps, text by its --text-wpm pacing clock (default: no limit)",
    )
    stream.add_argument(
        "--speed", type=_non_negative_float, default=1.0, metavar="FACTOR",
        help="pace as a multiple of real time: 1 is real time, 4 is four times faster, "
        "0 is as fast as the in-flight window allows (default 1)",
    )
    stream.add_argument("--interim", action="store_true", help="ask for interim results as well as final ones")
    stream.add_argument("--label", default="", help="free-form label the server writes to its logs")
    stream.add_argument(
        "--priority", choices=("interactive", "bulk"), default=None,
        help="scheduling class of the stream's work: the server runs all queued interactive work before bulk "
        "work (default: interactive, the server's default)",
    )
    stream.add_argument(
        "--chunk-budget-ms", type=_positive_float, default=None, metavar="MS",
        help="milliseconds after the server reads a chunk that its result is still useful; a chunk that cannot "
        "get its result in time fails with reason DEADLINE instead of running (default: the server's budget, "
        "limits.chunk_latency_budget_ms in its config, 5000 unless changed)",
    )
    stream.add_argument(
        "--video-overflow", choices=("keep-latest", "backpressure"), default=None,
        help="what happens when the video falls behind its models: keep-latest drops older waiting frames, "
        "each failing with reason OVERFLOW; backpressure drops none and holds the sender back through the "
        "in-flight window (default: keep-latest, the server's default)",
    )
    stream.add_argument(
        "--max-in-flight", type=_positive_int, default=None, metavar="N",
        help="send at most this many unanswered chunks, below the server's limit (default: the server's limit)",
    )
    stream.add_argument(
        "--roll-over", action="store_true",
        help="when the server ends the stream because it is draining or the stream reached its maximum duration, "
        "go on in a new stream and resend the unanswered chunks "
        "(default off: the command fails with the server's status)",
    )

    models = commands.add_parser("models", parents=[common], help="list the models the server serves")
    models.add_argument("name", nargs="?", help="show one model's metadata instead of the list")

    infer = commands.add_parser(
        "infer",
        parents=[common],
        help="run one model on one input",
        description=(
            "Run one model on one input (text, a text file, a WAV file or an image) in a single call "
            "and print every result it returns."
        ),
    )
    infer.add_argument("--model", required=True, help="model name, as `models` lists it")
    source = infer.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="TEXT", help="text to run the model on")
    source.add_argument("--text-file", metavar="FILE", help="UTF-8 text file to run the model on")
    source.add_argument("--audio", metavar="WAV", help="16-bit PCM WAV file, sent whole")
    source.add_argument("--image", metavar="FILE", help="JPEG or PNG image; the encoding follows the file extension")
    infer.add_argument(
        "--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
        help="deadline of the call in seconds, retries included (default 30)",
    )
    return parser


# Connecting


_OPTION_OF_ARGUMENT = {
    "ca_file": "--ca-file",
    "cert_file": "--cert-file",
    "key_file": "--key-file",
    "api_key": f"--api-key (or {API_KEY_ENVIRONMENT_VARIABLE})",
}


def create_client(args: argparse.Namespace, options: ClientOptions | None = None) -> AsyncClient:
    """Build the client from the connection options; raises UsageError for bad TLS files or key."""
    if bool(args.cert_file) != bool(args.key_file):
        raise UsageError("--cert-file and --key-file go together: give both for a client certificate, or neither")
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        try:
            credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file)
        except ValueError as error:
            raise UsageError(_name_option(str(error))) from error
    try:
        return AsyncClient(
            args.target,
            options=options,
            credentials=credentials,
            api_key=args.api_key or None,
            retry_policy=RetryPolicy(max_attempts=args.retries + 1),
        )
    except ValueError as error:
        raise UsageError(_name_option(str(error))) from error


def _name_option(message: str) -> str:
    """Replace the argument name that starts a ``tls_credentials`` or ``AsyncClient`` message with its option."""
    return re.sub(r"^(ca_file|cert_file|key_file|api_key)\b", lambda match: _OPTION_OF_ARGUMENT[match[1]], message)


# The stream command


def plan_stream(args: argparse.Namespace) -> StreamPlan:
    """Check the input files and build the stream config, before any connection."""
    if not (args.audio or args.video or args.text):
        raise UsageError("nothing to stream: give at least one of --audio, --video or --text")

    audio_format = None
    video_fps = None
    text = None
    modalities = []
    if args.audio:
        audio_format = _checked(read_wav_format, args.audio)
        modalities.append(Modality.AUDIO)
    if args.video:
        file_fps = _checked(video_frame_rate, args.video)
        if args.fps is None and file_fps == 0:
            raise UsageError(f"{args.video}: the file declares no frame rate; pass --fps")
        video_fps = args.fps
        modalities.append(Modality.VIDEO)
    if args.text:
        text = _checked(_read_text, args.text)
        modalities.append(Modality.TEXT)

    if args.models:
        models = [name.strip() for name in args.models.split(",") if name.strip()]
    else:
        models = [name for modality in modalities for name in DEFAULT_MODELS[modality]]
    try:
        config = stream_config(
            models,
            audio=audio_format,
            video=VideoFormat("jpeg") if args.video else None,
            interim_results=args.interim,
            label=args.label,
            priority=args.priority,
            chunk_latency_budget_s=None if args.chunk_budget_ms is None else args.chunk_budget_ms / 1000,
            video_overflow_policy=None if args.video_overflow is None else args.video_overflow.replace("-", "_"),
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    return StreamPlan(config, args.audio, args.video, video_fps, text)


def _checked(function: Callable[[str], _T], path: str) -> _T:
    """Call ``function(path)``, turning a bad or missing file into a UsageError that names the path."""
    try:
        return function(path)
    except (OSError, ValueError, EOFError, wave.Error, ImportError) as error:
        message = str(error)
        if path not in message:
            message = f"{path}: {message}"
        raise UsageError(message) from error


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


async def _send_audio(session: StreamSession, path: str, args: argparse.Namespace) -> None:
    chunks = iter_wav_chunks(path, args.chunk_ms, max_seconds=args.max_seconds)
    async for chunk in paced_async(chunks, args.speed):
        try:
            await session.send_audio(chunk.content, chunk.timestamp_s)
        except ValueError as error:
            raise UsageError(f"--chunk-ms {args.chunk_ms:g} is too long for this server: {error}") from error


async def _send_video(session: StreamSession, path: str, fps: float | None, args: argparse.Namespace) -> None:
    frames = iter_video_frames(path, fps, max_seconds=args.max_seconds)
    # Frames are decoded in a worker thread so responses are read on time.
    try:
        async for chunk in paced_async(frames, args.speed, read_in_thread=True):
            await session.send_frame(chunk.content, chunk.timestamp_s)
    except ValueError as error:
        raise UsageError(f"{path}: {error}") from error


async def _send_text(session: StreamSession, text: str, args: argparse.Namespace) -> None:
    chunks = iter_text_chunks(text, words_per_minute=args.text_wpm, max_seconds=args.max_seconds)
    async for chunk in paced_async(chunks, args.speed):
        try:
            await session.send_text(chunk.content, chunk.timestamp_s)
        except ValueError as error:
            raise UsageError(f"{args.text}: {error}") from error


async def _send_all(session: StreamSession, plan: StreamPlan, args: argparse.Namespace) -> None:
    senders: dict[Modality, Callable[[], Awaitable[None]]] = {}
    if plan.audio_path:
        senders[Modality.AUDIO] = functools.partial(_send_audio, session, plan.audio_path, args)
    if plan.video_path:
        senders[Modality.VIDEO] = functools.partial(_send_video, session, plan.video_path, plan.video_fps, args)
    if plan.text is not None:
        senders[Modality.TEXT] = functools.partial(_send_text, session, plan.text, args)
    sending = set(senders)

    async def send_then_flush(modality: Modality, send: Callable[[], Awaitable[None]]) -> None:
        await send()
        sending.discard(modality)
        # Without a flush the server would keep this medium's buffered work
        # (the last partial VAD window, an open speech segment, a partial
        # sentence) until the other media end. The last medium to end needs
        # none, because end_input finishes everything.
        if sending:
            await session.flush(modality)

    async with asyncio.TaskGroup() as group:
        for modality, send in senders.items():
            group.create_task(send_then_flush(modality, send))
    await session.end_input()


async def _print_events(session: StreamSession, as_json: bool, out: TextIO) -> None:
    async for event in session:
        line = event_json(event) if as_json else format_event(event)
        if line is not None:
            print(line, file=out, flush=True)


async def run_stream(args: argparse.Namespace, out: TextIO) -> int:
    plan = plan_stream(args)
    async with create_client(args) as client:
        session = await client.open_stream(
            plan.config, max_chunks_in_flight=args.max_in_flight, roll_over=args.roll_over
        )
        async with session:
            if args.json:
                print(json_line("sessionAccepted", "sessionAccepted", session.accepted), file=out, flush=True)
            try:
                # A failure on either side cancels the other: a failed call
                # stops the senders, and a failed sender stops the printing.
                async with asyncio.TaskGroup() as group:
                    group.create_task(_send_all(session, plan, args))
                    group.create_task(_print_events(session, args.json, out))
            finally:
                # Printed after a failure or an interrupt too: it shows how far the stream got.
                _print_summary(session, args.json, out)

    unanswered = sum(counts.unanswered for counts in session.stats.modalities.values())
    if unanswered:
        print(f"streaminfer-client: error: {unanswered} chunk(s) were never acked or failed", file=sys.stderr)
        return EXIT_RPC_FAILED
    failed = sum(counts.failed for counts in session.stats.modalities.values())
    if failed:
        print(
            f"streaminfer-client: error: the server rejected or dropped {failed} chunk(s); "
            "the chunk failed lines above say why",
            file=sys.stderr,
        )
        return EXIT_CHUNKS_FAILED
    return EXIT_OK


def _print_summary(session: StreamSession, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(summary_json(session.stream_id, session.stats), file=out, flush=True)
        return
    for line in summary_lines(session.stream_id, session.stats, session.stream_end):
        print(line, file=out, flush=True)


# The models and infer commands


def _model_line(model: pb.ModelInfo) -> str:
    modality = Modality(model.modality).label
    stateful = "stateful" if model.stateful else "stateless"
    return (
        f"{model.name:<20} {modality:<6} {model.device or '-':<7} instances {model.instances}, "
        f"max batch {model.max_batch_size}, {stateful}  {model.description}"
    )


async def run_models(args: argparse.Namespace, out: TextIO) -> int:
    async with create_client(args) as client:
        models = [await client.get_model(args.name)] if args.name else await client.list_models()
    for model in models:
        print(json_line("model", "model", model) if args.json else _model_line(model), file=out)
    return EXIT_OK


async def run_infer(args: argparse.Namespace, out: TextIO) -> int:
    inputs: dict[str, object] = {}
    if args.text is not None:
        inputs["text"] = args.text
    elif args.text_file:
        inputs["text"] = _checked(_read_text, args.text_file)
    elif args.audio:
        inputs["audio_format"] = _checked(read_wav_format, args.audio)
        inputs["audio"] = _checked(_read_wav_samples, args.audio)
    else:
        inputs["image"] = _checked(_read_bytes, args.image)
        encoding = "png" if args.image.lower().endswith(".png") else "jpeg"
        inputs["video_format"] = VideoFormat(encoding)

    async with create_client(args, ClientOptions(unary_timeout_s=args.timeout)) as client:
        results = await client.infer(args.model, **inputs)  # type: ignore[arg-type]
    for result in results:
        print(json_line("result", "result", result) if args.json else _format_infer_result(Result(result)), file=out)
    if not results and not args.json:
        print(f"[infer] {args.model} returned no results", file=out)
    return EXIT_OK


def _format_infer_result(result: Result) -> str:
    # Audio results keep their media time; sequence numbers mean nothing for one input.
    if result.modality is Modality.AUDIO and result.start_time_s is not None:
        return format_result(result, f"[audio {result.start_time_s:.2f}s]")
    return format_result(result, "[infer]")


def _read_wav_samples(path: str) -> bytes:
    with open_wav(path) as reader:
        return reader.readframes(reader.getnframes())


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


_COMMANDS = {"stream": run_stream, "models": run_models, "infer": run_infer}


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """Return the first leaf exception; a failed call shows up in several tasks at once."""
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _hint(error: StreaminferError, args: argparse.Namespace) -> str:
    """Return the command-line option that likely fixes ``error``, or an empty string."""
    details = error.details or ""
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        if not args.api_key:
            return f"pass the key with --api-key or the {API_KEY_ENVIRONMENT_VARIABLE} environment variable"
        # The option's default is the variable, so a key equal to it came from there.
        if args.api_key == os.environ.get(API_KEY_ENVIRONMENT_VARIABLE):
            source = f"the {API_KEY_ENVIRONMENT_VARIABLE} environment variable"
        else:
            source = "--api-key"
        return f"check the API key from {source}: the server does not accept it"
    if error.code == grpc.StatusCode.UNAVAILABLE and any(
        marker in details for marker in ("CERTIFICATE_VERIFY_FAILED", "Ssl handshake failed")
    ):
        return "the server's certificate is not trusted: pass its CA with --ca-file"
    if error.code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details and not getattr(args, "tls", False):
        return "if the server uses TLS, add --tls (and --ca-file for a private CA)"
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
        "continue on a new stream" in details
    ) and args.command == "stream":
        return "--roll-over continues the session on a new stream when the server ends one"
    return ""


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status.

    0 ok, 1 call failed, 2 bad input, 3 some chunks failed, 130 interrupted.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    out = out or sys.stdout
    try:
        try:
            return asyncio.run(_COMMANDS[args.command](args, out))
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
    except StreaminferError as error:
        print(f"streaminfer-client: error: {error}", file=sys.stderr)
        hint = _hint(error, args)
        if hint:
            print(f"streaminfer-client: hint: {hint}", file=sys.stderr)
        return EXIT_RPC_FAILED
    except UsageError as error:
        print(f"streaminfer-client: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("streaminfer-client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
