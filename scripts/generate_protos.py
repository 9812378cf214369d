"""Generate the Python code and typed stubs for the protos under protos/.

Run from anywhere: ``python scripts/generate_protos.py``. With ``--out DIR``
the code goes to DIR instead of client_sdk/, which the staleness test uses.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
DEFAULT_OUT = REPO_ROOT / "client_sdk"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc with the grpc and mypy-protobuf plugins; return the written files."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins are console scripts beside this interpreter,
    # which need not be on PATH when the venv is not activated.
    bin_dir = pathlib.Path(sys.executable).parent
    protos = [str(path.relative_to(PROTO_ROOT)) for path in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")

    written = []
    for proto in protos:
        stem = pathlib.Path(proto).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            written.append(out_dir / f"{stem}{suffix}")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output root (default: client_sdk/)")
    options = parser.parse_args()
    for path in generate(options.out):
        print(path.relative_to(options.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
