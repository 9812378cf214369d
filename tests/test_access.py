"""API keys, TLS and mutual TLS against real servers, and the rate limiter's token buckets."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import MEDIA, ServerThread, loopback_config
from streamutil import audio_requests, collect, read_wav, vad_config
from streaminfer.server.access import (
    API_KEY_METADATA,
    ApiKeyInterceptor,
    RateLimiter,
    load_api_keys,
    peer_host,
    server_credentials,
)
from streaminfer.server.app import StreaminferServer
from streaminfer.server.config import AuthConfig, ConfigError, RateLimitConfig, ServerConfig
from streaminfer.v1 import streaminfer_pb2 as pb
from streaminfer.v1 import streaminfer_pb2_grpc as pb_grpc

API_KEY = "test-key-0f3a9c"
WRONG_KEY = "test-key-0f3a9d"


# Certificates -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    # A CA the server does not trust, and a client certificate it signed.
    other_ca: pathlib.Path
    stranger_cert: pathlib.Path
    stranger_key: pathlib.Path


def _openssl(*arguments: str | pathlib.Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


def _new_ca(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
    )  # fmt: skip
    return cert, key


def _signed(
    folder: pathlib.Path, name: str, ca: tuple[pathlib.Path, pathlib.Path], extensions: str
) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key, request, extfile = (folder / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    extfile.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extfile,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; the TLS tests generate their certificates with it")
    folder = tmp_path_factory.mktemp("tls")
    ca = _new_ca(folder, "test-ca")
    server = _signed(folder, "server", ca, "subjectAltName = IP:127.0.0.1, DNS:localhost\nextendedKeyUsage = serverAuth\n")
    client = _signed(folder, "client", ca, "extendedKeyUsage = clientAuth\n")
    other_ca = _new_ca(folder, "other-ca")
    stranger = _signed(folder, "stranger", other_ca, "extendedKeyUsage = clientAuth\n")
    return Certificates(ca[0], server[0], server[1], client[0], client[1], other_ca[0], stranger[0], stranger[1])


# Servers ----------------------------------------------------------------------


def _vad_only(config: ServerConfig) -> ServerConfig:
    return dataclasses.replace(config, models=tuple(model for model in config.models if model.name == "silero_vad"))


@pytest.fixture(scope="module")
def secured_server(certificates: Certificates) -> Iterator[ServerThread]:
    """TLS without client certificates, and an API key."""
    config = dataclasses.replace(
        _vad_only(loopback_config()),
        auth=AuthConfig(api_keys=(API_KEY,)),
        tls_cert_file=str(certificates.server_cert),
        tls_key_file=str(certificates.server_key),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def mutual_tls_server(certificates: Certificates) -> Iterator[ServerThread]:
    """TLS that requires a client certificate signed by the test CA, without API keys."""
    config = dataclasses.replace(
        _vad_only(loopback_config()),
        tls_cert_file=str(certificates.server_cert),
        tls_key_file=str(certificates.server_key),
        tls_client_ca_file=str(certificates.ca),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def _tls_channel(
    server: ServerThread, certificates: Certificates, client: tuple[pathlib.Path, pathlib.Path] | None = None
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certificates.ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None,
    )
    return grpc.secure_channel(server.target, credentials)


@pytest.fixture
def secured_channel(secured_server: ServerThread, certificates: Certificates) -> Iterator[grpc.Channel]:
    with _tls_channel(secured_server, certificates) as channel:
        yield channel


def _key(value: str) -> list[tuple[str, str]]:
    return [(API_KEY_METADATA, value)]


def _status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


# API keys against the server --------------------------------------------------


@pytest.mark.parametrize("metadata", [None, _key(WRONG_KEY), _key("")], ids=["no key", "wrong key", "empty key"])
def test_unary_calls_need_the_key(secured_channel: grpc.Channel, metadata) -> None:
    stub = pb_grpc.InferenceServiceStub(secured_channel)

    for call in (
        lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=metadata),
        lambda: stub.GetModel(pb.GetModelRequest(name="silero_vad"), timeout=5, metadata=metadata),
        lambda: stub.Infer(pb.InferRequest(model="minilm_embedding", text="hello"), timeout=5, metadata=metadata),
    ):
        error = _status_of(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert API_KEY_METADATA in error.details()
        assert WRONG_KEY not in error.details()


@pytest.mark.parametrize("metadata", [None, _key(WRONG_KEY)], ids=["no key", "wrong key"])
def test_stream_needs_the_key(secured_channel: grpc.Channel, metadata) -> None:
    stub = pb_grpc.InferenceServiceStub(secured_channel)
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    requests = [pb.StreamRequest(config=vad_config(rate)), *audio_requests(samples[:rate], rate)]

    error = _status_of(lambda: list(stub.Stream(iter(requests), timeout=30, metadata=metadata)))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert API_KEY_METADATA in error.details()
    assert WRONG_KEY not in error.details()


def test_missing_and_wrong_keys_get_different_messages(secured_channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(secured_channel)

    missing = _status_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))
    wrong = _status_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=_key(WRONG_KEY)))

    assert "requires an API key" in missing.details()
    assert "not accepted" in wrong.details()


def test_right_key_lists_models(secured_channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(secured_channel)

    response = stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=_key(API_KEY))

    assert [model.name for model in response.models] == ["silero_vad"]


def test_right_key_streams(secured_channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(secured_channel)
    samples, rate = read_wav(MEDIA / "audio" / "Front_Center.wav")
    chunks = audio_requests(samples[:rate], rate)
    requests = [pb.StreamRequest(config=vad_config(rate)), *chunks]

    outcome = collect(stub.Stream(iter(requests), timeout=60, metadata=_key(API_KEY)))

    assert outcome.end is not None
    assert outcome.errors == []
    assert outcome.answered(pb.MODALITY_AUDIO) == list(range(len(chunks)))


def test_health_and_reflection_need_no_key(secured_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(secured_channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured_channel)

    status = health.Check(health_pb2.HealthCheckRequest(service="streaminfer.v1.InferenceService"), timeout=5)
    listed = next(
        reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )

    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert "streaminfer.v1.InferenceService" in {service.name for service in listed.list_services_response.service}


# TLS against the server -------------------------------------------------------


def test_plaintext_client_fails_on_tls_port(secured_server: ServerThread) -> None:
    with grpc.insecure_channel(secured_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        error = _status_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_untrusted_server_ca_fails(secured_server: ServerThread, certificates: Certificates) -> None:
    # Trusts only the other CA, which did not sign the server's certificate.
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates.other_ca.read_bytes())
    with grpc.secure_channel(secured_server.target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        error = _status_of(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_ca_accepted(mutual_tls_server: ServerThread, certificates: Certificates) -> None:
    with _tls_channel(mutual_tls_server, certificates, (certificates.client_cert, certificates.client_key)) as channel:
        response = pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)

    assert [model.name for model in response.models] == ["silero_vad"]


@pytest.mark.parametrize("client", ["none", "stranger"])
def test_client_without_ca_certificate_fails(
    mutual_tls_server: ServerThread, certificates: Certificates, client: str
) -> None:
    pair = (certificates.stranger_cert, certificates.stranger_key) if client == "stranger" else None
    with _tls_channel(mutual_tls_server, certificates, pair) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        error = _status_of(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5))

    assert error.code() == grpc.StatusCode.UNAVAILABLE


# Configuration errors ---------------------------------------------------------


def test_keys_come_from_config_and_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# staging clients\n\n  key-b  \nkey-c\n#key-d\n   \n")

    keys = load_api_keys(AuthConfig(api_keys=("key-a",), api_keys_file=str(path)))

    assert keys == {"key-a", "key-b", "key-c"}


def test_no_keys_turns_authentication_off() -> None:
    keys = load_api_keys(AuthConfig())

    assert keys == frozenset()
    assert not ApiKeyInterceptor(keys).enabled
    assert ApiKeyInterceptor(keys).accepts(None)


def test_interceptor_accepts_only_configured_keys() -> None:
    interceptor = ApiKeyInterceptor({"key-a", "key-b"})

    assert interceptor.accepts("key-a")
    assert interceptor.accepts("key-b")
    assert not interceptor.accepts("key-")
    assert not interceptor.accepts("key-ab")
    assert not interceptor.accepts("")
    assert not interceptor.accepts(None)


def test_missing_key_file_names_the_path(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent-keys"

    with pytest.raises(ConfigError) as error:
        StreaminferServer(dataclasses.replace(loopback_config(), auth=AuthConfig(api_keys_file=str(path))))

    assert "auth.api_keys_file" in str(error.value)
    assert str(path) in str(error.value)


def test_empty_key_file_rejected(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# no keys yet\n\n")

    with pytest.raises(ConfigError) as error:
        load_api_keys(AuthConfig(api_keys_file=str(path)))

    assert "contains no API key" in str(error.value)
    assert str(path) in str(error.value)


def test_no_certificate_means_plaintext() -> None:
    assert server_credentials(ServerConfig()) is None


@pytest.mark.parametrize("missing", ["tls_cert_file", "tls_key_file", "tls_client_ca_file"])
def test_missing_tls_file_names_path(
    certificates: Certificates, tmp_path: pathlib.Path, missing: str
) -> None:
    files = {
        "tls_cert_file": str(certificates.server_cert),
        "tls_key_file": str(certificates.server_key),
        "tls_client_ca_file": str(certificates.ca),
        missing: str(tmp_path / "absent.pem"),
    }

    with pytest.raises(ConfigError) as error:
        server_credentials(ServerConfig(**files))

    assert f"server.{missing} = '{tmp_path / 'absent.pem'}'" in str(error.value)


def test_unusable_tls_files_rejected(certificates: Certificates, tmp_path: pathlib.Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", certificates.server_key, "-aes256", "-passout", "pass:secret", "-out", encrypted)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    cert, key = str(certificates.server_cert), str(certificates.server_key)

    cases = {
        "contains an encrypted private key": dict(tls_cert_file=cert, tls_key_file=str(encrypted)),
        "not a usable certificate and key": dict(tls_cert_file=cert, tls_key_file=str(certificates.client_key)),
        "not a usable certificate": dict(tls_cert_file=str(not_pem), tls_key_file=key),
        "is not a usable CA": dict(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=str(not_pem)),
    }
    for expected, files in cases.items():
        with pytest.raises(ConfigError) as error:
            server_credentials(ServerConfig(**files))
        assert expected in str(error.value)


# Rate limiter -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, max_clients: int = 10_000, **limits: float) -> RateLimiter:
    return RateLimiter(RateLimitConfig(**limits), api_keys=("key-a",), clock=clock, max_clients=max_clients)


def test_stream_bucket_burst_then_pushback() -> None:
    clock = FakeClock()
    limits = limiter(clock, streams_per_second=2.0, stream_burst=3)

    assert [limits.admit_stream("a") for _ in range(3)] == [None, None, None]
    assert limits.tokens("a") == (0.0, None)
    assert limits.admit_stream("a") == 0.5

    clock.advance(0.25)
    assert limits.tokens("a") == (0.5, None)
    assert limits.admit_stream("a") == 0.25

    clock.advance(0.25)
    assert limits.admit_stream("a") is None
    assert limits.tokens("a") == (0.0, None)


def test_bucket_refill_caps_at_burst() -> None:
    clock = FakeClock()
    limits = limiter(clock, streams_per_second=2.0, stream_burst=3)
    limits.admit_stream("a")

    clock.advance(60.0)

    assert limits.tokens("a") == (3.0, None)
    assert [limits.admit_stream("a") for _ in range(4)] == [None, None, None, 0.5]


def test_burst_zero_uses_rate() -> None:
    clock = FakeClock()
    slow = limiter(clock, streams_per_second=0.5)
    fast = limiter(clock, streams_per_second=4.0)

    assert [slow.admit_stream("a") for _ in range(2)] == [None, 2.0]
    assert [fast.admit_stream("a") for _ in range(5)] == [None, None, None, None, 0.25]


def test_waiting_the_pushback_is_enough() -> None:
    clock = FakeClock()
    limits = limiter(clock, streams_per_second=10.0, stream_burst=1)
    assert limits.admit_stream("a") is None

    for _ in range(50):
        pushback = limits.admit_stream("a")
        assert pushback is not None
        clock.advance(pushback)
        assert limits.admit_stream("a") is None


def test_chunk_bucket() -> None:
    clock = FakeClock()
    limits = limiter(clock, chunks_per_second=4.0, chunk_burst=2)

    assert [limits.admit_chunk("a") for _ in range(3)] == [True, True, False]
    assert limits.tokens("a") == (None, 0.0)
    clock.advance(0.25)
    assert [limits.admit_chunk("a") for _ in range(2)] == [True, False]
    assert limits.admit_stream("a") is None


def test_zero_rates_are_unlimited() -> None:
    clock = FakeClock()
    limits = limiter(clock)

    assert all(limits.admit_stream("a") is None for _ in range(1000))
    assert all(limits.admit_chunk("a") for _ in range(1000))
    assert not limits.enabled
    assert len(limits) == 0


def test_clients_have_their_own_buckets() -> None:
    clock = FakeClock()
    limits = limiter(clock, streams_per_second=1.0)

    assert limits.admit_stream("a") is None
    assert limits.admit_stream("a") == 1.0
    assert limits.admit_stream("b") is None


def test_least_recent_client_evicted() -> None:
    clock = FakeClock()
    limits = limiter(clock, max_clients=2, streams_per_second=1.0)
    limits.admit_stream("a")
    limits.admit_stream("b")
    limits.admit_stream("a")

    limits.admit_stream("c")

    assert len(limits) == 2
    assert limits.tokens("b") == (None, None)
    assert limits.tokens("a") == (0.0, None)
    assert limits.admit_stream("b") is None
    assert limits.tokens("a") == (None, None)


def test_client_key_prefers_accepted_key() -> None:
    limits = limiter(FakeClock())

    by_key = limits.client_key(_key("key-a"), "ipv4:10.0.0.7:41000")
    same_key_elsewhere = limits.client_key(_key("key-a"), "ipv4:10.0.0.8:41001")
    unknown_key = limits.client_key(_key("made-up"), "ipv4:10.0.0.7:41000")

    assert by_key == same_key_elsewhere
    assert by_key.startswith("key:")
    assert "key-a" not in by_key
    assert unknown_key == "peer:10.0.0.7"
    assert limits.client_key(None, "ipv4:10.0.0.7:41002") == "peer:10.0.0.7"
    # Messages name what the limit is keyed on; without an accepted key that is the address.
    assert limits.describe_client(by_key) == "this client's API key"
    assert limits.describe_client(unknown_key) == "this client's address (10.0.0.7)"


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:50000", "127.0.0.1"),
        ("ipv6:[::1]:50000", "::1"),
        ("ipv6:%5B::1%5D:50000", "::1"),
        ("unix:/run/streaminfer.sock", "unix:/run/streaminfer.sock"),
    ],
)
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host
