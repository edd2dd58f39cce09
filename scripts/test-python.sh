#!/usr/bin/env bash
# Runs the Python tests (peft, transformers and torch as the oracle of the pissa tool) in the test venv (scripts/python-env.sh).
# Expects the tool to be built: PISSA_TOOL names it (default: the release build of scripts/test.sh).
# Usage: scripts/test-python.sh [pytest arguments]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=$("$root/scripts/python-env.sh")
export PISSA_TOOL=${PISSA_TOOL:-build/release/tools/pissa/pissa}
rc=0
"$venv/bin/python" -m pytest tests/python -q "$@" || rc=$?
# pytest's 5 is "no tests collected": a run that tested nothing is a failure here.
if ((rc == 5)); then echo "test-python: pytest collected no tests" >&2; rc=1; fi
exit "$rc"
