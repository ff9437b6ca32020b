#!/usr/bin/env bash
# Prints the path of a llama-cpp-python wheel for PYTHON, building it only when no earlier build matches.
#   deploy/llama_wheel.sh PYTHON VERSION CMAKE_ARGS
# Built wheels are kept in a cache shared by every venv and clone on this machine, one folder per key: the
# version, the CMake flags, the compiler, the Python ABI and (for a native build) the CPU's feature flags. A CPU
# with other features or other flags builds anew; pip's own cache cannot tell those apart, so it is not used.
set -euo pipefail
python=$1 version=$2
cmake_args=$(printf '%s' "$3" | sed 's/^ *//; s/ *$//')
cache=${WORKERS_AI_LOCAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/workers-ai-local}/wheels

cpu=native
case "$cmake_args" in
  *GGML_NATIVE=OFF*|*GGML_NATIVE=off*) cpu=portable ;;
  *) cpu=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | tr ' ' '\n' | sort -u | tr '\n' ' ') ;;
esac
abi=$("$python" -c 'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')
compiler=$({ ${CC:-cc} --version 2>/dev/null || echo none; } | head -n 1)
key=$(printf '%s\n' "$version" "$cmake_args" "$compiler" "$abi" "$cpu" | sha256sum | cut -c1-16)
dir=$cache/llama-cpp-python-$version-$key

if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  # Tests ask with LLAMA_WHEEL_NO_BUILD=1: they reuse the build `make` installed and never compile one of their own.
  if [ -n "${LLAMA_WHEEL_NO_BUILD:-}" ]; then echo "no cached llama-cpp-python wheel in $dir" >&2; exit 3; fi
  echo "Building llama.cpp through llama-cpp-python $version (about 5 minutes on 2 cores, once per machine)..." >&2
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/.build-XXXXXX")
  trap 'rm -rf "$work"' EXIT
  CMAKE_ARGS="$cmake_args" "$python" -m pip wheel -q --progress-bar off --no-cache-dir --no-deps \
    --no-binary llama-cpp-python -w "$work" "llama-cpp-python==$version" >&2
  printf 'version: %s\ncmake_args: %s\ncompiler: %s\nabi: %s\ncpu: %s\n' \
    "$version" "$cmake_args" "$compiler" "$abi" "$cpu" > "$work/KEY"
  # A rename is atomic: two builds racing leave one complete folder, never a half-written wheel.
  mv -T "$work" "$dir" 2>/dev/null || rm -rf "$work"
  trap - EXIT
fi
ls "$dir"/llama_cpp_python-*.whl | head -n 1
