"""The gRPC servicer of streaminfer.v1.InferenceService."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import grpc

from streaminfer.server.batcher import ModelRunner, QueueFull, WorkItem
from streaminfer.server.errors import StreaminferError
from streaminfer.server.executor import Executor
from streaminfer.server.models.base import StreamOptions, set_duration
from streaminfer.server.models.user import DATA_TYPES
from streaminfer.server.session import Session
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class InferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self.active_sessions: set[Session] = set()

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        # Written as an async generator: OpenTelemetry's grpc instrumentation
        # wraps streaming handlers that way, and context.write() breaks it.
        first = await anext(aiter(request_iterator), None)
        if first is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the stream ended before its first message; send a StreamRequest with config first",
            )
        kind = first.WhichOneof("request")
        if kind != "config":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first StreamRequest must carry config, got {kind or 'an empty message'}; send StreamConfig first",
            )
        try:
            session = Session(self._executor, first.config, context.peer())
        except StreaminferError as error:
            await context.abort(error.code, str(error))

        self.active_sessions.add(session)
        logger.info(
            "stream %s started: peer %s, models %s, label %r",
            session.stream_id,
            context.peer(),
            ",".join(model.model for model in first.config.models),
            first.config.label,
        )
        reader = asyncio.create_task(session.read(request_iterator), name=f"reader-{session.stream_id}")
        reader.add_done_callback(_log_reader_failure)
        outcome = "ok"
        try:
            yield session.accepted_message()
            async for response in session.responses():
                yield response
            if session.failure is not None:
                outcome = session.failure.code.name
                await context.abort(session.failure.code, str(session.failure))
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            reader.cancel()
            session.close()
            self.active_sessions.discard(session)
            logger.info("stream %s ended: %s", session.stream_id, outcome)

    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        runner = self._executor.runners.get(request.model)
        if runner is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model = {request.model!r} is not served; served models: {', '.join(self._executor.runners)}",
            )
        kind = request.WhichOneof("input")
        if kind == "tensor":
            return await self._infer_tensor(runner, request.tensor, context)
        modality = runner.model.info.modality
        expected = {pb.MODALITY_AUDIO: "audio_content", pb.MODALITY_VIDEO: "image_content", pb.MODALITY_TEXT: "text"}
        if kind != expected.get(modality, "tensor"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input = {kind or 'unset'} does not fit model {request.model!r}, which reads "
                f"{pb.Modality.Name(modality)}: set {expected.get(modality, 'tensor')}",
            )
        config = pb.StreamConfig(models=[pb.ModelSelection(model=request.model)])
        if request.HasField("audio_format"):
            config.audio_format.CopyFrom(request.audio_format)
        if request.HasField("video_format"):
            config.video_format.CopyFrom(request.video_format)
        try:
            session = Session(self._executor, config, context.peer())
        except StreaminferError as error:
            await context.abort(error.code, str(error))

        try:
            await session.read(_one_shot_requests(request, kind, self._executor.config.limits.max_audio_chunk_bytes))
            response = pb.InferResponse()
            async for message in session.responses():
                response.results.extend(message.results)
                if message.errors:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message.errors[0].message)
            if session.failure is not None:
                await context.abort(session.failure.code, str(session.failure))
            return response
        finally:
            session.close()

    async def _infer_tensor(
        self, runner: ModelRunner, tensor: pb.Tensor, context: grpc.aio.ServicerContext
    ) -> pb.InferResponse:
        """Run a user model on one raw tensor through its batcher."""
        input_from_tensor = getattr(runner.model, "input_from_tensor", None)
        if input_from_tensor is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input = tensor does not fit model {runner.config.name!r}: raw tensors go to user models only "
                "(kind torchscript or torch_export)",
            )
        try:
            model_input = await self._executor.decode.run(input_from_tensor, tensor)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))

        owner = _OneShot(StreamOptions(stream_id=f"infer-{secrets.token_hex(4)}", interim_results=False))
        item = WorkItem(owner=owner, slot=None, model_input=model_input, index=0, inference_state=None, preprocess_state=None)
        try:
            runner.submit([item])
            done = await owner.done
        except QueueFull as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{error}; retry later")
        finally:
            owner.closed = True
        if done.error is not None:
            await context.abort(
                grpc.StatusCode.INTERNAL, f"model {runner.config.name!r} failed: {type(done.error).__name__}: {done.error}"
            )
        for result in done.results:
            result.model = runner.config.name
            result.modality = runner.model.info.modality
        return pb.InferResponse(results=done.results)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(name) for name in self._executor.runners])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        if request.name not in self._executor.runners:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"name = {request.name!r} is not a served model; served models: {', '.join(self._executor.runners)}",
            )
        return pb.GetModelResponse(model=self._model_info(request.name))

    def _model_info(self, name: str) -> pb.ModelInfo:
        runner = self._executor.runners[name]
        info = runner.model.info
        message = pb.ModelInfo(
            name=name,
            modality=info.modality,
            description=runner.config.description or info.description,
            stateful=info.stateful,
            max_batch_size=runner.config.batching.max_batch_size,
            device=runner.device,
            instances=runner.config.instances,
            labels=list(info.labels),
        )
        set_duration(message.max_queue_delay, runner.config.batching.max_queue_delay_ms / 1000.0)
        if info.input_shape is not None:
            message.input.shape.extend(info.input_shape)
            data_type = DATA_TYPES.get(info.input_dtype or "")
            message.input.data_type = data_type.proto if data_type else pb.DATA_TYPE_UNSPECIFIED
        return message


async def _one_shot_requests(request: pb.InferRequest, kind: str, max_chunk_bytes: int) -> AsyncIterator[pb.StreamRequest]:
    """Turn a unary request into stream messages, splitting long audio at the chunk limit."""
    if kind == "audio_content":
        content = request.audio_content
        frame_bytes = 4 if request.audio_format.encoding == pb.AUDIO_ENCODING_FLOAT32 else 2
        frame_bytes *= max(1, request.audio_format.audio_channel_count)
        step = max(frame_bytes, max_chunk_bytes - max_chunk_bytes % frame_bytes)
        for sequence_number, offset in enumerate(range(0, max(len(content), 1), step)):
            yield pb.StreamRequest(
                audio=pb.AudioChunk(sequence_number=sequence_number, audio_content=content[offset : offset + step])
            )
    elif kind == "image_content":
        yield pb.StreamRequest(frame=pb.VideoFrame(sequence_number=0, image_content=request.image_content))
    else:
        yield pb.StreamRequest(text=pb.TextChunk(sequence_number=0, text=request.text.encode()))


class _OneShot:
    """The owner of a single work item from a unary call."""

    def __init__(self, options: StreamOptions) -> None:
        self.closed = False
        self.options = options
        self.done: asyncio.Future[WorkItem] = asyncio.get_running_loop().create_future()

    def on_items_done(self, slot: object, items: list[WorkItem]) -> None:
        if not self.done.done():
            self.done.set_result(items[0])


def _log_reader_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        logger.error("stream reader failed", exc_info=error)
