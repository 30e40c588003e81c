#!/usr/bin/env bash
# What `make` itself needs on a fresh Debian machine: make, and a python3 (3.11+) with venv.
set -euo pipefail
want=()
command -v make >/dev/null || want+=(make)
command -v python3 >/dev/null || want+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  want+=(python3-venv)
fi
if ((${#want[@]})); then
  echo "installing: ${want[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${want[@]}"
fi
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lbproxy needs Python 3.11+")'
