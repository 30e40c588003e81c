"""Compile the native tools (bench/native/*.c) with gcc (into the run dir; keyed by source hash)."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent / "native"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")


@dataclass(frozen=True)
class NativeTools:
    backend: Path
    loadgen: Path


def compile_tool(gcc: str, source: Path, cache_dir: Path) -> Path:
    """Return the path of ``source`` compiled with ``gcc``; rebuild only when the source changed."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = cache_dir / f"{source.stem}-{digest}"
    if binary.exists():
        return binary
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    proc = subprocess.run(
        [gcc, *CFLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gcc failed for {source.name}:\n{proc.stderr}")
    tmp.replace(binary)
    return binary


def build_tools(gcc: str, cache_dir: Path) -> NativeTools:
    return NativeTools(
        backend=compile_tool(gcc, NATIVE_DIR / "backend.c", cache_dir),
        loadgen=compile_tool(gcc, NATIVE_DIR / "loadgen.c", cache_dir),
    )
