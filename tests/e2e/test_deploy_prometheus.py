"""A real Prometheus scrapes a real lbproxy with deploy/prometheus's rules: the target is up,
every shipped rule evaluates (the dead-peer rule too, on a metric that may not exist), the
backend-down rule fires when a backend is killed, and every dashboard query evaluates."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO, Backend, Lbproxy, proxy_config, wait_until
from tests.support.deploy import Prometheus

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus missing (Debian package prometheus, scripts/system-deps.sh)",
)
PROM_DIR = REPO / "deploy" / "prometheus"


def rule_copy(name: str) -> dict[str, Any]:
    """The shipped rule `name`, with `for: 0s` so that a test can see it fire at once."""
    shipped = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    rule = next(r for g in shipped["groups"] for r in g["rules"] if r.get("alert") == name)
    return {
        "groups": [{"name": "test", "rules": [dict(rule, alert=f"Test{name}", **{"for": "0s"})]}]
    }


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Prometheus, Backend]]:
    b1, b2 = Backend("b1").start(), Backend("b2").start()
    text, port, admin = proxy_config(
        [("b1", b1.address), ("b2", b2.address)],
        health={"check": "http", "interval": 0.3, "timeout": 0.5, "fall": 1, "rise": 1},
    )
    proxy = Lbproxy(text, tmp_path).start(wait_ports=(port, admin))
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [*shipped["rule_files"], "test.yml"],
        "scrape_configs": [
            dict(shipped["scrape_configs"][0], static_configs=[{"targets": [f"127.0.0.1:{admin}"]}])
        ],
    }
    prom = Prometheus(
        yaml.safe_dump(config),
        {
            "alerts.yml": (PROM_DIR / "alerts.yml").read_text(),
            "test.yml": yaml.safe_dump(rule_copy("LbproxyBackendDown")),
        },
    )
    try:
        prom.start()
        yield prom, b1
    finally:
        prom.stop()
        proxy.stop()
        b2.stop()
        b1.stop()


def firing(prom: Prometheus, alert: str) -> list[dict[str, Any]]:
    alerts = prom.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_prometheus_scrapes_lbproxy_and_fires_when_a_backend_dies(
    stack: tuple[Prometheus, Backend],
) -> None:
    prom, b1 = stack
    up = 'up{job="lbproxy"} == 1'
    wait_until(lambda: prom.query(up), timeout=10, interval=0.2)
    wait_until(lambda: prom.query('lbproxy_backend_up{backend="b1"} == 1'), timeout=10)

    def all_rules_evaluated() -> bool:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return len(rules) >= 9 and all(r["health"] == "ok" for r in rules)

    wait_until(all_rules_evaluated, timeout=10, interval=0.2)
    assert not firing(prom, "TestLbproxyBackendDown")
    assert not firing(prom, "LbproxyDeadPeersRising")  # absent metric: silent, not an error

    assert b1.proc is not None
    b1.proc.signal(signal.SIGKILL)  # the backend dies
    alerts = wait_until(lambda: firing(prom, "TestLbproxyBackendDown"), timeout=10, interval=0.2)
    assert [a["labels"]["backend"] for a in alerts] == ["b1"]  # type: ignore[attr-defined]

    # every dashboard query is valid PromQL on real data
    dashboard = json.loads((REPO / "deploy" / "grafana" / "lbproxy.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            prom.query(target["expr"].replace("$__rate_interval", "5s"))
