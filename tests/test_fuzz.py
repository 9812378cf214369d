"""Property-based fuzzing of Stream requests against one real server.

Hypothesis generates request sequences: any kind of StreamRequest with random
sequence numbers, enums and bytes, fields over the stream's limits, and
serialized messages that are truncated or replaced by random bytes. The
sequences go through a method handle with identity serializers, so the server
receives exactly those bytes. For each sequence:

- The call ends with a status before its deadline, and the status is one the
  API gives for bad input.
- A call that ends OK answered every chunk it sent once.
- A healthy stream running at the same time gets every ack.
- Afterwards the server still serves health checks and has no stream left open.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import StreamOutcome, audio_requests, jpeg, read_wav, run_stream, vad_config
from test_overload import server_process
from streaminfer.server.config import AdmissionConfig, LimitsConfig
from streaminfer.v1 import streaminfer_pb2 as pb

STREAM_METHOD = "/streaminfer.v1.InferenceService/Stream"
MODELS = ("silero_vad", "minilm_embedding", "hog_people")
LIMITS = LimitsConfig()
INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
INT32 = st.integers(min_value=-(1 << 31), max_value=(1 << 31) - 1)
CALL_TIMEOUT_S = 30.0

# Statuses the API documents for a stream whose messages all parse: bad
# config or messages (INVALID_ARGUMENT, FAILED_PRECONDITION), unknown model
# (NOT_FOUND), or OK.
EXPECTED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
}
# A message that does not parse raises DecodeError while the server reads it.
# grpcio reports UNKNOWN when it is the first message, and the server's reader
# reports INTERNAL for a later one.
UNPARSEABLE_CODES = EXPECTED_CODES | {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerThread]:
    base = loopback_config()
    config = dataclasses.replace(
        base,
        models=tuple(model for model in base.models if model.name in MODELS),
        # Admission by projected queue wait would reject streams on a busy
        # machine, and these tests are about message handling.
        admission=AdmissionConfig(max_queue_wait_ms=0, max_busy_fraction=0),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


# Strategies ---------------------------------------------------------------------

# Smaller than the people detector's 64 x 128 window.
SMALL_JPEG = jpeg(np.full((40, 24, 3), 120, dtype=np.uint8))
# Raw frame sizes: invalid ones, tiny ones, and any int32.
frame_sides = st.one_of(st.sampled_from([-1, 0, 1, 8, 64, 128, 4097]), st.integers(-3, 200), INT32)


def enum_values(enum_type) -> st.SearchStrategy[int]:
    """Mostly the enum's own values, sometimes any int32 (proto3 enums are open)."""
    return st.one_of(st.sampled_from(enum_type.values()), st.integers(-3, 12), INT32)


sequence_numbers = st.one_of(st.integers(-2, 40), INT64)
durations = st.builds(
    lambda seconds, nanos: duration_pb2.Duration(seconds=seconds, nanos=nanos),
    st.integers(-5, 5),
    st.sampled_from([0, 1, 1_000_000, 999_999_999]),
)
oversized = st.sampled_from(
    [LIMITS.max_audio_chunk_bytes + 1, LIMITS.max_text_chunk_bytes + 1, 1 << 20]
).map(lambda size: b"\x00" * size)


