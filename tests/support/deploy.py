"""Helpers for the deploy/ tests: metric names in PromQL, lbproxy's exported metrics, and a
real Prometheus (Debian's `prometheus`) on a free port with its own storage directory."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.ports import free_port, port_open, wait_until
from tests.support.processes import Proc

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels, keywords, numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = _GROUPING.sub("", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_metrics(metrics_text: str) -> dict[str, set[str]]:
    """Family name -> label names, from a /metrics body (counters keep their _total)."""
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = families.setdefault(name, set())
        for sample in family.samples:
            labels.update(k for k in sample.labels if k != "le")
    return families


def resolve(name: str, exported: dict[str, set[str]]) -> str | None:
    """The exported family a queried name belongs to (histogram _bucket/_sum/_count)."""
    if name in exported:
        return name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return name[: -len(suffix)]
    return None


def http_get(url: str, timeout: float = 5.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as error:  # e.g. 503 while Prometheus is starting
        error.close()  # it holds the socket
        raise RuntimeError(f"GET {url}: HTTP {error.code}") from None


class Prometheus:
    """A real `prometheus` process on a free loopback port with a temporary storage dir."""

    def __init__(self, config_text: str, rule_files: dict[str, str]) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise RuntimeError("prometheus not found (Debian package `prometheus`)")
        self.exe = exe
        self.dir = Path(tempfile.mkdtemp(prefix="lbproxy-prom-"))
        for name, text in rule_files.items():
            (self.dir / name).write_text(text)
        (self.dir / "prometheus.yml").write_text(config_text)
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        self.proc = Proc(
            [
                self.exe,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ]
        )
        try:
            wait_until(lambda: port_open(self.port) or not self.proc.alive(), timeout=15)  # type: ignore[union-attr]
            assert self.proc.alive(), self.proc.output()
        except BaseException:
            self.stop()
            raise
        return self

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
