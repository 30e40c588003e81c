"""PNG plots of a run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.stage import Cdf, Metrics
from bench.targets import TARGETS

COLORS = {
    "direct": "#999999",
    "lbproxy": "#d62728",
    "nginx": "#2ca02c",
    "haproxy": "#1f77b4",
    "caddy": "#9467bd",
}
UNITS = {
    "rps": "requests/s",
    "conn_per_s": "connections/s",
    "msgs_per_s": "messages/s",
    "mb_per_s": "MB/s (payload, one way)",
    "bytes_per_conn": "bytes per idle websocket",
    "storm_s": "seconds until all reconnected",
    "proxy_cpu_us": "proxy CPU-µs per op",
    "scaling": "conn/s with 2 workers ÷ 1 worker",
    "recover_s": "seconds from the kill until every client echoes again",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _grid(plt: Any, count: int) -> tuple[Any, Any]:
    cols = min(3, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    return fig, axes


def _targets(values: dict[str, Metrics], key: str) -> list[str]:
    return [t for t in TARGETS if t in values and key in values[t]]


def _bars(values: dict[str, Metrics], key: str) -> tuple[list[str], list[float], list[str]]:
    """Bar names, values and colours of ``key``: one bar per target, or for workers_scaling
    (lbproxy only, metrics ``KEY_1w`` / ``KEY_2w``) one bar per worker count."""
    names = _targets(values, key)
    if names:
        return names, [values[t][key] for t in names], [COLORS[t] for t in names]
    runs = values.get("lbproxy", {})
    keys = [(n, f"{key}_{n}w") for n in (1, 2) if f"{key}_{n}w" in runs]
    labels = [f"lbproxy\n{n} worker{'s' if n > 1 else ''}" for n, _ in keys]
    return labels, [runs[k] for _, k in keys], [COLORS["lbproxy"]] * len(keys)


def bar_grid(
    results: dict[str, dict[str, Metrics]], keys: dict[str, str], title: str, path: Path
) -> Path | None:
    """One bar chart per scenario of ``keys[scenario]`` across targets (or worker counts)."""
    panels = [(s, keys[s]) for s in results if s in keys and _bars(results[s], keys[s])[0]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, (scenario, key) in zip(axes.flat, panels, strict=False):
        names, vals, colors = _bars(results[scenario], key)
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, labels=[_label(v) for v in vals], fontsize=8)
        only = "" if _targets(results[scenario], key) else " (lbproxy only)"
        ax.set_title(scenario + only, fontsize=10)
        ax.set_ylabel(UNITS.get(key, key), fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_bars(results: dict[str, dict[str, Metrics]], path: Path) -> Path | None:
    """p50 and p99 (ms) side by side per target, one panel per scenario that has them."""
    panels = [s for s in results if _targets(results[s], "p99_ms")]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, scenario in zip(axes.flat, panels, strict=False):
        names = _targets(results[scenario], "p99_ms")
        xs = range(len(names))
        p50 = [results[scenario][t]["p50_ms"] for t in names]
        p99 = [results[scenario][t]["p99_ms"] for t in names]
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50", color="#8fbbd9")
        ax.bar([x + 0.2 for x in xs], p99, width=0.4, label="p99", color="#1f4e79")
        ax.set_xticks(list(xs), names, fontsize=8)
        ax.set_title(scenario, fontsize=10)
        ax.set_ylabel("ms", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Latency p50 / p99 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cdf_plot(cdfs: dict[str, dict[str, Cdf]], path: Path) -> Path | None:
    """Latency CDF per scenario (loadgen histogram quantiles), log-scale x."""
    panels = [s for s in cdfs if cdfs[s]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels))
    for ax, scenario in zip(axes.flat, panels, strict=False):
        for target in TARGETS:
            points = cdfs[scenario].get(target)
            if not points:
                continue
            xs = [max(ms, 0.001) for _, ms in points]
            ax.plot(xs, [q for q, _ in points], label=target, color=COLORS[target], marker=".")
        ax.set_xscale("log")
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("latency ms (log)", fontsize=8)
        ax.set_ylabel("fraction", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_plots(
    results: dict[str, dict[str, Metrics]],
    cdfs: dict[str, dict[str, Cdf]],
    main_metric: dict[str, str],
    out: Path,
) -> list[Path]:
    cpu_keys = {s: "proxy_cpu_us" for s in results}
    main_keys = {**main_metric, "workers_scaling": "conn_per_s"}  # 1 vs 2 workers, not the ratio
    made = [
        bar_grid(results, main_keys, "Main metric per scenario", out / "main_metrics.png"),
        bar_grid(
            results, cpu_keys, "Proxy CPU-µs per operation (lower is better)", out / "proxy_cpu.png"
        ),
        latency_bars(results, out / "latency.png"),
        cdf_plot(cdfs, out / "latency_cdf.png"),
    ]
    return [p for p in made if p is not None]