def contents(valid: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(st.just(valid), st.binary(max_size=64), oversized)


@st.composite
def configs(draw) -> pb.StreamConfig:
    names = st.sampled_from((*MODELS, "haar_faces", "no_such_model", ""))
    config = pb.StreamConfig(
        models=[
            pb.ModelSelection(model=draw(names), modality=draw(enum_values(pb.Modality)))
            for _ in range(draw(st.integers(0, 3)))
        ],
        interim_results=draw(st.booleans()),
        label=draw(st.text(max_size=16)),
        priority=draw(enum_values(pb.Priority)),
        video_overflow_policy=draw(enum_values(pb.OverflowPolicy)),
    )
    if draw(st.booleans()):
        config.audio_format.CopyFrom(
            pb.AudioFormat(
                encoding=draw(enum_values(pb.AudioEncoding)),
                sample_rate_hertz=draw(st.one_of(st.sampled_from([8_000, 16_000, 48_000]), INT32)),
                audio_channel_count=draw(st.one_of(st.integers(0, 3), INT32)),
            )
        )
    if draw(st.booleans()):
        config.video_format.CopyFrom(
            pb.VideoFormat(
                encoding=draw(enum_values(pb.ImageEncoding)),
                width=draw(frame_sides),
                height=draw(frame_sides),
            )
        )
    if draw(st.booleans()):
        config.chunk_latency_budget.CopyFrom(draw(durations))
    return config


@st.composite
def working_configs(draw) -> pb.StreamConfig:
    """A config the server accepts, so the chunks after it reach the models."""
    chosen = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=3, unique=True))
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model=name) for name in chosen], interim_results=draw(st.booleans())
    )
    if "silero_vad" in chosen:
        config.audio_format.CopyFrom(pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000))
    if "hog_people" in chosen:
        config.video_format.CopyFrom(pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG))
        config.video_overflow_policy = draw(enum_values(pb.OverflowPolicy).filter(lambda value: 0 <= value <= 2))
    return config


def chunk_requests() -> st.SearchStrategy[pb.StreamRequest]:
    audio = st.builds(
        lambda number, content: pb.StreamRequest(audio=pb.AudioChunk(sequence_number=number, audio_content=content)),
        sequence_numbers,
        contents(b"\x00\x01" * 512),
    )
    frame = st.builds(
        lambda number, content: pb.StreamRequest(frame=pb.VideoFrame(sequence_number=number, image_content=content)),
        sequence_numbers,
        contents(SMALL_JPEG),
    )
    text = st.builds(
        lambda number, content: pb.StreamRequest(text=pb.TextChunk(sequence_number=number, text=content)),
        sequence_numbers,
        st.one_of(st.text(max_size=40).map(str.encode), contents(b"A sentence. ")),
    )
    control = st.builds(
        lambda action, modality: pb.StreamRequest(control=pb.StreamControl(action=action, modality=modality)),
        st.one_of(st.sampled_from([pb.CONTROL_ACTION_FLUSH, pb.CONTROL_ACTION_END_OF_INPUT]), enum_values(pb.ControlAction)),
        enum_values(pb.Modality),
    )
    return st.one_of(audio, frame, text, control)


requests = st.one_of(
    chunk_requests(),
    configs().map(lambda config: pb.StreamRequest(config=config)),
    st.just(pb.StreamRequest()),
)


@st.composite
def wire_messages(draw) -> list[bytes]:
    """Serialized messages of one call, sometimes with one message truncated or replaced by random bytes."""
    # Weighted towards streams the server accepts and reads to the end, where
    # the accounting checks apply.
    first_kind = draw(st.sampled_from(["working config"] * 6 + ["any config", "any config", "any request"]))
    if first_kind == "working config":
        first = pb.StreamRequest(config=draw(working_configs()))
    elif first_kind == "any config":
        first = pb.StreamRequest(config=draw(configs()))
    else:
        first = draw(requests)
    later = []
    for kind in draw(st.lists(st.sampled_from(["chunk"] * 5 + ["any request"]), max_size=10)):
        later.append(draw(chunk_requests() if kind == "chunk" else requests))
    wire = [message.SerializeToString() for message in (first, *later)]
    mutation = draw(st.sampled_from(["none", "none", "none", "none", "truncate", "random", "append"]))
    if mutation != "none":
        index = draw(st.integers(0, len(wire) - 1))
        if mutation == "truncate":
            wire[index] = wire[index][: draw(st.integers(0, max(0, len(wire[index]) - 1)))]
        elif mutation == "random":
            wire[index] = draw(st.binary(min_size=1, max_size=64))
        else:
            wire[index] = wire[index] + draw(st.binary(min_size=1, max_size=16))
    return wire


# Checks ---------------------------------------------------------------------------


def parsed(wire: list[bytes]) -> list[pb.StreamRequest] | None:
    """Parse the messages the server reads, as it will, or return None when one does not parse.

    The server reads nothing after an END_OF_INPUT control that follows the config.
    """
    messages = []
    for message in wire:
        try:
            messages.append(pb.StreamRequest.FromString(message))
        except DecodeError:
            return None
        control = messages[-1].control
        if len(messages) > 1 and messages[-1].HasField("control") and control.action == pb.CONTROL_ACTION_END_OF_INPUT:
            break
    return messages


