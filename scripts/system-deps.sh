#!/usr/bin/env bash
# Install the Debian packages the tests, demo and benchmarks need, when missing.
# redis-server: tests and demo; chromium: page tests; gcc + Python headers: the native tunnel
# engine (lbproxy/_splice.c) and the bench tools; nginx, haproxy, caddy, wrk: the bench.
set -euo pipefail
want=()
command -v redis-server >/dev/null || want+=(redis-server)
command -v chromium >/dev/null || want+=(chromium)
command -v nginx >/dev/null || want+=(nginx)
command -v haproxy >/dev/null || want+=(haproxy)
command -v caddy >/dev/null || want+=(caddy)
command -v wrk >/dev/null || want+=(wrk)
command -v gcc >/dev/null || want+=(gcc)
"${PYTHON:-python3}" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
  want+=(python3-dev)
command -v taskset >/dev/null || want+=(util-linux)
if ((${#want[@]})); then
  echo "installing: ${want[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${want[@]}"
fi
