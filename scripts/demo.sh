#!/usr/bin/env bash
# README's main job: installs missing Debian packages, builds the `pissa` tool, and runs
# `pissa init` on the built-in synthetic Llama-shaped model (or on the arguments given, e.g.
# `scripts/demo.sh MODEL --rank 16`), writing the residual model and adapter to build/demo.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
build="$root/build/release"
# Same configuration as scripts/test.sh, so the two share one build tree.
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" -DPISSA_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target pissa_tool
exec "$build/tools/pissa/pissa" init "$@" --out "$root/build/demo" --force
