# lbproxy container image.
#
#   docker build -t lbproxy:latest .
#   docker build --build-arg BASE_IMAGE=localhost/debian-bookworm-minbase -t lbproxy:latest .
#
# BASE_IMAGE is any Debian bookworm image (debian:bookworm-slim by default; the tests build
# one with mmdebstrap when no registry is reachable). Both stages install Python from
# Debian, so the venv built in the first stage matches the interpreter of the second.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# --- build: compile the native tunnel engine (lbproxy/_splice.c) into the lbproxy wheel ---
FROM ${BASE_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# optional pip settings for the build (a private index, a TLS-intercepting proxy's CA):
# --build-arg PIP_INDEX_URL=... --build-arg PIP_CERT=/path/inside/the/build (e.g. a -v mount)
ARG PIP_INDEX_URL
ARG PIP_CERT
RUN python3 -m venv /opt/build
WORKDIR /src
COPY pyproject.toml README.md build_ext.py hatch_build.py ./
COPY lbproxy ./lbproxy
# the wheel of lbproxy (with the compiled engine) and of every dependency, for the runtime
RUN /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
    && unzip_check="import sys, zipfile, glob; w = glob.glob('/wheels/lbproxy-*.whl')[0]; \
names = zipfile.ZipFile(w).namelist(); \
sys.exit(0 if any(n.startswith('lbproxy/_splice') and n.endswith('.so') for n in names) \
else 'the native engine was not compiled into ' + w)" \
    && /opt/build/bin/python -c "$unzip_check"

# --- runtime: Python, the wheels, nothing to compile with ---
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN python3 -m venv /opt/lbproxy \
    && /opt/lbproxy/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels lbproxy \
    && rm -rf /tmp/wheels \
    && /opt/lbproxy/bin/python -c "import lbproxy._splice" \
    && groupadd --system --gid 10001 lbproxy \
    && useradd --system --uid 10001 --gid lbproxy --home-dir /nonexistent --shell /usr/sbin/nologin lbproxy \
    && mkdir -p /etc/lbproxy
COPY config/lbproxy.toml /etc/lbproxy/lbproxy.toml
ENV PATH=/opt/lbproxy/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
# 8080: the example listener; 9901: the admin API (/healthz, /metrics, dashboard)
EXPOSE 8080 9901
# the admin API answers 200 on /healthz; the address is [admin] listen of the mounted config
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('LBPROXY_HEALTHZ', 'http://127.0.0.1:9901/healthz'), timeout=2)"]
# SIGTERM: stop accepting, let connections run up to drain_timeout, close the rest with 1001,
# exit 0 (give the container runtime a stop timeout longer than drain_timeout + close_spread)
STOPSIGNAL SIGTERM
ENTRYPOINT ["lbproxy"]
CMD ["serve", "--config", "/etc/lbproxy/lbproxy.toml"]