def chunks_read(messages: list[pb.StreamRequest]) -> dict[int, list[int]]:
    """Sequence numbers of the chunks the server reads, per modality: those before the first END_OF_INPUT."""
    fields = {"audio": pb.MODALITY_AUDIO, "frame": pb.MODALITY_VIDEO, "text": pb.MODALITY_TEXT}
    sent: dict[int, list[int]] = {}
    for message in messages[1:]:
        kind = message.WhichOneof("request")
        if kind == "control" and message.control.action == pb.CONTROL_ACTION_END_OF_INPUT:
            break
        if kind in fields:
            sent.setdefault(fields[kind], []).append(getattr(message, kind).sequence_number)
    return sent


def in_order(numbers: list[int]) -> tuple[list[int], collections.Counter[int]]:
    """Split sequence numbers into those above every earlier one and the rest, which the server rejects."""
    increasing: list[int] = []
    rejected: collections.Counter[int] = collections.Counter()
    for number in numbers:
        if increasing and number <= increasing[-1]:
            rejected[number] += 1
        else:
            increasing.append(number)
    return increasing, rejected


def assert_each_chunk_answered_once(messages: list[pb.StreamRequest], responses: list[pb.StreamResponse]) -> None:
    assert responses[0].HasField("session_accepted")
    assert responses[-1].HasField("stream_end")
    ranges: dict[int, list[tuple[int, int]]] = {}
    errors: dict[int, collections.Counter[int]] = {}
    for response in responses:
        for ack in response.acks:
            ranges.setdefault(ack.modality, []).append((ack.first_sequence_number, ack.last_sequence_number))
        for error in response.errors:
            errors.setdefault(error.modality, collections.Counter())[error.sequence_number] += 1
    sent = chunks_read(messages)
    assert set(ranges) | set(errors) <= set(sent)
    for modality, numbers in sent.items():
        name = pb.Modality.Name(modality)
        increasing, rejected = in_order(numbers)
        # Each chunk rejected for its sequence number has an error of its own,
        # and no ack range spans a number only such chunks carried.
        for number in set(rejected) - set(increasing):
            assert not any(first <= number <= last for first, last in ranges.get(modality, [])), (
                f"{name} chunk {number} was rejected for its sequence number and is also inside an ack range"
            )
        errors_left = errors.get(modality, collections.Counter())
        assert errors_left & rejected == rejected, f"{name}: no error for out-of-order chunks {rejected - errors_left}"
        errors_left = errors_left - rejected
        for number in increasing:
            acked = sum(first <= number <= last for first, last in ranges.get(modality, []))
            assert acked + errors_left[number] == 1, (
                f"{name} chunk {number}: acked {acked} times, failed {errors_left[number]} times; "
                f"sent {numbers}, acked {ranges.get(modality)}, errors {errors.get(modality)}"
            )
        assert set(errors_left) <= set(increasing)
    for totals in responses[-1].stream_end.totals:
        assert totals.chunks_received == len(sent.get(totals.modality, []))
        assert totals.chunks_acked + totals.chunks_failed == totals.chunks_received


class Neighbour:
    """A healthy VAD stream run on a thread beside a fuzzed call."""

    def __init__(self, channel: grpc.Channel, requests: list[pb.StreamRequest], rate: int) -> None:
        self.outcome: StreamOutcome | None = None
        self.requests = requests
        self._thread = threading.Thread(target=self._run, args=(channel, rate))
        self._thread.start()

    def _run(self, channel: grpc.Channel, rate: int) -> None:
        self.outcome = run_stream(channel, vad_config(rate), self.requests)

    def join(self) -> StreamOutcome:
        self._thread.join(timeout=CALL_TIMEOUT_S * 2)
        assert self.outcome is not None, "the neighbour stream did not finish"
        return self.outcome


@pytest.fixture(scope="module")
def neighbour_audio() -> tuple[list[pb.StreamRequest], int]:
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    return audio_requests(samples, rate), rate


