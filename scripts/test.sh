#!/usr/bin/env bash
# Builds pissa and runs the whole test suite: the C++ tests (CTest), the benchmarks once on a tiny
# filter, and the Python tests (pytest: the package, and peft / transformers / torch as the oracle).
# Usage: scripts/test.sh              everything, Release build in build/release
#        scripts/test.sh --sanitize   the C++ tests of the library (core and formats) under
#                                     AddressSanitizer + UndefinedBehaviorSanitizer in build/sanitize; the
#                                     tool, its end-to-end tests and the experiment's tests are built and
#                                     run by the Release suite
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
jobs=$(nproc)
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1
fi
# Tests run concurrently: idle OpenMP threads sleep instead of spinning on the other test's cores.
export OMP_WAIT_POLICY=PASSIVE

if [[ "${1:-}" == "--sanitize" ]]; then
  build="$root/build/sanitize"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DPISSA_SANITIZE=ON -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
    -DPISSA_BUILD_TOOLS=OFF -DPISSA_BUILD_EXAMPLES=OFF -DPISSA_BUILD_EXPERIMENTS=OFF -DPISSA_BUILD_BENCH=OFF \
    "${launcher[@]}" >/dev/null
  cmake --build "$build" -j "$jobs"
  # The consumer projects are separate builds without sanitizers; the release run covers them.
  cd "$build" && exec ctest --output-on-failure -j "$jobs" --timeout 1200 -E "^consumer_"
fi

# -O2 rather than CMake's -O3 for Release: the tests compile noticeably faster and run as fast.
build="$root/build/release"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
  -DPISSA_BUILD_BENCH=ON "${launcher[@]}" >/dev/null
cmake --build "$build" -j "$jobs"
(cd "$build" && ctest --output-on-failure -j "$jobs" --timeout 1200)
# The benchmarks are built above so that they cannot rot; each program runs once on a tiny case.
run_bench() {  # program filter
  local out
  out=$("$build/bench/$1" --benchmark_filter="$2" --benchmark_min_time=0.01)
  [[ "$out" == *"${2%%/*}"* ]] || { echo "bench: $1 did not run $2" >&2; exit 1; }
}
run_bench bench_svd 'BM_lora_forward/1/4096/16'
run_bench bench_quant 'BM_quantize_nf4/m:1024/n:1024'
"$build/bench/study_bf16_products" --quick >/dev/null || { echo "bench: study_bf16_products --quick failed" >&2; exit 1; }
echo "benchmarks: built and ran once"
PISSA_TOOL="$build/tools/pissa/pissa" "$root/scripts/test-python.sh"
