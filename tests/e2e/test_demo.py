"""`lbproxy demo` as a user runs it: URLs printed, chat and dashboard work, Ctrl-C cleans up."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect as ws_connect

from tests.support import Proc, lbproxy_cmd, wait_until

pytestmark = pytest.mark.timeout(120)

URL_LINES = {
    "page": r"chat page \(through lbproxy\):\s+(http://\S+)",
    "ws": r"public websocket endpoint:\s+(ws://\S+)",
    "dashboard": r"dashboard:\s+(http://\S+)",
}


def printed_urls(output: str) -> dict[str, str] | None:
    found = {name: re.search(pattern, output) for name, pattern in URL_LINES.items()}
    if not all(found.values()):
        return None
    return {name: match.group(1) for name, match in found.items() if match is not None}


def start_time(pid: int) -> str | None:
    """The kernel start time of a live (not zombie) process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> dict[int, tuple[str, str | None]]:
    """Every live descendant of ``pid``: pid -> (command line, start time)."""
    found: dict[int, tuple[str, str | None]] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for child in map(int, children):
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                except (FileNotFoundError, ProcessLookupError):
                    continue
                found[child] = (cmdline.decode(errors="replace"), start_time(child))
                todo.append(child)
    return found


def backends_up(dashboard: str) -> bool:
    pools = httpx.get(f"{dashboard.rstrip('/')}/api/pools", timeout=2).json()["pools"]
    states = [b["state"] for b in pools["chat"]["backends"]]
    return states == ["up"] * 3


def chat_round_trip(ws_url: str) -> dict[str, object]:
    with ws_connect(ws_url.replace("NAME", "demo-tester"), open_timeout=10) as ws:
        ws.send(json.dumps({"op": "join", "room": "demo-test", "since": 0}))
        joined = json.loads(ws.recv(timeout=10))
        assert joined["op"] == "joined" and joined["backend"].startswith("chat-"), joined
        message = {"op": "send", "room": "demo-test", "text": "hi demo", "client_msg_id": "c1"}
        ws.send(json.dumps(message))
        event: dict[str, object] = json.loads(ws.recv(timeout=10))
    return event


def test_demo_serves_chat_and_dashboard_and_stops_everything_on_ctrl_c() -> None:
    demo = Proc(lbproxy_cmd("demo"))
    try:
        urls = wait_until(lambda: printed_urls(demo.output()) or not demo.alive(), timeout=60)
        assert isinstance(urls, dict), demo.output()
        children = descendants(demo.pid)
        commands = [cmd for cmd, _ in children.values()]
        assert sum("redis-server" in c for c in commands) == 1, commands
        assert sum(" backend " in c for c in commands) == 3, commands
        assert sum(" serve " in c for c in commands) == 1, commands
        redis_url = re.search(r"redis:\s+(redis://\S+)", demo.output())
        assert redis_url is not None, demo.output()
        with redis.Redis.from_url(redis_url.group(1), decode_responses=True) as r:
            assert r.config_get("appendonly") == {"appendonly": "yes"}  # history survives

        page = httpx.get(urls["page"], timeout=5)
        assert page.status_code == 200, page
        assert page.headers["content-type"].startswith("text/html")
        assert "lbproxy chat" in page.text
        event = chat_round_trip(urls["ws"])
        assert event["op"] == "msg" and event["text"] == "hi demo", event
        assert event["from"] == "demo-tester"

        dashboard = httpx.get(urls["dashboard"], timeout=5)
        assert dashboard.status_code == 200
        assert dashboard.headers["content-type"].startswith("text/html")
        wait_until(lambda: backends_up(urls["dashboard"]), timeout=10)

        demo.signal(signal.SIGINT)
        assert demo.wait(timeout=40) == 0, demo.output()
        left = [
            f"{pid}: {cmd}"
            for pid, (cmd, started) in children.items()
            if started is not None and start_time(pid) == started
        ]
        assert left == [], f"demo left processes running: {left}"
    finally:
        demo.stop()
