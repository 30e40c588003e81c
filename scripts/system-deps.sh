#!/usr/bin/env bash
# Install the Debian packages the tests, demo and benchmarks need, when missing.
# redis-server: tests and demo; chromium: page tests; gcc + Python headers: the native tunnel
# engine (lbproxy/_splice.c) and the bench tools; nginx, haproxy, caddy, wrk: the bench;
# prometheus (+ promtool): the deploy/prometheus tests. With LBPROXY_CONTAINER_TESTS=1
# (make container-test) also podman, runc and mmdebstrap: the image build test.
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
command -v prometheus >/dev/null || want+=(prometheus)
if [ "${LBPROXY_CONTAINER_TESTS:-}" = 1 ]; then
  command -v podman >/dev/null || want+=(podman)
  command -v runc >/dev/null || want+=(runc)
  command -v mmdebstrap >/dev/null || want+=(mmdebstrap)
fi
if ((${#want[@]})); then
  echo "installing: ${want[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${want[@]}"
fi
