#!/usr/bin/env bash
# Creates or updates the Python test environment from tests/python/requirements.txt and prints the
# venv's path. The venv lives in the user's cache ($PISSA_VENV, else ~/.cache/pissa/venv-<hash>), keyed by
# the hash of the requirements and the interpreter, so that every checkout of the same requirements
# shares one (about 1.6 GB, torch included); a venv whose stamp matches is used as it is (no pip call).
# torch is installed on its own first, at the requirements' exact pin, so that no other package's
# dependency on torch can pull a CUDA build from PyPI; the install is then checked to be a CPU build.
# Usage: scripts/python-env.sh   (PISSA_PYTHON: the interpreter to build the venv from, default python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/tests/python/requirements.txt"
python=${PISSA_PYTHON:-python3}

hash=$( { cat "$req"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
venv=${PISSA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pissa/venv-${hash:0:16}}
mkdir -p "$(dirname "$venv")"
stamp="$venv/.requirements.sha256"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
  echo "$venv"
  exit 0
fi

torch_pin=$(grep -E '^[[:space:]]*torch[[:space:]]*==' "$req" | tr -d '[:space:]' || true)
if [[ -z "$torch_pin" ]]; then
  echo "python-env: $req must pin torch with == (an open torch requirement downloads a CUDA build)" >&2
  exit 1
fi

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
rm -f "$stamp"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install "$torch_pin" >&2
# The pinned lines are constraints too, so that a dependency can't move a pinned package (only the
# name==version lines: pip refuses paths and editables as constraints).
constraints="$venv/.pins.txt"
grep -E '^[[:space:]]*[A-Za-z0-9][A-Za-z0-9._-]*[[:space:]]*==' "$req" >"$constraints" || true
"${pip[@]}" install -r "$req" -c "$constraints" >&2
"$venv/bin/python" - <<'PY' >&2
import torch
if torch.version.cuda is not None:
    raise SystemExit(f"python-env: torch {torch.__version__} is a CUDA build (cuda {torch.version.cuda}); "
                     "the tests expect the CPU build")
PY
echo "$hash" >"$stamp"
echo "$venv"
