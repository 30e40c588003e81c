"""``python -m bench``: run the side-by-side benchmark and write results.json, report.md, plots."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType

from bench.build import build_tools
from bench.machine import machine_info
from bench.plots import make_plots
from bench.report import copy_configs, write_report, write_results_json
from bench.runner import MAIN_METRIC, RunOutcome, run_all
from bench.scenarios import QUICK_SKIP, SCENARIOS, targets_for
from bench.stage import FULL, QUICK
from bench.targets import TARGETS, lbproxy_available

QUICK_BUDGET_S = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts, ~2 s per scenario")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="output dir (bench/out)")
    p.add_argument("--repeat", type=int, default=1, help="runs per pair; the median is reported")
    p.add_argument(
        "--targets", default=",".join(TARGETS), help="comma list of " + ",".join(TARGETS)
    )
    p.add_argument(
        "--scenarios",
        default=None,
        help="comma list of "
        + ",".join(SCENARIOS)
        + " (default: all; with --quick all but "
        + ",".join(QUICK_SKIP)
        + ")",
    )
    p.add_argument("--keep-run-dir", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--profile",
        choices=("perf", "strace"),
        default=None,
        help="profile the proxy over each timed window (perf: CPU samples per binary and "
        "symbol; strace: system calls per operation, and CPU figures that mean nothing); "
        "reports in OUT/profiles/",
    )
    args = p.parse_args(argv)
    args.targets = split_choice(p, args.targets, TARGETS, "target")
    args.scenarios = split_choice(
        p, args.scenarios or ",".join(default_scenarios(args.quick)), tuple(SCENARIOS), "scenario"
    )
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def default_scenarios(quick: bool) -> list[str]:
    return [s for s in SCENARIOS if not (quick and s in QUICK_SKIP)]


def split_choice(
    p: argparse.ArgumentParser, value: str, allowed: tuple[str, ...], what: str
) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        p.error(f"unknown {what}(s) {bad or value!r}; choose from {','.join(allowed)}")
    return [v for v in allowed if v in items]  # canonical order, no duplicates


def missing_prerequisites(targets: list[str]) -> list[str]:
    """Names of what is missing to run these targets (empty when all is there)."""
    missing = [tool for tool in ("gcc", "taskset") if shutil.which(tool) is None]
    peers = ("nginx", "haproxy", "caddy")
    missing += [t for t in peers if t in targets and shutil.which(t) is None]
    if "lbproxy" in targets:
        ok, detail = lbproxy_available()
        if not ok:
            missing.append(f"lbproxy (`{sys.executable} -m lbproxy --version` failed: {detail})")
    cpus = os.sched_getaffinity(0)
    if not {0, 1} <= cpus:
        missing.append(f"CPUs 0 and 1 (this process may only use CPUs {sorted(cpus)})")
    return missing


def incomplete(outcome: RunOutcome, targets: list[str], scenarios: list[str]) -> list[str]:
    """Pairs without numbers for their main metric (or with non-finite numbers); a scenario
    that only some targets take part in (workers_scaling: lbproxy only) is checked for those."""
    gaps = []
    for scenario in scenarios:
        for target in targets_for(scenario, targets):
            metrics = outcome.results.get(scenario, {}).get(target, {})
            good = metrics and all(
                isinstance(v, int | float) and math.isfinite(v) for v in metrics.values()
            )
            if not good or MAIN_METRIC[scenario] not in metrics:
                gaps.append(f"{scenario}/{target}")
    return gaps


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_and_report(args: argparse.Namespace, command: str, out: Path, run_dir: Path) -> list[str]:
    """Build the tools, run every pair, write the outputs; returns the pairs without numbers."""
    started = time.monotonic()
    settings = QUICK if args.quick else FULL
    if args.profile:
        settings = replace(settings, profile=args.profile, profile_dir=str(out / "profiles"))
    gcc = shutil.which("gcc") or "gcc"
    machine = machine_info(gcc, command, args.quick, args.repeat)
    machine["settings"] = dict(vars(settings))
    tools = build_tools(gcc, run_dir / "bin")  # never under --out: no binaries in results
    print(f"run dir {run_dir} (configs, logs, native tools)", flush=True)
    outcome = run_all(args.targets, args.scenarios, settings, args.repeat, tools, run_dir)
    machine["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    machine["elapsed_s"] = round(time.monotonic() - started, 1)
    write_results_json(out, machine, outcome)
    plots = make_plots(outcome.results, outcome.cdfs, MAIN_METRIC, out)
    write_report(out, machine, outcome, settings, plots, copy_configs(outcome, out))
    return incomplete(outcome, args.targets, args.scenarios)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_prerequisites(args.targets)
    if args.profile and shutil.which(args.profile) is None:  # (--profile perf|strace)
        missing.append(f"{args.profile} (for --profile {args.profile})")
    if missing:
        print("python -m bench: missing: " + "; ".join(missing), file=sys.stderr)
        return 2
    started = time.monotonic()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="lbproxy-bench-"))
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # the driver stays off the proxy's CPU
    gaps: list[str] | None = None
    interrupted = False
    try:
        gaps = run_and_report(args, command, out, run_dir)
    except KeyboardInterrupt:
        print("interrupted: every child was stopped by PID", file=sys.stderr)
        interrupted = True
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.sched_setaffinity(0, affinity)
        if (gaps == [] or interrupted) and not args.keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"run dir kept (logs): {run_dir}", file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} in {elapsed:.0f}s", flush=True)
    if args.quick and elapsed > QUICK_BUDGET_S:
        print(
            f"warning: quick run took {elapsed:.0f}s (budget {QUICK_BUDGET_S:.0f}s)",
            file=sys.stderr,
        )
    if gaps:
        print("missing numbers for: " + ", ".join(gaps), file=sys.stderr)
        return 1
    return 0
