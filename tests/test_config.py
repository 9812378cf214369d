"""Config files and serve flags are checked before anything starts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from streaminfer.server.config import ConfigError, default_config_text, load_config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_default_config_loads() -> None:
    config = load_config(None)
    assert [model.name for model in config.models] == ["silero_vad", "minilm_embedding", "hog_people", "haar_faces"]
    assert config.models[0].batching.max_batch_size == 256
    assert config.limits.max_chunks_in_flight == 64


def test_busy_fraction_out_of_range_is_rejected(tmp_path) -> None:
    assert load_config(None).admission.max_busy_fraction == 0.8
    text = default_config_text().replace("max_busy_fraction = 0.8", "max_busy_fraction = 80")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert "admission.max_busy_fraction = 80 is invalid: expected a fraction from 0 to 1 (0 turns it off)" in str(
        error.value
    )


def test_misspelled_key_is_rejected(tmp_path) -> None:
    text = default_config_text().replace("max_batch_size = 256", "max_batch_sise = 256")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert "'max_batch_sise'" in str(error.value)
    assert "max_batch_size" in str(error.value)


def test_unknown_table_is_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, default_config_text() + "\n[serverr]\nport = 1\n"))
    assert "'serverr'" in str(error.value)


def test_config_without_models_is_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "[server]\nport = 50051\n"))
    assert "models is empty" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 99999}, "server.port = 99999 is invalid"),
        ({"decode_threads": 0}, "server.decode_threads = 0 is invalid"),
        ({"torch_threads": -3}, "server.torch_threads = -3 is invalid"),
    ],
)
def test_flag_overrides_are_checked(overrides, message) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_flag_override_applies() -> None:
    config = load_config(None, {"port": 0, "decode_threads": 3, "host": None})
    assert config.port == 0
    assert config.decode_threads == 3
    assert config.host == "127.0.0.1"


def test_serve_rejects_bad_flag_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.port = 99999 is invalid" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_busy_port_fails_before_loading_models() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "streaminfer.server.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert "loaded model" not in result.stderr, f"models were loaded first ({elapsed:.1f} s)"


def test_noop_model_kind_is_accepted(tmp_path) -> None:
    config = load_config(write(tmp_path, '[[models]]\nname = "echo"\nkind = "noop"\nmodality = "text"\n'))
    assert config.models[0].kind == "noop"
    assert config.models[0].modality == "text"
