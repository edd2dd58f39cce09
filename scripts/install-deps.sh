#!/usr/bin/env bash
# Installs the Debian packages pissa needs to build, test and run its examples, when missing.
# Usage: scripts/install-deps.sh [--peers]   (--peers adds the peers of the benchmarks: torch, sklearn, Spectra)
set -euo pipefail
packages=(build-essential cmake libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev zlib1g-dev
          clang libclang-rt-14-dev clang-format dataset-fashion-mnist ccache doxygen openmpi-bin)
if [[ "${1:-}" == "--peers" ]]; then packages+=(python3-torch python3-sklearn python3-numpy libopenblas0-pthread libspectra-dev); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}" >&2
  sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