def wait_for_no_streams(server: ServerThread, timeout: float = CALL_TIMEOUT_S) -> int:
    """Return the number of open streams once it is 0, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while server.server.service.active_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(server.server.service.active_sessions)


# The test -------------------------------------------------------------------------


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(wire=wire_messages())
def test_fuzzed_stream_ends_with_status(
    fuzz_server: ServerThread, fuzz_channel: grpc.Channel, neighbour_audio: tuple[list[pb.StreamRequest], int], wire
) -> None:
    raw_stream = fuzz_channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
    neighbour = Neighbour(fuzz_channel, *neighbour_audio)
    received: list[bytes] = []
    code = grpc.StatusCode.OK
    try:
        for response in raw_stream(iter(wire), timeout=CALL_TIMEOUT_S):
            received.append(response)
    except grpc.RpcError as error:
        code = error.code()
        event(error.details()[:50])
    healthy = neighbour.join()

    messages = parsed(wire)
    event(f"status {code.name}, messages {'parse' if messages is not None else 'do not parse'}")
    responses = [pb.StreamResponse.FromString(response) for response in received]
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "the fuzzed call did not end before its deadline"
    assert code in (EXPECTED_CODES if messages is not None else UNPARSEABLE_CODES), code
    if code == grpc.StatusCode.OK:
        assert messages is not None
        assert_each_chunk_answered_once(messages, responses)
    assert healthy.errors == []
    assert healthy.answered(pb.MODALITY_AUDIO) == list(range(len(neighbour.requests)))
    assert healthy.end is not None
    assert healthy.end.reason == pb.STREAM_END_REASON_INPUT_ENDED
    health = health_pb2_grpc.HealthStub(fuzz_channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert wait_for_no_streams(fuzz_server) == 0


@pytest.mark.parametrize("modality", [-1, 4])
def test_unknown_selection_modality_rejected(fuzz_channel: grpc.Channel, modality: int) -> None:
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="silero_vad", modality=modality)],
        audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hertz=16_000),
    )
    raw_stream = fuzz_channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        list(raw_stream(iter([pb.StreamRequest(config=config).SerializeToString()]), timeout=CALL_TIMEOUT_S))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"config.models[0].modality = {modality}" in caught.value.details()


def test_small_frame_keeps_server_up(tmp_path: pathlib.Path) -> None:
    config = pb.StreamConfig(
        models=[pb.ModelSelection(model="hog_people")], video_format=pb.VideoFormat(encoding=pb.IMAGE_ENCODING_JPEG)
    )
    small = pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=jpeg(np.zeros((64, 64, 3), np.uint8))))
    # A server process of its own: the crash would end the test process with an in-process server.
    with server_process(tmp_path, grace_s=1.0, model="hog_people") as (process, target):
        with grpc.insecure_channel(target) as channel:
            try:
                outcome = run_stream(channel, config, [small])
            except grpc.RpcError as error:
                outcome = None
                failure = error
            process_status = process.poll()
            assert process_status is None, f"the server process exited with {process_status}"
            assert outcome is not None, failure
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert outcome.answered(pb.MODALITY_VIDEO) == [0]
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_out_of_order_chunk_not_acked(fuzz_channel: grpc.Channel) -> None:
    # Words without a sentence end wait for the end of input, so all three answers come together.
    words = [(0, b"alpha "), (2, b"beta "), (1, b"gamma ")]
    requests = [pb.StreamRequest(text=pb.TextChunk(sequence_number=number, text=word)) for number, word in words]
    outcome = run_stream(fuzz_channel, pb.StreamConfig(models=[pb.ModelSelection(model="minilm_embedding")]), requests)
    ranges = [
        (ack.first_sequence_number, ack.last_sequence_number) for response in outcome.responses for ack in response.acks
    ]
    assert [(error.sequence_number, error.reason) for error in outcome.errors] == [
        (1, pb.CHUNK_ERROR_REASON_INVALID_ARGUMENT)
    ]
    assert sum(first <= 0 <= last for first, last in ranges) == 1
    assert sum(first <= 2 <= last for first, last in ranges) == 1
    assert not any(first <= 1 <= last for first, last in ranges), ranges
