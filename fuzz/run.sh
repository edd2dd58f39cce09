#!/usr/bin/env bash
# Builds the libFuzzer targets of the formats layer with Debian's clang
# (-fsanitize=fuzzer,address,undefined) and replays their corpora:
#   fuzz_safetensors_header  safetensors headers      tests/io/corpus/*.safetensors
#   fuzz_adapter_config      adapter_config.json      fuzz/corpus/adapter_config/
#   fuzz_index               model.safetensors.index.json (text only)  fuzz/corpus/index/
# With SECONDS > 0 it then fuzzes each target for that long, starting from its corpus.
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (needs clang and libclang-rt-14-dev: scripts/install-deps.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-0}
shift || true
targets=("$@")
(( ${#targets[@]} )) || targets=(fuzz_safetensors_header fuzz_adapter_config fuzz_index)
build="$root/build/fuzz"
mkdir -p "$build"
cxx=${CXX_FUZZ:-clang++}
eigen=$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)

corpus_of() {
  case "$1" in
    fuzz_safetensors_header) echo "$root"/tests/io/corpus/*.safetensors ;;
    fuzz_adapter_config) echo "$root"/fuzz/corpus/adapter_config/* ;;
    fuzz_index) echo "$root"/fuzz/corpus/index/* ;;
    *) echo "fuzz: unknown target $1" >&2; exit 2 ;;
  esac
}

for target in "${targets[@]}"; do
  corpus=($(corpus_of "$target"))
  "$cxx" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$root/include" $eigen "$root/fuzz/$target.cpp" -o "$build/$target"
  echo "fuzz: $target: replaying ${#corpus[@]} corpus files" >&2
  "$build/$target" "${corpus[@]}"
done

if (( seconds > 0 )); then
  for target in "${targets[@]}"; do
    corpus=($(corpus_of "$target"))
    work="$build/corpus-$target"
    rm -rf "$work" && mkdir -p "$work"
    cp "${corpus[@]}" "$work/"
    echo "fuzz: $target: fuzzing for ${seconds}s" >&2
    "$build/$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 \
      -artifact_prefix="$build/$target-" "$work"
  done
fi
