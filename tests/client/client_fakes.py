"""Stand-ins for the server side, so the client tests run without the real server.

``FakeStreamCall`` replaces the gRPC call object inside one event loop: a test
scripts every response. ``FakeInferenceService`` is a small servicer served by
a real gRPC server on a loopback port, to exercise the client's real channel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import wave
from collections.abc import Iterator

import grpc

from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def accepted_response(window: int, stream_id: str = "fake-stream") -> pb.StreamResponse:
    limits = pb.StreamLimits(
        max_audio_chunk_bytes=262144,
        max_frame_bytes=8 * 1024 * 1024,
        max_frame_dimension=4096,
        max_text_chunk_bytes=65536,
        max_chunks_in_flight=window,
    )
    return pb.StreamResponse(session_accepted=pb.SessionAccepted(stream_id=stream_id, limits=limits))


def rpc_error(
    code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


class FakeStreamCall:
    """A scripted ``StreamStreamCall``: records writes, returns queued responses.

    Like a gRPC call, it rejects writes once a read has returned its end (EOF
    or an error status).
    """

    def __init__(self, window: int = 2, *, accept: bool = True, stream_id: str = "fake-stream") -> None:
        self.window = window
        self.accept = accept
        self.stream_id = stream_id
        self.requests: list[pb.StreamRequest] = []
        self.half_closed = False
        self.cancelled = False
        self.finished = False
        self._responses: asyncio.Queue[object] = asyncio.Queue()

    async def write(self, request: pb.StreamRequest) -> None:
        if self.finished:
            raise asyncio.InvalidStateError("RPC already finished")
        if self.half_closed:
            raise asyncio.InvalidStateError("write after done_writing")
        self.requests.append(request)
        if request.HasField("config") and self.accept:
            self._responses.put_nowait(accepted_response(self.window, stream_id=self.stream_id))

    async def done_writing(self) -> None:
        self.half_closed = True

    async def read(self) -> object:
        item = await self._responses.get()
        if isinstance(item, BaseException):
            if not isinstance(item, asyncio.CancelledError):
                self.finished = True
            raise item
        if item is grpc.aio.EOF:
            self.finished = True
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        # grpc.aio raises CancelledError from a read on a locally cancelled call.
        self._responses.put_nowait(asyncio.CancelledError())
        return True

    # Scripting

    def respond(self, response: pb.StreamResponse) -> None:
        self._responses.put_nowait(response)

    def ack(self, modality: int, first: int, last: int) -> None:
        ack = pb.ChunkAck(modality=modality, first_sequence_number=first, last_sequence_number=last)
        self.respond(pb.StreamResponse(acks=[ack]))

    def fail(self, error: BaseException) -> None:
        self._responses.put_nowait(error)

    def finish(self) -> None:
        self._responses.put_nowait(grpc.aio.EOF)

    def end_by_server(self, reason: int, code: grpc.StatusCode, details: str = "the server ended the stream") -> None:
        """Send StreamEnd with ``reason``, then end the call with ``code``, as a server-side end does."""
        self.respond(pb.StreamResponse(stream_end=pb.StreamEnd(reason=reason)))
        if code is grpc.StatusCode.OK:
            self.finish()
        else:
            self.fail(rpc_error(code, details))

    def chunks(self, kind: str) -> list[pb.StreamRequest]:
        return [request for request in self.requests if request.WhichOneof("request") == kind]


MODELS = [
    pb.ModelInfo(
        name="silero_vad", modality=pb.MODALITY_AUDIO, description="voice activity",
        stateful=True, device="cpu", instances=1, max_batch_size=256,
    ),
    pb.ModelInfo(
        name="hog_people", modality=pb.MODALITY_VIDEO, description="people",
        device="cpu", instances=1, max_batch_size=8, labels=["person"],
    ),
    pb.ModelInfo(
        name="minilm_embedding", modality=pb.MODALITY_TEXT, description="embeddings",
        device="cpu", instances=1, max_batch_size=64,
    ),
]
_MODALITY_OF = {model.name: model.modality for model in MODELS}


class FakeInferenceService(pb_grpc.InferenceServiceServicer):
    """Responds like a streaminfer server, with canned results.

    Stream acks a modality's pending chunks only when the window is full or
    input ends, so a client that ignored the window would stall the test
    instead of passing it. Text chunks containing b"bad" get a ChunkError.
    """

    def __init__(self, window: int = 4) -> None:
        self.window = window
        self.stream_requests: list[pb.StreamRequest] = []
        self.max_pending = 0
        self.infer_requests: list[pb.InferRequest] = []
        # Per method name: the invocation metadata of every call, as a dict.
        self.metadata: dict[str, list[dict[str, str]]] = {}
        # Per method name: (code, pushback value or None) of the calls still to reject, first first.
        self.rejections: dict[str, list[tuple[grpc.StatusCode, str | None]]] = {}
        # Stream calls after SessionAccepted: fail the next one with this status once it read a chunk.
        self.fail_stream_after_first_chunk: grpc.StatusCode | None = None
        # End each stream, as a server does at its maximum duration, after it read this many chunks.
        self.end_streams_after_chunks: int | None = None
        self.streams_ended_by_server = 0
        self._lock = threading.Lock()

    def reject(self, method: str, code: grpc.StatusCode, pushback: str | None = None, times: int = 1) -> None:
        """Reject the next ``times`` calls of ``method`` with ``code``, with grpc-retry-pushback-ms when given."""
        self.rejections.setdefault(method, []).extend([(code, pushback)] * times)

    def _admit(self, method: str, context) -> None:
        with self._lock:
            self.metadata.setdefault(method, []).append(dict(context.invocation_metadata()))
            pending = self.rejections.get(method)
            rejection = pending.pop(0) if pending else None
        if rejection is not None:
            code, pushback = rejection
            if pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
            context.abort(code, f"{method} rejected by the fake server")

    def ListModels(self, request, context):  # noqa: N802 (gRPC method name)
        self._admit("ListModels", context)
        return pb.ListModelsResponse(models=MODELS)

    def GetModel(self, request, context):  # noqa: N802
        self._admit("GetModel", context)
        for model in MODELS:
            if model.name == request.name:
                return pb.GetModelResponse(model=model)
        context.abort(
            grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found: ListModels lists the served models"
        )

    def Infer(self, request, context):  # noqa: N802
        self._admit("Infer", context)
        self.infer_requests.append(request)
        if request.model not in _MODALITY_OF:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found")
        result = pb.StreamResult(model=request.model, modality=_MODALITY_OF[request.model], is_final=True)
        result.embedding.values.extend([0.5] * 4)
        result.embedding.text = request.text
        return pb.InferResponse(results=[result])

    def Stream(self, request_iterator, context):  # noqa: N802
        requests = iter(request_iterator)
        first = next(requests, None)
        if first is None or not first.HasField("config") or not first.config.models:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a StreamConfig with models")
        self._admit("Stream", context)
        yield accepted_response(self.window, stream_id="grpc-fake")
        if self.fail_stream_after_first_chunk is not None:
            next(requests, None)
            context.abort(self.fail_stream_after_first_chunk, "the fake server failed the stream")
        yield from self._answer(requests, context)

    def _answer(self, requests: Iterator[pb.StreamRequest], context) -> Iterator[pb.StreamResponse]:
        pending: list[tuple[int, int]] = []
        received: dict[int, int] = {}
        acked: dict[int, int] = {}
        failed: dict[int, int] = {}
        for request in requests:
            with self._lock:
                self.stream_requests.append(request)
            kind = request.WhichOneof("request")
            if kind == "control":
                continue
            chunk = getattr(request, kind)
            modality = {"audio": pb.MODALITY_AUDIO, "frame": pb.MODALITY_VIDEO, "text": pb.MODALITY_TEXT}[kind]
            received[modality] = received.get(modality, 0) + 1
            if kind == "text" and b"bad" in chunk.text:
                failed[modality] = failed.get(modality, 0) + 1
                error = pb.ChunkError(
                    modality=modality,
                    sequence_number=chunk.sequence_number,
                    reason=pb.CHUNK_ERROR_REASON_DECODE_FAILED,
                    message="text is not valid",
                    model="minilm_embedding",
                )
                yield pb.StreamResponse(errors=[error])
                continue
            pending.append((modality, chunk.sequence_number))
            self.max_pending = max(self.max_pending, len(pending))
            if len(pending) >= self.window:
                yield self._ack_all(pending, acked)
            if self.end_streams_after_chunks is not None and sum(received.values()) >= self.end_streams_after_chunks:
                if pending:
                    yield self._ack_all(pending, acked)
                with self._lock:
                    self.streams_ended_by_server += 1
                yield pb.StreamResponse(stream_end=pb.StreamEnd(reason=pb.STREAM_END_REASON_MAX_DURATION))
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the stream reached its maximum duration")
        if pending:
            yield self._ack_all(pending, acked)
        totals = [
            pb.ModalityTotals(
                modality=modality,
                chunks_received=received[modality],
                chunks_acked=acked.get(modality, 0),
                chunks_failed=failed.get(modality, 0),
            )
            for modality in sorted(received)
        ]
        yield pb.StreamResponse(
            stream_end=pb.StreamEnd(
                totals=totals, results_sent=sum(acked.values()), reason=pb.STREAM_END_REASON_INPUT_ENDED
            )
        )

    @staticmethod
    def _ack_all(pending: list[tuple[int, int]], acked: dict[int, int]) -> pb.StreamResponse:
        response = pb.StreamResponse()
        for modality, number in pending:
            result = response.results.add(
                modality=modality, first_sequence_number=number, last_sequence_number=number, is_final=True
            )
            if modality == pb.MODALITY_AUDIO:
                result.model = "silero_vad"
                result.speech.event_type = pb.SPEECH_EVENT_TYPE_ACTIVITY
                result.speech.speech_probability = 0.25
            elif modality == pb.MODALITY_VIDEO:
                result.model = "hog_people"
                result.detections.detections.add(label="person", score=1.0)
            else:
                result.model = "minilm_embedding"
                result.embedding.values.extend([0.1] * 4)
            response.acks.add(modality=modality, first_sequence_number=number, last_sequence_number=number)
            acked[modality] = acked.get(modality, 0) + 1
        pending.clear()
        return response


class FakeServer:
    """A real gRPC server on 127.0.0.1 with ``FakeInferenceService``; use as a context manager.

    With ``server_credentials`` the port speaks TLS only.
    """

    def __init__(self, window: int = 4, *, server_credentials: grpc.ServerCredentials | None = None) -> None:
        self.service = FakeInferenceService(window)
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_InferenceServiceServicer_to_server(self.service, self._server)
        if server_credentials is None:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self._server.add_secure_port("127.0.0.1:0", server_credentials)
        self.target = f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None).wait()


def write_wav(path, *, rate: int, channels: int, frames: int, sample_width: int = 2) -> None:
    """Write a WAV file whose sample values count up, so chunk contents are checkable."""
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(sample_width)
        writer.setframerate(rate)
        data = bytearray()
        for index in range(frames * channels):
            value = index % (2 ** (8 * sample_width - 1))
            data += value.to_bytes(sample_width, "little", signed=sample_width > 1)
        writer.writeframes(bytes(data))
