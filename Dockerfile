# streaminfer server image: the built-in models on port 50051.
#
#   docker build -t streaminfer .
#   docker run --rm -p 50051:50051 streaminfer
#   docker run --rm --gpus all -p 50051:50051 streaminfer    # torch picks cuda:0 when it sees a GPU
#
# torch 2.11.0 from PyPI is a CUDA build, so the same image runs on CPU and GPU hosts.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app

# Dependencies first, so that code changes reuse this layer.
COPY client_sdk/pyproject.toml client_sdk/README.md client_sdk/
COPY client_sdk/streaminfer client_sdk/streaminfer
COPY pyproject.toml README.md ./
COPY server server
RUN pip install ./client_sdk . \
    && useradd --system --uid 10001 streaminfer

USER streaminfer
EXPOSE 50051

# The gRPC health service answers SERVING once the models are loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
sys.exit(g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=2).status != h.HealthCheckResponse.SERVING)"

STOPSIGNAL SIGTERM
CMD ["streaminfer", "serve", "--host", "0.0.0.0", "--port", "50051"]
