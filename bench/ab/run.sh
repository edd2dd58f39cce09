#!/bin/bash
# A/B timing of the skinny products and the randomized SVD: the headers of git ref OLD against the
# working tree, in one process, calls interleaved (see ab_main.cpp). Built like a consumer builds
# the library (g++ -O2 -fopenmp, no -march flags).
#   bench/ab/run.sh OLD [M N Q OFFSET_BYTES REPETITIONS]     e.g. bench/ab/run.sh HEAD~3 4096 4096 16 16 31
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
old=${1:?usage: bench/ab/run.sh OLD_REF [M N Q OFFSET_BYTES REPETITIONS]}
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$root" archive "$old" include | tar -x -C "$work"
flags=(-O2 -std=c++17 -fopenmp -I/usr/include/eigen3)
g++ "${flags[@]}" -Dpissa=pissa_old -DAB_SIDE=ab_old -I"$work/include" -c "$root/bench/ab/ab_side.cpp" -o "$work/old.o" &
g++ "${flags[@]}" -DAB_SIDE=ab_new -I"$root/include" -c "$root/bench/ab/ab_side.cpp" -o "$work/new.o" &
g++ "${flags[@]}" -c "$root/bench/ab/ab_main.cpp" -o "$work/main.o"
wait
g++ -fopenmp "$work/main.o" "$work/old.o" "$work/new.o" -o "$work/ab"
echo "old: $(git -C "$root" rev-parse --short "$old")  new: working tree of $(git -C "$root" rev-parse --short HEAD)"
[ $# -eq 0 ] && set -- 4096 4096 16 16 31
"$work/ab" "$@"
