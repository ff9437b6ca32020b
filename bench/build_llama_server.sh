#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the very llama.cpp sources that the pinned llama-cpp-python vendors
# (its PyPI sdist), with the same native CPU flags, so the batching benchmark compares servers, not builds: as the
# Makefile builds llama-cpp-python, without llama.cpp's AMX kernels (see NO_AMX there: they fault under GCC).
# Output: bench/.llama-server/bin/llama-server (ignored by git). About 8 minutes on 2 cores, once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/.llama-server"
python="${PYTHON:-$here/../.venv/bin/python}"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
build="$version without AMX ${CMAKE_ARGS:-}"
[ -x "$out/bin/llama-server" ] && [ "$(cat "$out/VERSION" 2>/dev/null)" = "$build" ] && exit 0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DCMAKE_C_FLAGS="$no_amx" \
  -DCMAKE_CXX_FLAGS="$no_amx" ${CMAKE_ARGS:-} > "$work/cmake.log"
cmake --build "$work/build" --target llama-server -j "$(nproc)"
mkdir -p "$out/bin"
cp "$work/build/bin/llama-server" "$out/bin/"
echo "$build" > "$out/VERSION"
