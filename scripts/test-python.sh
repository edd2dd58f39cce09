#!/usr/bin/env bash
# Builds the pissa Python package (python/) into the test venv (scripts/python-env.sh) and runs the
# Python tests: the package itself, and peft, transformers and torch as the oracle of the pissa tool.
# Expects the tool to be built: PISSA_TOOL names it (default: the release build of scripts/test.sh).
# Usage: scripts/test-python.sh [pytest arguments]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=$("$root/scripts/python-env.sh")
export PISSA_TOOL=${PISSA_TOOL:-build/release/tools/pissa/pissa}
# The package, built by scikit-build-core in a kept build folder (an unchanged tree rebuilds nothing);
# its build requirements are in the venv, hence no build isolation.
config=(-Cbuild-dir="$root/build/python" -Ccmake.define.CMAKE_CXX_COMPILER_LAUNCHER=)
if command -v ccache >/dev/null; then
  config=(-Cbuild-dir="$root/build/python" -Ccmake.define.CMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR="$root" CCACHE_NOHASHDIR=1
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps "${config[@]}" ./python
rc=0
"$venv/bin/python" -m pytest tests/python -q "$@" || rc=$?
# pytest's 5 is "no tests collected": a run that tested nothing is a failure here.
if ((rc == 5)); then echo "test-python: pytest collected no tests" >&2; rc=1; fi
exit "$rc"
