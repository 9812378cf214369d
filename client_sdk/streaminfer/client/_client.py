"""The asyncio client: one channel, unary calls and stream sessions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from streaminfer.client._config import AudioFormat, VideoFormat
from streaminfer.client._errors import RpcError, error_from_rpc_error
from streaminfer.client._options import (
    API_KEY_METADATA_KEY,
    DEFAULT_PORT,
    DEFAULT_TARGET,
    ClientOptions,
    create_channel,
)
from streaminfer.client._retry import Retrier, RetryPolicy
from streaminfer.client._session import StreamCall, StreamSession, accept_stream
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


def is_loopback_target(target: str) -> bool:
    """True for a target on this machine: a loopback address, localhost or a Unix socket."""
    if target.startswith("unix:"):
        return True
    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:").lstrip("/")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    else:
        host = host.rpartition(":")[0] or host
    return host == "localhost" or host == "::1" or host.startswith("127.")


class AsyncClient:
    """A client of one streaminfer server, for use in a running event loop.

    Use it as ``async with AsyncClient("127.0.0.1:50051") as client``, or call
    ``close()``. The channel opens on first use, on the event loop of that
    call; every later call must run on the same loop. Errors are raised as
    ``StreaminferError`` subclasses with the gRPC code and the server's message.

    ``credentials`` turns on TLS (see ``tls_credentials``). Without it, a call
    that finally fails because the server closed the connection ("Socket
    closed") logs a warning that a TLS server needs credentials. ``api_key``
    is sent in the ``x-api-key`` metadata of every call. ``retry_policy`` sets
    how unary calls and stream setup rejected with UNAVAILABLE or
    RESOURCE_EXHAUSTED are retried; the default is ``RetryPolicy()``.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        options: ClientOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.target = with_default_port(target)
        self.options = options or ClientOptions()
        self.retry_policy = retry_policy or RetryPolicy()
        self._credentials = credentials
        self._metadata = _call_metadata(self.options, api_key)
        self._retrier = Retrier(self.retry_policy, failure_hint=self._failure_hint)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.InferenceServiceStub | None = None
        self._closed = False
        self._tls_hint_given = False
        if api_key and credentials is None and not is_loopback_target(self.target):
            logger.warning(
                "the API key will be sent to %s without TLS, readable by anyone on the network path", self.target
            )

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

    def _failure_hint(self, error: RpcError) -> str:
        """Return advice for the error a call finally failed with, or an empty string.

        The TLS advice is given once per client, so that a client whose calls
        all fail the same way logs it once.
        """
        if (
            self._credentials is None
            and not self._tls_hint_given
            and error.code == grpc.StatusCode.UNAVAILABLE
            and "Socket closed" in error.details
        ):
            # A TLS server closes a plaintext connection during the handshake.
            # So does a server that is restarting, so such calls are still retried.
            self._tls_hint_given = True
            return (
                f"this client connects to {self.target} without TLS, and a server that uses TLS closes such "
                "connections: if it does, pass credentials=tls_credentials(...) to the client, with ca_file "
                "for a server certificate from a private CA"
            )
        return ""

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
        name: str,
    ) -> _Response:
        async def attempt(attempt_timeout: float | None) -> _Response:
            try:
                return await method(request, timeout=attempt_timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as error:
                raise error_from_rpc_error(error) from error

        deadline = self._retrier.deadline(timeout if timeout is not None else self.options.unary_timeout_s)
        return await self._retrier.run(attempt, name=name, deadline=deadline)

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """Return the models the server serves.

        ``timeout`` is in seconds, retries included; None uses ``options.unary_timeout_s``.
        """
        stub = self._get_stub()
        response: pb.ListModelsResponse = await self._unary(
            stub.ListModels, pb.ListModelsRequest(), timeout, "ListModels"
        )
        return list(response.models)

    async def get_model(self, name: str, *, timeout: float | None = None) -> pb.ModelInfo:
        """Return one model's metadata; raises ``NotFoundError`` for an unknown name."""
        stub = self._get_stub()
        response: pb.GetModelResponse = await self._unary(
            stub.GetModel, pb.GetModelRequest(name=name), timeout, "GetModel"
        )
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
        response: pb.InferResponse = await self._unary(stub.Infer, request, timeout, "Infer")
        return list(response.results)

    async def open_stream(
        self,
        config: pb.StreamConfig,
        *,
        timeout: float | None = None,
        max_chunks_in_flight: int | None = None,
        roll_over: bool = False,
    ) -> StreamSession:
        """Open a stream, send ``config`` and wait until the server accepts it.

        ``timeout`` is a deadline for the whole session in seconds, setup
        retries and roll-overs included; None means none.
        ``max_chunks_in_flight`` lowers the server's window, for example to
        measure latency without queueing. Build ``config`` with
        ``stream_config``. Setup is retried under the client's retry policy
        until the server sends ``SessionAccepted``, never after. Raises the SDK
        error for the server's status when it rejects the config.

        With ``roll_over``, the session goes on in a new stream with the same
        config when the server ends the stream with reason DRAINING or
        MAX_DURATION, or after IDLE_TIMEOUT when the session sends again. It
        resends the unanswered chunks there and emits ``StreamRolledOver``.
        """
        stub = self._get_stub()
        deadline = self._retrier.deadline(timeout)

        async def attempt(attempt_timeout: float | None) -> tuple[StreamCall, pb.StreamResponse]:
            call = stub.Stream(timeout=attempt_timeout, metadata=self._metadata)
            try:
                return call, await accept_stream(call, config)
            except BaseException:
                call.cancel()
                raise

        async def open_call() -> tuple[StreamCall, pb.StreamResponse]:
            return await self._retrier.run(attempt, name="Stream setup", deadline=deadline)

        call, response = await open_call()
        return StreamSession.start(
            call, response, max_chunks_in_flight=max_chunks_in_flight, reopen=open_call if roll_over else None
        )


def _call_metadata(options: ClientOptions, api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Return the metadata of every call: the options' entries and the API key; None for none."""
    metadata = list(options.metadata)
    if api_key is not None:
        if not api_key or api_key != api_key.strip():
            raise ValueError("api_key is invalid: expected a non-empty key without leading or trailing whitespace")
        metadata = [(key, value) for key, value in metadata if key.lower() != API_KEY_METADATA_KEY]
        metadata.append((API_KEY_METADATA_KEY, api_key))
    return tuple(metadata) or None


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
