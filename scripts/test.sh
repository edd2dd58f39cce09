#!/usr/bin/env bash
# Builds pissa with its tests and runs the whole suite with CTest.
# Usage: scripts/test.sh [--sanitize]   (--sanitize: AddressSanitizer + UndefinedBehaviorSanitizer build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
# -O2 rather than CMake's -O3 for Release: the tests compile noticeably faster and run as fast.
build="$root/build/release"; type=Release; extra=(-DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG"); skip=()
if [[ "${1:-}" == "--sanitize" ]]; then
  build="$root/build/sanitize"; type=Debug; extra=(-DPISSA_SANITIZE=ON -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1")
  # The consumer projects are separate builds without sanitizers; the release run covers them.
  skip=(-E "^consumer_")
fi
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=$type -DPISSA_BUILD_BENCH=OFF "${extra[@]}" >/dev/null
cmake --build "$build" -j "$(nproc)"
cd "$build" && ctest --output-on-failure -j "$(nproc)" --timeout 1200 "${skip[@]}"
