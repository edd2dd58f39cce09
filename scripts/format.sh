#!/usr/bin/env bash
# Formats the C++ sources (headers, tests, tools, examples, benchmarks, the Python extension: the files
# git tracks and the new ones it does not ignore) with the repository's .clang-format. With --check it
# changes nothing and fails, naming each file that differs.
# Usage: scripts/format.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "format: clang-format is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
# examples/readme.cpp is README's example verbatim, laid out for reading there: not reformatted.
mapfile -t files < <(git ls-files --cached --others --exclude-standard '*.hpp' '*.cpp' ':!examples/readme.cpp')
if [[ "${1:-}" != "--check" ]]; then
  exec clang-format -i "${files[@]}"
fi
differ=()
for f in "${files[@]}"; do
  clang-format --dry-run --Werror "$f" >/dev/null 2>&1 || differ+=("$f")
done
if ((${#differ[@]})); then
  printf 'format: %s differs from .clang-format (scripts/format.sh rewrites it)\n' "${differ[@]}" >&2
  exit 1
fi
echo "format: ${#files[@]} files match .clang-format"
