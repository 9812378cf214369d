# streaminfer developer commands. Everything installs into .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install demo test monitoring-tools protos lint-proto bench bench-suite bench-vad bench-goodput bench-observability bench-peer clean

help:
	@echo "make install     create .venv and install the server, SDK, load generator and dev tools"
	@echo "make demo        install, start the server, stream the sample media, print results"
	@echo "make test        install the dev dependencies and run the whole test suite"
	@echo "make monitoring-tools  install promtool and prometheus (Debian package) for tests/monitoring"
	@echo "make bench       run every benchmark and write BENCHMARKS.md (about 35 minutes)"
	@echo "make bench-suite side by side: served vs raw model, transport vs echo, vs a plain server, capacity"
	@echo "make bench-vad   real-time VAD streams, served against raw model throughput"
	@echo "make bench-goodput  goodput against offered load, admission control on and off"
	@echo "make bench-observability  throughput and latency with metrics and tracing on and off"
	@echo "make bench-peer  real-time VAD streams against Ray Serve with @serve.batch (installs Ray; needs root)"
	@echo "make protos      regenerate the Python code under client_sdk/streaminfer/v1"
	@echo "make lint-proto  run buf lint on protos/"

# The load generator goes in the same environment for the tests. hdrhistogram
# asks for setuptools>=83 and torch for setuptools<82; hdrhistogram uses
# neither at run time, so it goes in without its dependencies here. On its
# own (pip install ./loadtest, no torch) it installs normally.
$(STAMP): pyproject.toml client_sdk/pyproject.toml loadtest/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client_sdk -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'hdrhistogram==0.10.8' -e ./loadtest
	$(BIN)/python -m pip install --quiet 'matplotlib>=3.8' pillow
	touch $(STAMP)

install: $(STAMP)

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# tests/monitoring runs promtool and a real Prometheus, both from Debian's
# prometheus package; apt-get needs root, so others go through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

monitoring-tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; \
	fi

test: $(STAMP) node_modules/.bin/buf monitoring-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

protos: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

lint-proto: node_modules/.bin/buf
	node_modules/.bin/buf lint

bench: bench-suite bench-vad bench-goodput bench-observability bench-peer

bench-suite: $(STAMP)
	$(BIN)/python benchmarks/suite.py

bench-vad: $(STAMP)
	$(BIN)/python benchmarks/vad_streams.py

bench-goodput: $(STAMP)
	$(BIN)/python benchmarks/goodput.py

bench-observability: $(STAMP)
	$(BIN)/python benchmarks/observability_cost.py

# Ray stays out of the test environment's install; this target adds it.
bench-peer: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[peer]'
	$(BIN)/python benchmarks/ray_peer.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache
