"""Access control for the server: API keys, TLS credentials and rate limits.

API keys come from ``[auth]`` and are checked by :class:`ApiKeyInterceptor`
before any handler runs. TLS credentials come from the ``server.tls_*`` PEM
files. :class:`RateLimiter` keeps token buckets per client, and the service
calls it before opening a stream and before each chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import logging
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from streaminfer.server import metrics
from streaminfer.server.config import AuthConfig, ConfigError, RateLimitConfig, ServerConfig

logger = logging.getLogger(__name__)

API_KEY_METADATA = "x-api-key"

# Services that accept calls without an API key, because load balancers probe
# health and tools list the API through reflection.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

# Max clients whose buckets a RateLimiter keeps. Past this, the least recently
# seen client is forgotten and starts again with full buckets.
MAX_TRACKED_CLIENTS = 10_000

# Refill arithmetic in floating point can fall short of a whole token by a
# rounding error at the exact moment a pushback predicted one.
_ROUNDING = 1e-9

_MISSING_KEY_MESSAGE = (
    f"this server requires an API key: send it in the {API_KEY_METADATA} call metadata"
)
_WRONG_KEY_MESSAGE = (
    f"the API key in the {API_KEY_METADATA} call metadata is not accepted by this server: "
    "check the key with the server's operator (auth.api_keys or auth.api_keys_file)"
)


# API keys ---------------------------------------------------------------------


def load_api_keys(auth: AuthConfig) -> frozenset[str]:
    """Return the accepted API keys: ``auth.api_keys`` plus the lines of ``auth.api_keys_file``.

    In the file, surrounding whitespace is stripped, and blank lines and lines
    starting with ``#`` are skipped. An empty result means authentication is
    off. A file that cannot be read, or that contains no key, raises ConfigError.
    """
    keys = {key.strip() for key in auth.api_keys if key.strip()}
    if auth.api_keys_file:
        path = auth.api_keys_file
        try:
            with open(path, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(
                f"auth.api_keys_file = {path!r} cannot be read: {error}; "
                "point it at a readable UTF-8 file with one key per line"
            ) from error
        from_file = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
        if not from_file:
            raise ConfigError(
                f"auth.api_keys_file = {path!r} contains no API key: add one key per line, "
                "or unset auth.api_keys_file to serve without authentication"
            )
        keys |= from_file
    return frozenset(keys)


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str | None:
    """Return the first value of ``key`` in call metadata, or None when absent."""
    for name, value in metadata or ():
        if name.lower() == key:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


def _service_of(method: str) -> str:
    """Return the service of a method path: ``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.lstrip("/").partition("/")[0]


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """Build a handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED.

    The kind must match the method's, so that the server reads the request
    the way the client sends it, unary or streamed.
    """

    async def reject(request: Any, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming:
            # Take the first message: a client whose write is still under way
            # when the status arrives gets INTERNAL instead of UNAUTHENTICATED.
            await anext(aiter(request), None)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def reject_streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # An async generator, like the handlers it stands for: tracing's
        # interceptor iterates streaming handlers with ``async for``.
        await reject(request, context)
        yield  # never reached: reject() raises

    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject_streaming, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject_streaming, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(reject, deserializer, serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Ends calls that lack an accepted ``x-api-key`` with UNAUTHENTICATED.

    Calls to :data:`OPEN_SERVICES` pass without a key. With no keys,
    every call passes. Keys are compared in constant time, against every
    accepted key, so the comparison time does not depend on the key sent.
    """

    def __init__(self, api_keys: Iterable[str]) -> None:
        self._keys = tuple(key.encode("utf-8") for key in api_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str | None) -> bool:
        """Return whether ``presented`` is one of the accepted keys (True for any value when none are configured)."""
        if not self._keys:
            return True
        if presented is None:
            return False
        candidate = presented.encode("utf-8")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        if not self._keys or _service_of(method) in OPEN_SERVICES:
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        presented = metadata_value(metadata, API_KEY_METADATA)
        if self.accepts(presented):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            # Unknown method: the server returns UNIMPLEMENTED.
            return handler
        logger.info("rejected %s with UNAUTHENTICATED: %s API key", method, "missing" if presented is None else "invalid")
        if method.endswith("/Stream"):
            metrics.STREAMS_REJECTED.labels("unauthenticated").inc()
        return _rejecting_handler(handler, _MISSING_KEY_MESSAGE if presented is None else _WRONG_KEY_MESSAGE)


# TLS --------------------------------------------------------------------------


def _read_pem(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"server.{key} = {path!r} cannot be read: {error}; point it at a readable PEM file") from error


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """Return TLS credentials from the ``server.tls_*`` PEM files, or None when no certificate is set.

    With ``tls_client_ca_file`` set, clients must present a certificate
    signed by that CA. The files are read and parsed here, so a missing file,
    a file that is not PEM, or a key that does not match the certificate is a
    ConfigError that names the config key and the path.
    """
    if not config.tls_cert_file:
        return None
    cert = _read_pem("tls_cert_file", config.tls_cert_file)
    private_key = _read_pem("tls_key_file", config.tls_key_file)
    client_ca = _read_pem("tls_client_ca_file", config.tls_client_ca_file) if config.tls_client_ca_file else None

    def reject_encrypted_key() -> str:
        # Called by the ssl module only for an encrypted key.
        raise ConfigError(
            f"server.tls_key_file = {config.tls_key_file!r} contains an encrypted private key: gRPC needs it "
            "unencrypted (for example `openssl pkey -in KEY -out PLAIN_KEY`)"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=reject_encrypted_key)
    except ssl.SSLError as error:
        raise ConfigError(
            f"server.tls_cert_file = {config.tls_cert_file!r} and server.tls_key_file = {config.tls_key_file!r} "
            f"are not a usable certificate and key: {error}; expected a PEM certificate chain and "
            "the unencrypted PEM private key that belongs to it"
        ) from error
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(
                f"server.tls_client_ca_file = {config.tls_client_ca_file!r} is not a usable CA: {error}; "
                "expected one or more PEM CA certificates"
            ) from error

    return grpc.ssl_server_credentials(
        [(private_key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


# Rate limits ------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class TokenBucket:
    """A bucket of ``capacity`` tokens, refilled at ``rate`` per second. Each admission takes one token."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def available(self, now: float) -> float:
        """Return the tokens at ``now``, refill included, without changing the bucket."""
        return min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)

    def take(self, now: float) -> float | None:
        """Take a token; return None on success, else the seconds until one is available."""
        self.tokens = self.available(now)
        self.updated = max(self.updated, now)
        if self.tokens >= 1.0 - _ROUNDING:
            self.tokens = max(0.0, self.tokens - 1.0)
            return None
        return (1.0 - self.tokens) / self.rate


@dataclasses.dataclass(slots=True)
class _ClientBuckets:
    streams: TokenBucket | None
    chunks: TokenBucket | None


def bucket_capacity(rate: float, burst: int) -> float:
    """Return the tokens a bucket holds: the burst, or the rate (at least 1) when the burst is 0."""
    return float(burst) if burst > 0 else max(1.0, rate)


class RateLimiter:
    """Token buckets per client for new streams and for chunks, from ``[rate_limits]``.

    A rate of 0 turns that limit off. Buckets start full. At most
    ``max_clients`` clients are tracked. Past that, the least recently seen
    one is forgotten and comes back with full buckets. Not thread-safe: use it from
    the event loop. ``clock`` returns seconds (default: time.monotonic).
    """

    def __init__(
        self,
        config: RateLimitConfig,
        api_keys: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients = {max_clients!r} is invalid: expected an integer >= 1")
        self.config = config
        self._api_keys = frozenset(api_keys)
        self._clock = clock
        self._max_clients = max_clients
        self._clients: collections.OrderedDict[str, _ClientBuckets] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.config.streams_per_second > 0 or self.config.chunks_per_second > 0

    def __len__(self) -> int:
        """Return the number of clients tracked now."""
        return len(self._clients)

    def client_key(self, metadata: Sequence[tuple[str, Any]] | None, peer: str) -> str:
        """Name the client of a call: by its API key, else by its address without the port.

        ``metadata`` is the call's invocation metadata and ``peer`` is
        ``context.peer()``, such as ``ipv4:127.0.0.1:5000``. The key is
        used only when it is one of the accepted keys given to the
        constructor, so that without authentication a client cannot pick
        fresh buckets by sending made-up keys. The result contains a digest
        of the key, never the key, so it is safe to log.
        """
        presented = metadata_value(metadata, API_KEY_METADATA)
        if presented is not None and presented in self._api_keys:
            return "key:" + hashlib.sha256(presented.encode("utf-8")).hexdigest()[:16]
        return "peer:" + peer_host(peer)

    @staticmethod
    def describe_client(key: str) -> str:
        """Return how messages name the client of ``key``, from ``client_key``: its API key or its address."""
        if key.startswith("key:"):
            return "this client's API key"
        return f"this client's address ({key.removeprefix('peer:')})"

    def admit_stream(self, key: str) -> float | None:
        """Take a stream token for ``key``: None when the stream may start, else the seconds to wait."""
        buckets = self._buckets(key)
        if buckets is None or buckets.streams is None:
            return None
        return buckets.streams.take(self._clock())

    def admit_chunk(self, key: str) -> bool:
        """Take a chunk token for ``key``: whether the chunk may be processed."""
        return self.chunk_wait_s(key) is None

    def chunk_wait_s(self, key: str) -> float | None:
        """Take a chunk token for ``key``: None when the chunk may be processed, else the seconds to wait."""
        buckets = self._buckets(key)
        if buckets is None or buckets.chunks is None:
            return None
        return buckets.chunks.take(self._clock())

    def tokens(self, key: str) -> tuple[float | None, float | None]:
        """Return the stream and chunk tokens of ``key`` now, with None for a limit that is off or a client not tracked."""
        buckets = self._clients.get(key)
        if buckets is None:
            return (None, None)
        now = self._clock()
        return (
            buckets.streams.available(now) if buckets.streams is not None else None,
            buckets.chunks.available(now) if buckets.chunks is not None else None,
        )

    def _buckets(self, key: str) -> _ClientBuckets | None:
        if not self.enabled:
            return None
        buckets = self._clients.get(key)
        if buckets is not None:
            self._clients.move_to_end(key)
            return buckets
        now = self._clock()
        config = self.config
        buckets = _ClientBuckets(
            streams=self._new_bucket(config.streams_per_second, config.stream_burst, now),
            chunks=self._new_bucket(config.chunks_per_second, config.chunk_burst, now),
        )
        self._clients[key] = buckets
        if len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)
        return buckets

    @staticmethod
    def _new_bucket(rate: float, burst: int, now: float) -> TokenBucket | None:
        if rate <= 0:
            return None
        capacity = bucket_capacity(rate, burst)
        return TokenBucket(rate=rate, capacity=capacity, tokens=capacity, updated=now)


def peer_host(peer: str) -> str:
    """Return ``context.peer()`` without the port: ``ipv4:10.0.0.1:5000`` -> ``10.0.0.1``, ``ipv6:[::1]:5000`` -> ``::1``.

    Other forms (``unix:/path``) have no port and come back unchanged.
    """
    scheme, _, address = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return peer
    address = urllib.parse.unquote(address)
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, _, port = address.rpartition(":")
    return host if host and port.isdigit() else address
