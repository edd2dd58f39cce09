#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors header parser with Debian's clang
# (-fsanitize=fuzzer,address,undefined) and runs the malformed corpus (tests/io/corpus) through it;
# with SECONDS > 0 it then fuzzes for that long, starting from the corpus.
# Usage: fuzz/run.sh [SECONDS]     (needs clang and libclang-rt-14-dev: scripts/install-deps.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-0}
build="$root/build/fuzz"
mkdir -p "$build"
cxx=${CXX_FUZZ:-clang++}
"$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"$root/include" "$root/fuzz/fuzz_safetensors_header.cpp" -o "$build/fuzz_safetensors_header"
corpus=("$root"/tests/io/corpus/*.safetensors)
echo "fuzz: replaying ${#corpus[@]} corpus files" >&2
"$build/fuzz_safetensors_header" "${corpus[@]}"
if (( seconds > 0 )); then
  work="$build/corpus"
  rm -rf "$work" && mkdir -p "$work"
  cp "${corpus[@]}" "$work/"
  echo "fuzz: fuzzing for ${seconds}s" >&2
  "$build/fuzz_safetensors_header" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
    -artifact_prefix="$build/" "$work"
fi
