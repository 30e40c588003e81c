"""Render the panels of deploy/grafana/lbproxy.json from a real Prometheus to a PNG.

Grafana is not a Debian package, so this draws the same queries with matplotlib. By default
it makes its own real data first: redis-server, three reference backends registered
through Redis, lbproxy and Prometheus (Debian package; 1 s scrapes), all on 127.0.0.1, then
a short load through lbproxy — websocket clients echoing, some malformed requests
(rejections), one backend killed with SIGKILL (its clients reconnect elsewhere), Redis stopped for a
while (registry down) — and renders what Prometheus recorded.

    .venv/bin/python deploy/grafana/render_dashboard.py [--out docs/img/dashboard.png]
    .venv/bin/python deploy/grafana/render_dashboard.py --prometheus http://HOST:9090 --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.deploy_support import Prometheus  # noqa: E402
from tests.support.proxyconf import proxy_config  # noqa: E402
from tests.support import Backend, Lbproxy, RedisServer, wait_until  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "lbproxy.json"
RATE_INTERVAL = "15s"


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def render(url: str, start: float, end: float, out: Path, step: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(16, 3.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for series in query_range(url, expr, start, end, step):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        unit = panel["fieldConfig"]["defaults"]["unit"]
        ax.set_title(f"{panel['title']}  [{unit}]", fontsize=11, loc="left")
        ax.set_xlim(0, end - start)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=9)
    fig.suptitle(
        f"{dashboard['title']} — deploy/grafana/lbproxy.json rendered from Prometheus "
        f"({url}, {end - start:.0f} s)",
        fontsize=13,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


async def client(port: int, stop: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import WebSocketException

    while time.monotonic() < stop:
        try:
            async with connect(f"ws://127.0.0.1:{port}/echo", open_timeout=5) as ws:
                while time.monotonic() < stop:
                    await ws.send("x" * random.randint(10, 2000))
                    await ws.recv()
                    await asyncio.sleep(random.uniform(0.02, 0.2))
        except (TimeoutError, OSError, WebSocketException):
            await asyncio.sleep(random.uniform(0.2, 1.0))


def bad_request(port: int) -> None:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        s.recv(1024)


async def load(port: int, seconds: float, events: list[tuple[float, Any]]) -> None:
    begin = time.monotonic()
    stop = begin + seconds
    tasks = []
    for i in range(60):  # ramp up over the first ~12 s
        tasks.append(asyncio.create_task(client(port, stop)))
        await asyncio.sleep(0.2 if i < 59 else 0)
    pending = sorted(events, key=lambda e: e[0])
    while time.monotonic() < stop:
        now = time.monotonic() - begin
        while pending and pending[0][0] <= now:
            await asyncio.to_thread(pending.pop(0)[1])
        if 20 < now < 35 or 55 < now < 60:
            await asyncio.to_thread(bad_request, port)
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)


def make_data(out: Path, seconds: float) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-dash-"))
    redis = RedisServer().start()
    backends = [
        Backend(f"b{i}", None, "--redis", redis.url, "--pool", "main", "--ttl", "3").start()
        for i in (1, 2, 3)
    ]
    text, port, admin = proxy_config(
        [],
        pool={"discovery": "redis", "balance": "least-connections"},
        # slow active checks and no passive ones, so that the killed backend keeps being
        # picked for a few seconds: the upstream-errors panel then has something to show
        health={
            "check": "http",
            "interval": 2.0,
            "timeout": 0.5,
            "fall": 3,
            "rise": 2,
            "passive_failures": 0,
        },
        extra=f'\n[redis]\nurl = "{redis.url}"\n',
    )
    proxy = Lbproxy(text, workdir).start(wait_ports=(port, admin))
    prom = Prometheus(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: lbproxy\n    static_configs: [{{targets: ['127.0.0.1:{admin}']}}]\n",
        {},
    ).start()
    try:
        wait_until(lambda: prom.query('up{job="lbproxy"} == 1'), timeout=15)
        start = time.time()
        restarted: list[RedisServer] = []
        events = [
            (40.0, lambda: backends[1].proc.signal(signal.SIGKILL)),  # b2 dies; clients move
            (65.0, redis.kill),  # the registry goes away ...
            (80.0, lambda: restarted.append(RedisServer(port=redis.port).start())),  # ... back
        ]
        asyncio.run(load(port, seconds, events))
        time.sleep(3)  # the last scrapes
        render(prom.url, start, time.time(), out)
        for server in restarted:
            server.stop()
    finally:
        prom.stop()
        proxy.stop()
        for backend in backends:
            backend.stop()
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dashboard.png")
    parser.add_argument("--prometheus", help="render from this Prometheus instead")
    parser.add_argument("--minutes", type=float, default=30.0, help="with --prometheus")
    parser.add_argument("--seconds", type=float, default=95.0, help="length of the load")
    args = parser.parse_args()
    if args.prometheus:
        end = time.time()
        render(args.prometheus, end - 60 * args.minutes, end, args.out, step=15.0)
    else:
        make_data(args.out, args.seconds)


if __name__ == "__main__":
    main()
