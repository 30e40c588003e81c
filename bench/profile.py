"""``--profile perf|strace``: where a proxy's time goes over a timed scenario's window.

``perf``: ``perf record -e cpu-clock -g`` on the proxy's processes from ``MEASURE_START`` to
``MEASURE_END`` (the software clock: this VM has no hardware counters), then the share of the
samples per binary (kernel, the Python interpreter, uvloop, the native engine, libc, nginx,
haproxy, caddy) and the hottest symbols.  ``strace``: ``strace -c -f`` over the same window,
then system calls per operation (the counts are exact; strace slows the proxy down, so that
run's CPU figures mean nothing).  One text file per pair in ``OUT/profiles/``; each run of a
pair (``--repeat``) overwrites the last.  Either needs root or ``perf_event_paranoid`` /
``ptrace_scope`` that allow attaching to one's own processes.
"""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODES = ("perf", "strace")
# which bucket a sample's binary (perf's dso) falls in; the first match wins
DSO_BUCKETS = (
    ("kernel", re.compile(r"kernel|vmlinux")),
    ("native engine (_splice)", re.compile(r"_splice")),
    ("uvloop", re.compile(r"uvloop|loop\.cpython")),
    ("Python interpreter", re.compile(r"libpython|python3")),
    ("other Python extensions", re.compile(r"\.cpython-")),
    ("libc", re.compile(r"libc[.-]")),
)
TOP_SYMBOLS = 30


@dataclass
class Capture:
    """One running profiler attached to a proxy; ``stop(ops)`` writes its report."""

    mode: str
    report: Path
    proc: subprocess.Popen[bytes]
    raw: Path

    def stop(self, ops: float, cpu_us: float) -> None:
        """Detach; write the report (``cpu_us``: the proxy's CPU-µs per operation, measured
        from /proc over the window, which the perf shares are split by)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        text = (
            perf_summary(self.raw, cpu_us) if self.mode == "perf" else strace_summary(self.raw, ops)
        )
        head = f"{self.report.stem}: {ops:.0f} operations, {cpu_us:g} proxy CPU-µs per operation"
        self.report.write_text(f"{head}\n\n{text}")


def start(mode: str, pids: list[int], out_dir: Path, name: str) -> Capture:
    """Attach ``mode``'s profiler to ``pids`` (the proxy's process tree)."""
    if mode not in MODES:
        raise ValueError(f"--profile must be one of {', '.join(MODES)}, not {mode!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / f"{name}.txt"
    if mode == "perf":
        raw = out_dir / f"{name}.perf.data"
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g", "-o", str(raw)]
        cmd += ["-p", ",".join(str(p) for p in pids)]
    else:
        raw = out_dir / f"{name}.strace"
        cmd = ["strace", "-c", "-f", "-o", str(raw), *(a for p in pids for a in ("-p", str(p)))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Capture(mode, report, proc, raw)


def perf_report(raw: Path, sort: str) -> str:
    cmd = ["perf", "report", "-i", str(raw), "--stdio", "--no-children", "-g", "none"]
    cmd += ["--sort", sort, "--percent-limit", "0.3"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False).stdout


def dso_shares(report: str) -> dict[str, float]:
    """``perf report --sort dso`` lines ("12.34%  name") summed into DSO_BUCKETS."""
    shares: dict[str, float] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S.*)$", line)
        if not m:
            continue
        dso = m.group(2).strip()
        bucket = next((b for b, rx in DSO_BUCKETS if rx.search(dso)), dso)
        shares[bucket] = shares.get(bucket, 0.0) + float(m.group(1))
    return shares


def perf_summary(raw: Path, cpu_us: float) -> str:
    shares = dso_shares(perf_report(raw, "dso"))
    lines = ["share of the proxy's CPU samples per binary, and that share of its CPU-µs/operation:"]
    ranked = sorted(shares.items(), key=lambda x: -x[1])
    lines += [f"  {pct:6.2f} %  {pct * cpu_us / 100:8.2f} µs  {name}" for name, pct in ranked]
    symbols = [ln for ln in perf_report(raw, "dso,sym").splitlines() if "%" in ln]
    symbols = [ln for ln in symbols if not ln.lstrip().startswith("#")][:TOP_SYMBOLS]
    lines += ["", f"hottest {TOP_SYMBOLS} symbols (self time):", *symbols]
    return "\n".join(lines) + "\n"


def strace_summary(raw: Path, ops: float) -> str:
    """strace -c's table plus a column of calls per operation."""
    rows: list[tuple[str, int]] = []
    for line in raw.read_text().splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and re.fullmatch(r"[\d.]+", parts[0]) and parts[-1] != "total":
            rows.append((parts[-1], int(parts[3])))
    total = sum(n for _, n in rows)
    # strace attaches a moment after MEASURE_START, so per operation is a little low; where
    # every operation is one accepted connection, per accept4 is exact
    calls = dict(rows)
    accepts = calls.get("accept4", 0) + calls.get("accept", 0)
    per = float(accepts) if accepts else max(ops, 1.0)
    unit = "accepted connection" if accepts else "operation (strace attaches late: a bit low)"
    lines = [f"system calls per {unit}: {total / per:.2f}", ""]
    lines += [f"  {n / per:8.3f}  {name}" for name, n in sorted(rows, key=lambda r: -r[1])]
    return "\n".join(lines) + "\n\nstrace -c -f:\n" + raw.read_text()
