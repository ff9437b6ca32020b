#!/usr/bin/env bash
# Keeps only the named x86-64 CPU variants in a llama-cpp-python source tree built with GGML_CPU_ALL_VARIANTS:
#   deploy/llama_cpu_variants.sh SOURCE_DIR "x64 haswell skylakex icelake alderlake"     (or "all")
# llama.cpp (ggml/src/CMakeLists.txt) compiles its CPU backend once per variant in a fixed list, each with its own
# -m flags, and at run time loads the one whose instruction sets this CPU has with the highest score. Its
# sapphirerapids variant adds -mamx-tile -mamx-int8 after any -mno-amx flags, so it always brings back the AMX
# kernels that GCC 12 miscompiles (see the Makefile): it is dropped whatever the list, and a Sapphire Rapids CPU
# loads the best AVX-512 variant instead. Each variant costs a compile of ggml-cpu (a minute or two on 2 cores), so
# a list can be shorter than llama.cpp's; "all" keeps every other one.
set -euo pipefail
src=$1 wanted=$2
cmake=$src/vendor/llama.cpp/ggml/src/CMakeLists.txt
# The x86 variants: lines `ggml_add_cpu_backend_variant(NAME ...)` between the x86 branch and the next architecture.
x86=$(sed -n '/GGML_SYSTEM_ARCH STREQUAL "x86")$/,/elseif *(GGML_SYSTEM_ARCH/p' "$cmake" |
  sed -n 's/^ *ggml_add_cpu_backend_variant(\([A-Za-z0-9_.]*\).*/\1/p')
[ -n "$x86" ] || { echo "no x86 CPU variants found in $cmake" >&2; exit 1; }
if [ "$wanted" = all ]; then wanted=$x86; fi
for name in $wanted; do
  grep -qx "$name" <<<"$x86" || { echo "unknown CPU variant $name (known: $(echo $x86))" >&2; exit 1; }
done
kept=()
for name in $x86; do
  if [ "$name" != sapphirerapids ] && grep -qwx "$name" <<<"$(tr ' ' '\n' <<<"$wanted")"; then
    kept+=("$name")
  else
    sed -i "/^ *ggml_add_cpu_backend_variant($name[ )]/d" "$cmake"
  fi
done
[ ${#kept[@]} -gt 0 ] || { echo "no CPU variant left to build" >&2; exit 1; }
echo "CPU variants: ${kept[*]}" >&2
