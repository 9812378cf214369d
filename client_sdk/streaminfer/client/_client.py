"""The asyncio client: one channel, unary calls and stream sessions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from streaminfer.client._config import AudioFormat, VideoFormat
from streaminfer.client._errors import error_from_rpc_error
from streaminfer.client._options import DEFAULT_PORT, DEFAULT_TARGET, ClientOptions, create_channel
from streaminfer.client._session import StreamSession
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

__all__ = ["AsyncClient"]

logger = logging.getLogger(__name__)

_Response = TypeVar("_Response")


def with_default_port(target: str) -> str:
    """Return ``target`` with the server's default port when it names none.

    gRPC itself would otherwise dial port 443 for a bare host name.
    """
    if "://" in target or target.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return target
    if target.startswith("["):
        return target if "]:" in target else f"{target}:{DEFAULT_PORT}"
    if target.count(":") > 1:
        return f"[{target}]:{DEFAULT_PORT}"  # a bare IPv6 address
    if ":" in target:
        return target
    return f"{target}:{DEFAULT_PORT}"


class AsyncClient:
    """A client of one streaminfer server, for use in a running event loop.

    Use it as ``async with AsyncClient("127.0.0.1:50051") as client``, or call
    ``close()``. The channel opens on first use, on the event loop of that
    call; every later call must run on the same loop. Errors are raised as
    ``StreaminferError`` subclasses with the gRPC code and the server's message.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        options: ClientOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = with_default_port(target)
        self.options = options or ClientOptions()
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceServiceStub | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls and streams still running are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def _get_stub(self) -> pb_grpc.InferenceServiceStub:
        if self._closed:
            raise RuntimeError("the client is closed; create a new client")
        if self._stub is None:
            self._channel = create_channel(self.target, self.options, self._credentials)
            self._stub = pb_grpc.InferenceServiceStub(self._channel)
            logger.debug("opened channel to %s", self.target)
        return self._stub

    async def _unary(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: object,
        timeout: float | None,
    ) -> _Response:
        try:
            return await method(
                request,
                timeout=timeout if timeout is not None else self.options.unary_timeout_s,
                metadata=self.options.metadata or None,
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc_error(error) from error

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Return the models the server serves.

        ``timeout`` is in seconds; None uses ``options.unary_timeout_s``.
        """
        stub = self._get_stub()
        response: pb.ListModelsResponse = await self._unary(stub.ListModels, pb.ListModelsRequest(), timeout)
        return list(response.models)

    async def get_model(self, name: str, *, timeout: float | None = None) -> pb.ModelInfo:
        """Return one model's metadata; raises ``NotFoundError`` for an unknown name."""
        stub = self._get_stub()
        response: pb.GetModelResponse = await self._unary(stub.GetModel, pb.GetModelRequest(name=name), timeout)
        return response.model

    async def infer(
        self,
        model: str,
        *,
        text: str | None = None,
        audio: bytes | None = None,
        audio_format: AudioFormat | None = None,
        image: bytes | None = None,
        video_format: VideoFormat | None = None,
        tensor: pb.Tensor | None = None,
        timeout: float | None = None,
    ) -> list[pb.StreamResult]:
        """Run ``model`` on one input and return every result it produced.

        Give exactly one of ``text``, ``audio`` (a whole clip, with
        ``audio_format``), ``image`` (one picture; ``video_format`` defaults to
        JPEG) or ``tensor``.
        """
        request = build_infer_request(
            model,
            text=text,
            audio=audio,
            audio_format=audio_format,
            image=image,
            video_format=video_format,
            tensor=tensor,
        )
        stub = self._get_stub()
        response: pb.InferResponse = await self._unary(stub.Infer, request, timeout)
        return list(response.results)

    async def open_stream(
        self,
        config: pb.StreamConfig,
        *,
        timeout: float | None = None,
        max_chunks_in_flight: int | None = None,
    ) -> StreamSession:
        """Open a stream, send ``config`` and wait until the server accepts it.

        ``timeout`` is a deadline for the whole stream in seconds; None means
        none. ``max_chunks_in_flight`` lowers the server's window, for example
        to measure latency without queueing. Build ``config`` with
        ``stream_config``. Raises the SDK error for the server's status when it
        rejects the config.
        """
        stub = self._get_stub()
        call = stub.Stream(timeout=timeout, metadata=self.options.metadata or None)
        try:
            return await StreamSession.open(call, config, max_chunks_in_flight=max_chunks_in_flight)
        except BaseException:
            call.cancel()
            raise


def build_infer_request(
    model: str,
    *,
    text: str | None = None,
    audio: bytes | None = None,
    audio_format: AudioFormat | None = None,
    image: bytes | None = None,
    video_format: VideoFormat | None = None,
    tensor: pb.Tensor | None = None,
) -> pb.InferRequest:
    """Build an ``InferRequest``; raises ValueError unless exactly one input is given."""
    inputs = {"text": text, "audio": audio, "image": image, "tensor": tensor}
    given = [name for name, value in inputs.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"infer needs exactly one of text, audio, image or tensor; got {', '.join(given) or 'none'}")

    request = pb.InferRequest(model=model)
    if text is not None:
        request.text = text
    elif audio is not None:
        if audio_format is None:
            raise ValueError("audio_format is missing: infer with audio needs its sample rate and encoding")
        request.audio_content = audio
        request.audio_format.CopyFrom(audio_format.to_proto())
    elif image is not None:
        request.image_content = image
        request.video_format.CopyFrom((video_format or VideoFormat()).to_proto())
    elif tensor is not None:
        request.tensor.CopyFrom(tensor)
    return request
