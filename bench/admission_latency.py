"""The latency admission control adds to one new connection: sequential websocket
handshakes through three lbproxy processes (limits off, scope "local", scope "redis"; limits
never reached), interleaved in blocks of 100, p50/p99 each.

    python -m bench.admission_latency [N] [FIRST_PORT]

Starts a redis-server, a reference backend and the three lbproxy on FIRST_PORT.. (default
4470..4480) and stops them by PID at the end."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
FIRST = int(sys.argv[2]) if len(sys.argv) > 2 else 4470
PY = sys.executable
RP, BP = FIRST, FIRST + 1
DIR = Path(tempfile.mkdtemp(prefix="lbproxy-admission-"))
procs = [
    subprocess.Popen(
        ["redis-server", "--port", str(RP), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
]
procs.append(
    subprocess.Popen(
        [
            PY,
            "-m",
            "lbproxy",
            "backend",
            "--listen",
            f"127.0.0.1:{BP}",
            "--id",
            "b1",
            "--log-level",
            "warning",
        ]
    )
)


def cfg(port: int, admin: int, limits: str) -> str:
    return f"""[admin]
listen = "127.0.0.1:{admin}"
[listeners.web]
bind = "127.0.0.1:{port}"
pool = "be"
{limits}
[pools.be]
backends = [{{id = "b1", address = "127.0.0.1:{BP}"}}]
[pools.be.health]
check = "none"
[redis]
url = "redis://127.0.0.1:{RP}/0"
"""


big = "connections_per_ip = 1000000\nrate_per_ip = 1000000\nburst = 1000000\n"
variants = {
    "off": "",
    "local": "[listeners.web.limits]\n" + big + 'scope = "local"\n',
    "redis": "[listeners.web.limits]\n" + big + 'scope = "redis"\n',
}
ports: dict[str, int] = {}
for i, (name, limits) in enumerate(variants.items()):
    port = FIRST + 5 + 2 * i
    path = DIR / f"{name}.toml"
    path.write_text(cfg(port, port + 1, limits))
    procs.append(
        subprocess.Popen(
            [PY, "-m", "lbproxy", "serve", "--config", str(path), "--log-level", "error"]
        )
    )
    ports[name] = port
time.sleep(3)
REQ = (
    b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def one(port: int) -> float:
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(REQ)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    dt = time.perf_counter() - t
    assert data.startswith(b"HTTP/1.1 101"), data[:60]
    s.close()
    return dt


try:
    res: dict[str, list[float]] = {n: [] for n in ports}
    for _ in range(N // 100):  # interleaved A/B/C blocks of 100
        for name, port in ports.items():
            res[name] += [one(port) for _ in range(100)]
    for name, xs in res.items():
        xs.sort()
        p50, p99 = xs[len(xs) // 2] * 1e3, xs[int(len(xs) * 0.99)] * 1e3
        mean = statistics.mean(xs) * 1e3
        print(f"{name:6s} n={len(xs)} p50={p50:.3f} ms p99={p99:.3f} ms mean={mean:.3f} ms")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
