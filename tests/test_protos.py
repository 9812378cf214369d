"""The committed generated code matches protos/, and the proto passes buf lint."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_generator():
    spec = importlib.util.spec_from_file_location("generate_protos", REPO_ROOT / "scripts" / "generate_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    generator = _load_generator()
    fresh_files = generator.generate(tmp_path)
    assert fresh_files, "no .proto files found under protos/"
    stale = []
    for fresh in fresh_files:
        relative = fresh.relative_to(tmp_path)
        committed = REPO_ROOT / "client_sdk" / relative
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(str(relative))
    assert not stale, f"generated code is stale, run `make protos`: {stale}"


def test_installed_stubs_match_committed() -> None:
    import streaminfer.v1.streaminfer_pb2 as installed

    committed = REPO_ROOT / "client_sdk" / "streaminfer" / "v1" / "streaminfer_pb2.py"
    assert pathlib.Path(installed.__file__).read_bytes() == committed.read_bytes()


def _buf() -> str | None:
    local = REPO_ROOT / "node_modules" / ".bin" / "buf"
    if local.exists():
        return str(local)
    return shutil.which("buf")


@pytest.mark.skipif(_buf() is None, reason="buf is not installed; `make test` installs it with npm")
def test_buf_lint_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
