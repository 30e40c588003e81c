"""Measure the sockmap relay prototype beside user-space relays (see README.md).

    python -m bench.prototypes.sockmap.measure [--secs 5] [--conns 100] [--size 100] [--repeat 3]

Raw TCP echo (``loadgen -m tcp``, a closed loop, one message in flight per connection) to
``backend -t`` through each relay: none (``direct``), this prototype's sockmap relay, the
same binary as a plain epoll relay (``-u``), lbproxy in ``mode = "tcp"`` (its native engine)
and HAProxy in ``mode tcp``.  Generator and backend on CPU 0, the relay on CPU 1, as in the
bench.  With the sockmap the relay process does nothing per message: the kernel forwards in
the softirq of the sending side (charged to the generator or the backend) and in the
socket's backlog worker (a kernel thread).  So the figure that compares them is the CPU per
message of **everything that carries the traffic**: generator + backend + relay + every
kernel thread (from /proc/PID/stat, so other jobs on the machine do not count), and what each
relay adds to ``direct``'s; the relay process's own CPU is shown too.  Needs clang (BPF
target), libbpf-dev, root (or CAP_BPF + CAP_NET_ADMIN) and a kernel with BPF sockmap; builds
into a temp dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.procs import CLK_TCK, ChildSet, cpu_ticks, free_port, poll_until, port_open, tree_pids

HERE = Path(__file__).resolve().parent
NATIVE = HERE.parent.parent / "native"
RELAYS = ("direct", "sockmap", "user", "lbproxy", "haproxy")


def kernel_threads() -> list[int]:
    """PIDs of the kernel's threads (children of kthreadd, PID 2): softirq and workqueues."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == "2":
                pids.append(int(entry.name))
    return pids


def build(out: Path) -> dict[str, Path]:
    inc = subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tools = {
        "bpf": out / "relay.bpf.o",
        "relay": out / "relay",
        "backend": out / "backend",
        "loadgen": out / "loadgen",
    }
    bpf_flags = ["-O2", "-g", "-target", "bpf", f"-I/usr/include/{inc}", "-c"]
    cmds = [
        ["clang", *bpf_flags, "-o", str(tools["bpf"]), str(HERE / "relay.bpf.c")],
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-o",
            str(tools["relay"]),
            str(HERE / "relay.c"),
            "-lbpf",
        ],
        ["gcc", "-O2", "-o", str(tools["backend"]), str(NATIVE / "backend.c")],
        ["gcc", "-O2", "-o", str(tools["loadgen"]), str(NATIVE / "loadgen.c")],
    ]
    for cmd in cmds:
        subprocess.run(cmd, check=True)
    return tools


def relay_command(
    relay: str, tools: dict[str, Path], lport: int, bport: int, run: Path
) -> list[str]:
    if relay in ("sockmap", "user"):
        cmd = [str(tools["relay"]), "-l", str(lport), "-b", str(bport), "-o", str(tools["bpf"])]
        return cmd + (["-u"] if relay == "user" else [])
    if relay == "lbproxy":
        conf = run / "lbproxy-tcp.toml"
        conf.write_text(
            f'[listeners.raw]\nbind = "127.0.0.1:{lport}"\nmode = "tcp"\npool = "echo"\n'
            'idle_timeout = 3600.0\n\n[pools.echo]\nbalance = "round-robin"\n'
            f'backends = [{{ id = "b1", address = "127.0.0.1:{bport}" }}]\n\n'
            '[pools.echo.health]\ncheck = "none"\n'
        )
        return [sys.executable, "-m", "lbproxy", "serve", "--config", str(conf)]
    conf = run / "haproxy-tcp.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    maxconn 9900\ndefaults\n    mode tcp\n"
        "    timeout connect 5s\n    timeout client 3600s\n    timeout server 3600s\n"
        f"listen l\n    bind 127.0.0.1:{lport}\n    server b1 127.0.0.1:{bport}\n"
    )
    return ["haproxy", "-db", "-f", str(conf)]


def one_run(
    relay: str, tools: dict[str, Path], run: Path, args: argparse.Namespace
) -> dict[str, float]:
    bport, lport = free_port(), free_port()
    with ChildSet(run) as children:
        backend = children.start("backend", [str(tools["backend"]), "-p", str(bport), "-t"], cpu=0)
        if not poll_until(lambda: port_open(bport), timeout=10):
            raise RuntimeError(f"backend did not listen: {backend.log_tail()}")
        port, groups = bport, {"backend": [backend.pid]}
        if relay != "direct":
            proxy = children.start(relay, relay_command(relay, tools, lport, bport, run), cpu=1)
            if not poll_until(lambda: not proxy.alive() or port_open(lport), timeout=30):
                raise RuntimeError(f"{relay} did not listen: {proxy.log_tail()}")
            port, groups["relay"] = lport, tree_pids(proxy.pid)
        gen_cmd = [str(tools["loadgen"]), "-m", "tcp", "-p", str(port), "-c", str(args.conns)]
        gen_cmd += ["-s", str(args.size), "-d", str(args.secs), "-W", "0.5"]
        gen = children.start("loadgen", gen_cmd, cpu=0, interactive=True)
        gen.expect("MEASURE_START", timeout=30)
        carriers = [gen.pid, *(p for g in groups.values() for p in g), *kernel_threads()]
        t0 = cpu_ticks(carriers)
        own0 = cpu_ticks(groups.get("relay", []))
        gen.expect("MEASURE_END", timeout=args.secs + 30)
        t1 = cpu_ticks(carriers)
        own1 = cpu_ticks(groups.get("relay", []))
        res = json.loads(gen.expect("RESULT ", timeout=20).removeprefix("RESULT "))
    ops = max(float(res["ops"]), 1.0)
    if res["errors"]:
        raise RuntimeError(f"{relay}: {res['errors']} errors")
    out = {"msgs_per_s": float(res["ops_per_s"]), "all_cpu_us": (t1 - t0) / CLK_TCK * 1e6 / ops}
    if "relay" in groups:
        out["relay_cpu_us"] = (own1 - own0) / CLK_TCK * 1e6 / ops
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prototypes.sockmap.measure")
    p.add_argument("--secs", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--relays", default=",".join(RELAYS))
    args = p.parse_args()
    relays = args.relays.split(",")
    missing = [t for t in ("clang", "gcc", "taskset", "haproxy") if shutil.which(t) is None]
    if missing:
        print("missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    run = Path(tempfile.mkdtemp(prefix="sockmap-proto-"))
    tools = build(run)
    runs: dict[str, list[dict[str, float]]] = {r: [] for r in relays}
    for rep in range(args.repeat):
        for relay in relays:  # interleaved, so drift hits every relay alike
            runs[relay].append(one_run(relay, tools, run, args))
            print(f"[{rep + 1}/{args.repeat}] {relay}: {runs[relay][-1]}", flush=True)
    med = {r: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for r, rs in runs.items()}
    base = med.get("direct", {}).get("all_cpu_us", 0.0)
    print(f"\n{args.conns} connections, {args.size} B messages, medians of {args.repeat}:")
    print(
        "relay     msgs/s   CPU-µs/msg (all carriers)   added to direct   relay process CPU-µs/msg"
    )
    for relay, m in med.items():
        added = m["all_cpu_us"] - base if base else float("nan")
        own = m.get("relay_cpu_us", float("nan"))
        print(f"{relay:8} {m['msgs_per_s']:8.0f} {m['all_cpu_us']:18.2f} {added:22.2f} {own:22.2f}")
    shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
